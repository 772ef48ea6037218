"""SentencePiece: ``InternLM2Tokenizer`` (2B, 8B, 26B) and the slow ``LlamaTokenizer`` (4B, 40B)."""

from __future__ import annotations

from typing import Any, ClassVar

import sentencepiece as spm

from internvl_runtime.errors import CheckpointError

from .base import Tokenizer, clean_up_tokenization
from .config import TokenizerConfig

#: The sentencepiece word-boundary marker.
SPIECE_UNDERLINE = "▁"

#: ModelProto field 3 (normalizer_spec) holding NormalizerSpec field 3 (add_dummy_prefix) = false. Appended to a
#: serialized model, protobuf merges it into the model's normalizer spec: exactly what LlamaTokenizer
#: (legacy=False) does with ``normalizer_spec.MergeFrom(NormalizerSpec(add_dummy_prefix=False))``.
_NO_DUMMY_PREFIX_PATCH = bytes([0x1A, 0x02, 0x18, 0x00])


class SentencePieceTokenizer(Tokenizer):
    """``InternLM2Tokenizer`` and slow ``LlamaTokenizer``: a sentencepiece ``tokenizer.model``.

    The two official classes differ in a few rules, kept as flags (``tokenizer_class`` picks the defaults,
    ``tokenizer_config.json`` the values):

    * ``add_bos_token``/``add_eos_token``: ids added around the text (both classes: True/False by default);
    * ``legacy`` (LlamaTokenizer only; a missing or null value means True): with ``legacy=False`` the text gets
      one leading ``▁``, the model runs without its dummy prefix, and text after an added token gets no
      spurious ``▁`` (``tokenize``/``_tokenize`` of LlamaTokenizer);
    * ``decode_style``: how special tokens inside a run are decoded (``convert_tokens_to_string`` of each
      class: InternLM2 puts a space before a run of special tokens and always cleans up the text; Llama puts
      that space only with ``legacy`` and not before the first token, and strips the first token's ``▁``);
    * ``special_ids_from_model`` (InternLM2): bos/eos ids come from the sentencepiece model, not the vocab.
    """

    #: Which official ``convert_tokens_to_string`` to follow: ``"internlm2"`` or ``"llama"``.
    vocab_files: ClassVar[tuple[str, ...]] = ("tokenizer.model",)
    decode_style: ClassVar[str] = "llama"
    #: bos/eos ids from the sentencepiece model (InternLM2Tokenizer's properties) instead of the vocabulary.
    special_ids_from_model: ClassVar[bool] = False
    #: Whether the class reads ``legacy`` (LlamaTokenizer); InternLM2Tokenizer ignores it (always legacy).
    reads_legacy_flag: ClassVar[bool] = True

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__(config)
        path = config.require("tokenizer.model")["tokenizer.model"]
        self.add_bos_token = bool(self.init_kwargs.get("add_bos_token", True))
        self.add_eos_token = bool(self.init_kwargs.get("add_eos_token", False))
        legacy = self.init_kwargs.get("legacy") if self.reads_legacy_flag else None
        self.legacy = True if legacy is None else bool(legacy)
        sp_kwargs = self.init_kwargs.get("sp_model_kwargs") or {}
        self.sp_model = spm.SentencePieceProcessor(**sp_kwargs)
        try:
            if self.legacy:
                self.sp_model.Load(str(path))
            else:
                proto = path.read_bytes() + _NO_DUMMY_PREFIX_PATCH
                self.sp_model.LoadFromSerializedProto(proto)
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"cannot load the sentencepiece model {path}: {exc}") from exc
        self._vocab: dict[str, int] = {self.sp_model.IdToPiece(i): i for i in range(self.sp_model.GetPieceSize())}
        self._finish_init()
        # LlamaTokenizer._tokenize (legacy=False) strips the pieces of a leading unk token.
        self._unk_token_length = len(self.sp_model.encode(self.unk_token or "", out_type=str))

    @property
    def vocab_size(self) -> int:
        return int(self.sp_model.GetPieceSize())

    def _base_vocab(self) -> dict[str, int]:
        return self._vocab

    @property
    def bos_token_id(self) -> int | None:
        if self.special_ids_from_model:  # InternLM2Tokenizer.bos_token_id = sp_model.bos_id()
            return int(self.sp_model.bos_id())
        return super().bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        if self.special_ids_from_model:  # InternLM2Tokenizer.eos_token_id = sp_model.eos_id()
            return int(self.sp_model.eos_id())
        return super().eos_token_id

    def tokenize(self, text: str) -> list[str]:
        if self.legacy or not text:
            return super().tokenize(text)
        # LlamaTokenizer.tokenize (legacy=False): one leading ▁, no ▁ kept from the text, and the ▁ dropped
        # again when a special token (from all_special_tokens only) comes first.
        tokens = super().tokenize(SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " "))
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self._all_special_token_set:
            tokens = tokens[1:]
        return tokens

    def _tokenize(self, text: str) -> list[str]:
        tokens: list[str] = self.sp_model.encode(text, out_type=str)
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return tokens
        # legacy=False: the model has no dummy prefix, so a leading ▁ would be dropped; encode behind the
        # unk token and strip its pieces (LlamaTokenizer._tokenize).
        tokens = self.sp_model.encode((self.unk_token or "") + text, out_type=str)
        return tokens[self._unk_token_length :] if len(tokens) >= self._unk_token_length else tokens

    def _convert_token_to_id(self, token: str) -> int | None:
        return int(self.sp_model.PieceToId(token))

    def _convert_id_to_token(self, index: int) -> str:
        return str(self.sp_model.IdToPiece(index))

    def build_inputs_with_special_tokens(self, ids: list[int]) -> list[int]:
        bos_id, eos_id = self.bos_token_id, self.eos_token_id
        if (self.add_bos_token and bos_id is None) or (self.add_eos_token and eos_id is None):
            raise CheckpointError(f"{self.name_or_path}: add_bos_token/add_eos_token is set but the token is missing")
        bos = [bos_id] if self.add_bos_token and bos_id is not None else []
        eos = [eos_id] if self.add_eos_token and eos_id is not None else []
        return bos + list(ids) + eos

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        tokens = list(tokens)
        if self.decode_style == "llama" and tokens and tokens[0].startswith(SPIECE_UNDERLINE):
            tokens[0] = tokens[0][1:]  # LlamaTokenizer strips the first token's ▁
        out = ""
        current: list[str] = []
        prev_is_special = False
        for i, token in enumerate(tokens):
            # Special tokens are never decoded by the sentencepiece model.
            if token in self._all_special_token_set:
                if self.decode_style == "internlm2":
                    space = not prev_is_special
                else:
                    space = not prev_is_special and i != 0 and self.legacy
                if space:
                    out += " "
                out += self.sp_model.decode(current) + token
                prev_is_special = True
                current = []
            else:
                current.append(token)
                prev_is_special = False
        out += self.sp_model.decode(current)
        if self.decode_style == "internlm2":
            # InternLM2Tokenizer.convert_tokens_to_string always cleans up, whatever the config says. (It then
            # prepends a space and slices it off: its prefix-space test compares tokens with ids, so the space
            # is always added and removed, a no-op.)
            out = clean_up_tokenization(out)
        return out


class InternLM2Tokenizer(SentencePieceTokenizer):
    """``InternLM2Tokenizer`` (InternVL's ``tokenization_internlm2.py``, not run): 2B, 8B, 26B."""

    reproduces: ClassVar[str | None] = "InternLM2Tokenizer"

    class_defaults: ClassVar[dict[str, Any]] = {
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    decode_style: ClassVar[str] = "internlm2"
    special_ids_from_model: ClassVar[bool] = True
    reads_legacy_flag: ClassVar[bool] = False


class LlamaTokenizer(SentencePieceTokenizer):
    """Slow ``LlamaTokenizer`` of transformers 4.37.2: Phi-3 (4B, ``legacy=False``) and Yi (40B, ``legacy=True``)."""

    reproduces: ClassVar[str | None] = "LlamaTokenizer"

    class_defaults: ClassVar[dict[str, Any]] = {
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "legacy": None,
    }
    decode_style: ClassVar[str] = "llama"
    special_ids_from_model: ClassVar[bool] = False
    reads_legacy_flag: ClassVar[bool] = True
