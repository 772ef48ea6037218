"""Which official chat code a checkpoint runs, and what its ``chat`` / ``generate`` do differently.

Two generations of OpenGVLab's GitHub-format code answer the same call in different ways:

- ``internvl_chat`` (InternVL2, 2.5, 3; transformers 4.37): ``generate`` given embeddings returns the LLM's
  bos id, then the new ids, and ``max_length`` counts that bos; the repetition penalty also sees the bos;
  ``chat`` decodes with special tokens skipped and cuts at the separator (``Template.stop_str``).
- ``internvl_chat_gpt_oss`` (InternVL3.5 at eca3ea7, the only code that loads Qwen3, Qwen3-MoE and GPT-OSS;
  transformers 4.55): ``generate`` returns only the new ids (its input ids start empty), and ``max_length``
  counts the prompt's embeddings plus the new tokens; ``chat`` / ``batch_chat`` stop at
  ``(sep2 or sep).strip()``, decode with special tokens KEPT (``skip_special_tokens=False``) and cut there,
  so an answer may show ``<|vision_start|>`` or ``<think>`` where the model wrote them.

The choice is made from the exact LLM architecture of config.json (nothing else tells the two apart: both
generations' configs name the ``internvl2_5`` template).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import InternVLConfig
from ..processing.template import Template


@dataclass(frozen=True)
class OfficialChatRules:
    """The behaviour of one generation of the official chat code (see the module docstring)."""

    name: str
    #: ``generate`` returns the LLM's bos before the new ids (and ``max_length`` / the penalty count it).
    leading_bos: bool
    #: ``chat`` / ``batch_chat`` decode the answer with special tokens skipped.
    skip_special_tokens: bool
    #: The answer ends at ``sep2`` where the template has one (InternVL3.5's code); else at the separator.
    stop_at_sep2: bool

    def stop_text(self, template: Template) -> str:
        """The token text whose id ends an answer, and where the decoded answer is cut."""
        if self.stop_at_sep2 and template.sep2:
            return template.sep2.strip()
        return template.stop_str


INTERNVL_CHAT = OfficialChatRules("internvl_chat (transformers 4.37)", leading_bos=True,
                                  skip_special_tokens=True, stop_at_sep2=False)
INTERNVL3_5_CHAT = OfficialChatRules("internvl_chat_gpt_oss (InternVL3.5, transformers 4.55)", leading_bos=False,
                                     skip_special_tokens=False, stop_at_sep2=True)

#: LLM architectures that only the InternVL3.5 code (``internvl_chat_gpt_oss``) loads.
INTERNVL3_5_ARCHITECTURES = frozenset({"Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "GptOssForCausalLM"})


def official_chat_rules(config: InternVLConfig) -> OfficialChatRules:
    """The rules of the official code that runs this checkpoint."""
    if config.llm.architecture in INTERNVL3_5_ARCHITECTURES:
        return INTERNVL3_5_CHAT
    return INTERNVL_CHAT
