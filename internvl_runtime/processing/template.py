"""Conversation templates of the InternVL2 / 2.5 / 3 checkpoints, and ``<image>`` placeholder expansion.

Reproduces the reference ``conversation.py`` templates (looked up by the exact ``template`` string of
config.json): Hermes-2 and internlm2-chat (ChatML, "MPT" separator style), phi3-chat and internvl_zh (the
seven InternVL2 checkpoints); internvl2_5 (InternVL2.5 and InternVL3: ChatML with a newline after each
``<|im_end|>`` and its own system message); and InternVL3.5-GPT-OSS's internvl3_5_gpt_oss (harmony roles,
"MPT_TWO": a final assistant message ends with ``<|return|>``). Generation stops at ``Template.stop_str``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import ConfigError, PlaceholderMismatch

IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"
#: LMDeploy's image placeholder: in a message that carries images it marks where they go, as ``<image>`` does.
LMDEPLOY_IMAGE_TOKEN = "<IMAGE_TOKEN>"

# The InternVL 2.0 system message (the reference keeps it for every template to preserve benchmarks).
INTERNVL2_SYSTEM_MESSAGE = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                            "是一个有用无害的人工智能助手。")
# The system message of the ``internvl2_5`` template (InternVL2.5 and InternVL3; conversation.py at 31e075f).
INTERNVL2_5_SYSTEM_MESSAGE = ("你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位"
                              "联合开发的多模态大语言模型。")

# The system message of the ``internvl3_5_gpt_oss`` template (internvl_chat_gpt_oss's conversation.py at 2410d1d).
INTERNVL3_5_GPT_OSS_SYSTEM_MESSAGE = (
    "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
    "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every "
    "message.")


@dataclass
class Template:
    """A conversation template. ``style`` is 'mpt' (system + sep, then role + message + sep per turn,
    a bare role to prompt the answer) or 'internvl_zh'."""

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep: str
    style: str = "mpt"
    sep2: str = ""
    messages: list[tuple[str, str | None]] = field(default_factory=list)

    @property
    def stop_str(self) -> str:
        """The token text that ends an answer, as the official chat picks it: ``sep2.strip()`` for the
        "mpt_two" style (GPT-OSS: ``<|return|>``), else the separator stripped (the official chat from
        InternVL2.5 on stops at ``convert_tokens_to_ids(sep.strip())``; the InternVL2 separators carry no
        whitespace)."""
        return (self.sep2 if self.style == "mpt_two" else self.sep).strip()

    def copy(self) -> Template:
        return Template(self.name, self.system_template, self.system_message, self.roles, self.sep,
                        self.style, self.sep2, list(self.messages))

    def append_message(self, role: str, message: str | None) -> None:
        self.messages.append((role, message))

    def get_prompt(self, *, open_last: bool = False) -> str:
        """The prompt; ``open_last``: the last message is the start of the answer (prefill), written without
        the separator that would close it."""
        if self.style == "mpt_two":
            # internvl_chat_gpt_oss at 2410d1d: every message ends with sep, except a final assistant one (sep2)
            out = self.system_template.format(system_message=self.system_message) + self.sep
            for i, (role, message) in enumerate(self.messages):
                last = i == len(self.messages) - 1
                if open_last and last:
                    out += role + (message or "")
                elif message:
                    out += role + message + (self.sep2 if last and role == self.roles[1] else self.sep)
                else:
                    out += role
            return out
        if self.style == "mpt":
            out = self.system_template.format(system_message=self.system_message) + self.sep
            for i, (role, message) in enumerate(self.messages):
                if open_last and i == len(self.messages) - 1:
                    out += role + (message or "")
                else:
                    out += role + message + self.sep if message else role
            return out
        # internvl_zh: system, then "role: message" separated by sep2 (after user) / sep (after bot)
        seps = (self.sep2, self.sep)
        out = self.system_message + seps[0]
        for i, (role, message) in enumerate(self.messages):
            if open_last and i == len(self.messages) - 1:
                out += f"{role}: {message}" if message else f"{role}:"
            else:
                out += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
        return out


TEMPLATES: dict[str, Template] = {
    t.name: t for t in (
        Template("Hermes-2", "<|im_start|>system\n{system_message}", INTERNVL2_SYSTEM_MESSAGE,
                 ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>"),
        Template("internlm2-chat", "<|im_start|>system\n{system_message}", INTERNVL2_SYSTEM_MESSAGE,
                 ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>"),
        Template("phi3-chat", "<|system|>\n{system_message}", INTERNVL2_SYSTEM_MESSAGE,
                 ("<|user|>\n", "<|assistant|>\n"), "<|end|>"),
        Template("internvl_zh", "", "", ("<human>", "<bot>"), "</s>", style="internvl_zh", sep2=" "),
        Template("internvl2_5", "<|im_start|>system\n{system_message}", INTERNVL2_5_SYSTEM_MESSAGE,
                 ("<|im_start|>user\n", "<|im_start|>assistant\n"), "<|im_end|>\n"),
        Template("internvl3_5_gpt_oss", "<|start|>system<|message|>{system_message}",
                 INTERNVL3_5_GPT_OSS_SYSTEM_MESSAGE, ("<|start|>user<|message|>", "<|start|>assistant"), "<|end|>",
                 style="mpt_two", sep2="<|return|>"),
    )
}


def get_template(name: str | None) -> Template:
    """A fresh copy of the named template; the name comes from config.json's ``template`` (None: an
    HF-format checkpoint, which has none: its prompts come from its Jinja chat template)."""
    if name is None:
        raise ConfigError("this checkpoint (HF format) has no official conversation template: its prompts "
                          "come from its chat template (the engine, the server and the pipeline render with it)")
    try:
        return TEMPLATES[name].copy()
    except KeyError:
        raise ConfigError(f"conversation template {name!r} is unknown; known: {', '.join(TEMPLATES)}") from None


def build_prompt(template_name: str | None, question: str, history: Sequence[tuple[str, str]] = (),
                 system_message: str | None = None) -> str:
    """The prompt string for ``question`` after ``history`` (list of (question, answer))."""
    template = get_template(template_name)
    if system_message is not None:
        template.system_message = system_message
    for old_question, old_answer in history:
        template.append_message(template.roles[0], old_question)
        template.append_message(template.roles[1], old_answer)
    template.append_message(template.roles[0], question)
    template.append_message(template.roles[1], None)
    return template.get_prompt()


def render_turns(template_name: str | None, turns: Sequence[tuple[str, str | None]], system_message: str | None = None,
                 *, open_last: bool = False) -> str:
    """The prompt for ``turns`` of (role header, text): the template's own roles (``Template.roles``) or the
    extra turns of a tool-call format; a text of None is a bare header (the answer's prompt). With only
    (user, assistant) pairs and a final (user, None) this is :func:`build_prompt`, byte for byte."""
    template = get_template(template_name)
    if system_message is not None:
        template.system_message = system_message
    for role, text in turns:
        template.append_message(role, text)
    return template.get_prompt(open_last=open_last)


def image_tokens(num_tiles: int, num_image_token: int) -> str:
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_image_token * num_tiles) + IMG_END_TOKEN


def expand_image_placeholders(prompt: str, num_patches_list: Sequence[int], num_image_token: int) -> str:
    """Replace every ``<image>`` in order (history included), one ``<img>...</img>`` block per entry.

    The reference replaces placeholders one by one and silently leaves surplus ones as literal text
    (or drops surplus images' features); both would be a silent wrong answer, so counts must agree.
    """
    available = prompt.count(IMAGE_PLACEHOLDER)
    if available != len(num_patches_list):
        raise PlaceholderMismatch(
            f"the prompt has {available} <image> placeholder(s) but {len(num_patches_list)} image(s) "
            f"were given (num_patches_list={list(num_patches_list)})")
    for num_tiles in num_patches_list:
        prompt = prompt.replace(IMAGE_PLACEHOLDER, image_tokens(num_tiles, num_image_token), 1)
    return prompt
