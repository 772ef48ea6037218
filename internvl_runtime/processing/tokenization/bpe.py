"""Byte-level BPE: the slow ``Qwen2Tokenizer`` (InternVL2-1B) from ``vocab.json`` and ``merges.txt``."""

from __future__ import annotations

import unicodedata
from typing import Any, ClassVar

import tokenizers

from internvl_runtime.errors import CheckpointError, InvalidRequest

from .base import Tokenizer
from .config import TokenizerConfig, _read_json


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map of the 256 bytes to printable characters (byte-level BPE's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


class BPETokenizer(Tokenizer):
    """Slow ``Qwen2Tokenizer``: byte-level BPE from ``vocab.json`` + ``merges.txt``.

    Reproduces the slow class: NFC of the whole text first (``prepare_for_tokenization``), the Qwen2
    pre-tokenisation regex, GPT-2 byte-to-unicode mapping and BPE merges by rank (run by the ``tokenizers``
    library, which merges exactly like the slow ``bpe``); decoding maps the characters back to bytes and
    decodes UTF-8 with ``errors`` (``replace``: U+FFFD for incomplete sequences).

    The regex runs in the ``tokenizers`` library (Oniguruma) where the slow class uses the ``regex`` module;
    the two agree on every code point assigned in Unicode 14 (Python 3.11's ``unicodedata``), and differ
    only on characters assigned later, whose classes depend on the ``regex`` version anyway.
    """

    reproduces: ClassVar[str | None] = "Qwen2Tokenizer"
    vocab_files: ClassVar[tuple[str, ...]] = ("vocab.json", "merges.txt")

    #: Qwen2Tokenizer's PRETOKENIZE_REGEX (single digits; Llama-3's tokenizer.json groups 1-3 digits).
    PRETOKENIZE_REGEX = (
        r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
        r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
    )
    class_defaults: ClassVar[dict[str, Any]] = {
        "unk_token": "<|endoftext|>",
        "bos_token": None,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
    }
    # Qwen2Tokenizer.decode overrides both defaults to False, whatever the config says.
    decode_spaces_between_special_tokens: ClassVar[bool] = False
    decode_clean_up_default: ClassVar[bool | None] = False

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__(config)
        files = config.require("vocab.json", "merges.txt")
        vocab = _read_json(config.folder, "vocab.json")
        if not isinstance(vocab, dict):
            raise CheckpointError(f"{files['vocab.json']} must hold a JSON object token -> id")
        self._encoder: dict[str, int] = {str(k): int(v) for k, v in vocab.items()}
        self._decoder: dict[int, str] = {v: k for k, v in self._encoder.items()}
        merges: list[tuple[str, str]] = []
        with open(files["merges.txt"], encoding="utf-8") as handle:
            for line in handle:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split()
                if len(parts) != 2:
                    raise CheckpointError(f"{files['merges.txt']}: malformed merge line {line!r}")
                merges.append((parts[0], parts[1]))
        self.errors = str(self.init_kwargs.get("errors", "replace"))
        self._byte_decoder = {char: byte for byte, char in bytes_to_unicode().items()}
        model = tokenizers.models.BPE(vocab=self._encoder, merges=merges)
        self._bpe = tokenizers.Tokenizer(model)
        self._bpe.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
            [
                tokenizers.pre_tokenizers.Split(
                    tokenizers.Regex(self.PRETOKENIZE_REGEX), behavior="isolated", invert=False
                ),
                tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        self._finish_init()

    @property
    def vocab_size(self) -> int:
        return len(self._encoder)

    def _base_vocab(self) -> dict[str, int]:
        return self._encoder

    def prepare_for_tokenization(self, text: str) -> str:
        # Qwen2Tokenizer.prepare_for_tokenization: NFC on the whole text, before added tokens are split out.
        return unicodedata.normalize("NFC", text)

    def _tokenize(self, text: str) -> list[str]:
        return list(self._bpe.encode(text, add_special_tokens=False).tokens)

    def _convert_token_to_id(self, token: str) -> int | None:
        # encoder.get(token, encoder.get(unk_token)): None when the token and unk are both unknown.
        index = self._encoder.get(token)
        if index is None and self.unk_token is not None:
            index = self._encoder.get(self.unk_token)
        return index

    def _convert_id_to_token(self, index: int) -> str:
        token = self._decoder.get(index)
        if token is None:  # a hole in vocab.json's ids
            raise InvalidRequest(f"token id {index} is not in the vocabulary of {self.name_or_path}")
        return token

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = bytearray()
        for char in "".join(tokens):
            byte = self._byte_decoder.get(char)
            # A character outside the byte alphabet can only come from an added token (the slow class
            # would fail on it); its UTF-8 bytes are the only sensible reading.
            data.extend(char.encode("utf-8") if byte is None else (byte,))
        return data.decode("utf-8", errors=self.errors)
