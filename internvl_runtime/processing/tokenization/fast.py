"""``PreTrainedTokenizerFast``: a ``tokenizer.json`` run by the ``tokenizers`` library (InternVL2-76B)."""

from __future__ import annotations

from typing import Any, ClassVar

import tokenizers

from internvl_runtime.errors import CheckpointError, InvalidRequest

from .base import Ids, Tokenizer, _as_id_list
from .config import AddedToken, TokenizerConfig


class FastJsonTokenizer(Tokenizer):
    """``PreTrainedTokenizerFast``: a ``tokenizer.json`` run by the ``tokenizers`` library (Llama-3, 76B).

    transformers uses the library for everything here: added tokens, the post-processor (which adds
    ``<|begin_of_text|>``), and decoding (special tokens skipped by the library's ``special`` flag), then
    ``clean_up_tokenization`` when ``clean_up_tokenization_spaces`` (true in the 76B config).
    """

    reproduces: ClassVar[str | None] = "PreTrainedTokenizerFast"
    vocab_files: ClassVar[tuple[str, ...]] = ("tokenizer.json",)
    saves_added_tokens_file: ClassVar[bool] = False

    class_defaults: ClassVar[dict[str, Any]] = {"clean_up_tokenization_spaces": True}

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__(config)
        path = config.require("tokenizer.json")["tokenizer.json"]
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises plain Exceptions on bad files
            raise CheckpointError(f"cannot load {path}: {exc}") from exc
        # PreTrainedTokenizerFast takes padding defaults from the file; truncation and padding themselves are
        # switched off for every call without max_length (we never truncate, and pad in Python).
        file_padding = self._tok.padding
        if file_padding is not None:
            if "padding_side" not in config.init_kwargs:
                self.padding_side = str(file_padding.get("direction", self.padding_side))
            if "pad_token" not in config.special_tokens and file_padding.get("pad_token"):
                self._special["pad_token"] = str(file_padding["pad_token"])
        self._tok.no_truncation()
        self._tok.no_padding()
        # PreTrainedTokenizerFast.__init__ re-adds the config's added tokens (in id order) and any special
        # token missing from the library's vocabulary, as special when flagged or named special.
        special = set(self._all_special_tokens_uncached())
        vocab = self._tok.get_vocab(with_added_tokens=True)
        to_add = [tok for _, tok in sorted(config.added_tokens.items())]
        contents = {tok.content for tok in to_add}
        to_add += [AddedToken(t, special=True, normalized=False) for t in self._all_special_tokens_uncached()
                   if t not in contents and t not in vocab]
        for token in to_add:
            is_special = token.special or token.content in special
            lib_token = tokenizers.AddedToken(
                token.content,
                single_word=token.single_word,
                lstrip=token.lstrip,
                rstrip=token.rstrip,
                normalized=token.normalized,
                special=is_special,
            )
            if is_special:
                self._tok.add_special_tokens([lib_token])
            else:
                self._tok.add_tokens([lib_token])
        self._added_decoder = {
            int(i): AddedToken(t.content, t.special, t.lstrip, t.rstrip, t.single_word, t.normalized)
            for i, t in self._tok.get_added_tokens_decoder().items()
        }
        self._added_encoder = {tok.content: idx for idx, tok in self._added_decoder.items()}
        self._refresh_tables()

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=False))

    def __len__(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def _base_vocab(self) -> dict[str, int]:
        return self._tok.get_vocab(with_added_tokens=False)

    def _convert_token_to_id(self, token: str) -> int | None:
        index = self._tok.token_to_id(token)
        return self.unk_token_id if index is None and token != self.unk_token else index

    def _convert_id_to_token(self, index: int) -> str:
        token = self._tok.id_to_token(index)
        if token is None:
            raise InvalidRequest(f"token id {index} is outside the vocabulary of {self.name_or_path}")
        return token

    def _check_id(self, index: int) -> int:
        if index < 0 or self._tok.id_to_token(index) is None:
            raise InvalidRequest(
                f"token id {index} is outside the vocabulary of the tokenizer in {self.name_or_path} "
                f"({len(self)} tokens)"
            )
        return index

    def tokenize(self, text: str) -> list[str]:
        return list(self._tok.encode(text, add_special_tokens=False).tokens)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidRequest(f"encode expects a string, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return str(self._tok.decoder.decode(tokens)) if self._tok.decoder is not None else " ".join(tokens)

    def decode(
        self,
        ids: Ids,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        spaces_between_special_tokens: bool | None = None,
    ) -> str:
        id_list = [self._check_id(index) for index in _as_id_list(ids)]
        text = str(self._tok.decode(id_list, skip_special_tokens=skip_special_tokens))
        return self._maybe_clean_up(text, clean_up_tokenization_spaces)
