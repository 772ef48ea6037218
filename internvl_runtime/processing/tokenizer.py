"""Tokenizers of the InternVL2 checkpoints, equal token for token to the official ones, without transformers.

The official code loads the tokenizer with ``AutoTokenizer.from_pretrained(path, trust_remote_code=True,
use_fast=False)`` (transformers 4.37.2). The class is named by ``tokenizer_config.json``'s
``tokenizer_class``; four are used by the InternVL2 family:

============================  =====================================  ==========================================
``tokenizer_class``           checkpoints                            reproduced by
============================  =====================================  ==========================================
``Qwen2Tokenizer``            1B (Qwen2)                             :class:`BPETokenizer` (vocab.json, merges.txt)
``InternLM2Tokenizer``        2B, 8B, 26B (InternLM2)                :class:`SentencePieceTokenizer`
``LlamaTokenizer``            4B (Phi-3, legacy=False), 40B (Yi)     :class:`SentencePieceTokenizer`
``PreTrainedTokenizerFast``   76B (Llama-3, tokenizer.json only)     :class:`FastJsonTokenizer`
============================  =====================================  ==========================================

``PreTrainedTokenizerFast`` has no slow twin, so the official code runs the ``tokenizers`` library there even
with ``use_fast=False``; so do we. The three slow classes are reproduced rule by rule on top of the
``tokenizers`` (byte-level BPE) and ``sentencepiece`` libraries:

* **encoding** (``PreTrainedTokenizer.tokenize``): the text is cut at every added token (leftmost, longest
  first, like transformers' ``Trie``), the ``lstrip``/``rstrip``/``single_word`` flags of the added tokens
  eat the neighbouring whitespace, each piece of plain text goes through the model, tokens become ids
  (added tokens first, then the model's vocabulary), and ``bos``/``eos`` are added by the flags
  ``add_bos_token``/``add_eos_token``;
* **decoding** (``PreTrainedTokenizer._decode``): ids become tokens (skipping ``all_special_ids`` when asked),
  "legacy" added tokens (added tokens that are not special tokens, and additional special tokens outside the
  base vocabulary) are decoded apart from the text around them, the pieces are joined with a space when
  ``spaces_between_special_tokens`` (the slow default, except for Qwen2) and cleaned up when
  ``clean_up_tokenization_spaces``.

Every flag is read from ``tokenizer_config.json`` (or ``special_tokens_map.json``/``added_tokens.json`` for
checkpoints saved without ``added_tokens_decoder``), falling back to the official class's constructor
defaults; nothing depends on the folder's name, and no code from the checkpoint folder is run.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Union

import sentencepiece as spm
import tokenizers
import torch

from internvl_runtime.errors import CheckpointError, InvalidRequest

__all__ = [
    "AddedToken",
    "AutoTokenizer",
    "BatchEncoding",
    "BPETokenizer",
    "FastJsonTokenizer",
    "InternLM2Tokenizer",
    "LlamaTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "clean_up_tokenization",
    "load_tokenizer",
]

#: The sentencepiece word-boundary marker.
SPIECE_UNDERLINE = "▁"

#: transformers' ``SPECIAL_TOKENS_ATTRIBUTES`` in its order (``all_special_tokens`` follows this order).
SPECIAL_TOKEN_ATTRIBUTES: tuple[str, ...] = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)

#: from_pretrained arguments that only steer loading in transformers; accepted and ignored here.
_LOADER_ONLY_KWARGS = frozenset(
    {"trust_remote_code", "use_fast", "revision", "local_files_only", "cache_dir", "token", "_from_auto"}
)

Ids = Union[int, Sequence[int], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------
# Small data types
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AddedToken:
    """A token added on top of the model's vocabulary, with transformers' ``AddedToken`` flags.

    ``lstrip``/``rstrip``: the token eats the whitespace on its left/right when encoding.
    ``single_word``: the token only matches as a whole word. ``special``: skipped by fast decoding with
    ``skip_special_tokens``. ``normalized``: only matters to the ``tokenizers`` library.
    """

    content: str
    special: bool = False
    lstrip: bool = False
    rstrip: bool = False
    single_word: bool = False
    normalized: bool = True

    @classmethod
    def from_json(cls, value: Mapping[str, Any] | str, *, special: bool | None = None) -> AddedToken:
        """Build from the dict form saved by transformers (or a bare string)."""
        if isinstance(value, str):
            return cls(value, special=bool(special), normalized=not special)
        return cls(
            content=str(value["content"]),
            special=bool(value.get("special", False) if special is None else special),
            lstrip=bool(value.get("lstrip", False)),
            rstrip=bool(value.get("rstrip", False)),
            single_word=bool(value.get("single_word", False)),
            normalized=bool(value.get("normalized", True)),
        )


class BatchEncoding(dict):
    """What :meth:`Tokenizer.__call__` returns: a dict of ``input_ids``/``attention_mask`` with attribute access.

    Like transformers' ``BatchEncoding``: ``enc["input_ids"]``, ``enc.input_ids`` and ``enc.to(device)``
    (moves the tensors, when ``return_tensors='pt'`` was asked).
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: str | torch.device) -> BatchEncoding:
        """Move every tensor to ``device`` (in place) and return ``self``."""
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self


def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: drop the space before punctuation and English contractions."""
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


def _token_content(value: Any) -> str | None:
    """A special-token value of a config (``None``, a string, or an ``AddedToken`` dict) as its content."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return str(value["content"])
    return str(value)


def _read_json(folder: Path, name: str) -> Any:
    path = folder / name
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"tokenizer file {path} is not valid JSON: {exc}") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot read tokenizer file {path}: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------
# Configuration read from the checkpoint folder
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TokenizerConfig:
    """Everything transformers 4.37 reads from a folder to build a tokenizer (``_from_pretrained``).

    ``init_kwargs`` is ``tokenizer_config.json`` (updated by the caller's keyword arguments), ``added_tokens``
    the added tokens by id, ``special_tokens`` the special-token attributes (``bos_token``... as contents, a
    key being absent when the config does not name it, so that the class default applies) and
    ``additional_special_tokens`` their extra list. ``special_token_flags`` keeps the flags of special tokens
    given as dicts, used when such a token is not yet an added token.
    """

    folder: Path
    tokenizer_class: str
    init_kwargs: dict[str, Any]
    added_tokens: dict[int, AddedToken]
    special_tokens: dict[str, str | None]
    additional_special_tokens: list[str]
    special_token_flags: dict[str, AddedToken]

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> TokenizerConfig:
        """Read ``tokenizer_config.json`` and, when it has no ``added_tokens_decoder``, the older files."""
        path = Path(folder)
        if not path.is_dir():
            raise CheckpointError(f"tokenizer folder {path} does not exist or is not a directory")
        if not (path / "tokenizer_config.json").is_file():
            present = sorted(p.name for p in path.iterdir())
            raise CheckpointError(
                f"no tokenizer in {path}: tokenizer_config.json is missing (files present: {present or 'none'})"
            )
        raw = _read_json(path, "tokenizer_config.json")
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path / 'tokenizer_config.json'} must hold a JSON object")
        init_kwargs: dict[str, Any] = dict(raw)
        init_kwargs.update({k: v for k, v in (overrides or {}).items() if k not in _LOADER_ONLY_KWARGS})
        tokenizer_class = init_kwargs.pop("tokenizer_class", None)
        if not tokenizer_class:
            raise CheckpointError(
                f"{path / 'tokenizer_config.json'} has no 'tokenizer_class'; "
                f"supported classes: {', '.join(sorted(_REGISTRY))}"
            )

        # special_tokens_map.json only counts when the config has no added_tokens_decoder (4.37 logic).
        added: dict[int, AddedToken] = {}
        if "added_tokens_decoder" in init_kwargs:
            try:
                for index, value in init_kwargs.pop("added_tokens_decoder").items():
                    added[int(index)] = AddedToken.from_json(value)
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(
                    f"{path / 'tokenizer_config.json'}: malformed added_tokens_decoder ({exc!r})"
                ) from exc
        else:
            if (path / "special_tokens_map.json").is_file():
                for key, value in _read_json(path, "special_tokens_map.json").items():
                    if overrides and overrides.get(key):
                        continue  # the caller's keyword arguments win
                    if key == "additional_special_tokens" and isinstance(value, list):
                        merged = list(init_kwargs.get("additional_special_tokens") or [])
                        for token in value:
                            if _token_content(token) not in {_token_content(t) for t in merged}:
                                merged.append(token)
                        value = merged
                    init_kwargs[key] = value
            if (path / "added_tokens.json").is_file():
                special_contents = {_token_content(init_kwargs.get(k)) for k in SPECIAL_TOKEN_ATTRIBUTES}
                special_contents |= {_token_content(t) for t in init_kwargs.get("additional_special_tokens") or []}
                for content, index in _read_json(path, "added_tokens.json").items():
                    is_special = content in special_contents
                    added[int(index)] = AddedToken(content, special=is_special, normalized=not is_special)

        special_tokens: dict[str, str | None] = {}
        flags: dict[str, AddedToken] = {}
        for key in SPECIAL_TOKEN_ATTRIBUTES:
            if key in init_kwargs:
                value = init_kwargs.pop(key)
                special_tokens[key] = _token_content(value)
                if isinstance(value, Mapping):
                    flags[str(value["content"])] = AddedToken.from_json(value, special=True)
        additional: list[str] = []
        for value in init_kwargs.pop("additional_special_tokens", None) or []:
            content = _token_content(value)
            if content is not None and content not in additional:
                additional.append(content)
                if isinstance(value, Mapping):
                    flags[content] = AddedToken.from_json(value, special=True)
        return cls(path, str(tokenizer_class), init_kwargs, added, special_tokens, additional, flags)

    def require(self, *names: str) -> dict[str, Path]:
        """The paths of the files the tokenizer class needs; a clear error naming the missing ones."""
        missing = [name for name in names if not (self.folder / name).is_file()]
        if missing:
            raise CheckpointError(
                f"tokenizer in {self.folder} (tokenizer_class {self.tokenizer_class!r}) needs "
                f"{', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} missing"
            )
        return {name: self.folder / name for name in names}


# ---------------------------------------------------------------------------------------------------------
# The shared base
# ---------------------------------------------------------------------------------------------------------


class Tokenizer:
    """Base of the InternVL2 tokenizers: the public interface, padding, and the slow tokenizer's algorithm.

    Subclasses provide the model (``_tokenize``, ``_convert_token_to_id``, ``_convert_id_to_token``,
    ``convert_tokens_to_string``, ``vocab_size``, ``_base_vocab``). Use :meth:`from_pretrained` (or
    :class:`AutoTokenizer`), which picks the subclass from ``tokenizer_class``.
    """

    #: The official class's constructor defaults (special tokens and flags) when the config is silent.
    class_defaults: ClassVar[dict[str, Any]] = {}
    #: ``decode``'s default ``spaces_between_special_tokens`` (slow ``_decode``: True; Qwen2's decode: False).
    decode_spaces_between_special_tokens: ClassVar[bool] = True
    #: When not None, ``decode``'s default ``clean_up_tokenization_spaces`` regardless of the config (Qwen2).
    decode_clean_up_default: ClassVar[bool | None] = None

    padding_side: str
    model_max_length: int | None
    #: Set by :meth:`_refresh_tables` once the vocabulary is known.
    all_special_tokens: list[str]
    all_special_ids: list[int]

    def __init__(self, config: TokenizerConfig) -> None:
        self.config = config
        self.name_or_path = str(config.folder)
        self.tokenizer_class = config.tokenizer_class
        kwargs = dict(self.class_defaults)
        kwargs.update(config.init_kwargs)
        self.init_kwargs = kwargs
        self.padding_side = str(kwargs.get("padding_side", "right"))
        if self.padding_side not in ("left", "right"):
            raise CheckpointError(f"{config.folder}: padding_side must be 'left' or 'right', not {self.padding_side!r}")
        max_length = kwargs.get("model_max_length")
        self.model_max_length = int(max_length) if isinstance(max_length, (int, float)) else None
        # PreTrainedTokenizerBase pops clean_up_tokenization_spaces with a default of True.
        self.clean_up_tokenization_spaces = bool(kwargs.get("clean_up_tokenization_spaces", True))
        self.split_special_tokens = bool(kwargs.get("split_special_tokens", False))
        # Special tokens: the config's value when it names the attribute (even null), else the class default.
        self._special: dict[str, str | None] = {}
        for key in SPECIAL_TOKEN_ATTRIBUTES:
            if key in config.special_tokens:
                self._special[key] = config.special_tokens[key]
            else:
                self._special[key] = _token_content(self.class_defaults.get(key))
        self.additional_special_tokens: list[str] = list(config.additional_special_tokens)
        self._added_decoder: dict[int, AddedToken] = dict(config.added_tokens)
        self._added_encoder: dict[str, int] = {tok.content: idx for idx, tok in self._added_decoder.items()}
        self._split_pattern: re.Pattern[str] | None = None

    # -- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> Tokenizer:
        """Load the tokenizer of a checkpoint folder (class chosen by ``tokenizer_config.json``).

        ``trust_remote_code`` and ``use_fast`` are accepted and ignored (the behaviour is always the one of
        the official ``use_fast=False`` load); other keyword arguments override the config's keys, as in
        transformers (``padding_side='left'``, ``add_bos_token=False``...).
        """
        return load_tokenizer(path, **kwargs)

    def _finish_init(self) -> None:
        """Add special tokens missing from the added tokens, then cache the derived tables.

        Reproduces ``PreTrainedTokenizer.__init__``'s ``_add_tokens(all_special_tokens_extended, special=True)``:
        a special token already in the base vocabulary keeps its id, a new one gets the next free id.
        """
        base = self._base_vocab()
        next_id = len(set(base) | set(self._added_encoder))
        for content in self._all_special_tokens_uncached():
            if content in self._added_encoder or content == "":
                continue
            flags = self.config.special_token_flags.get(content, AddedToken(content, special=True, normalized=False))
            token = AddedToken(content, True, flags.lstrip, flags.rstrip, flags.single_word, flags.normalized)
            if content in base:
                index = base[content]
            else:
                index = next_id
                next_id += 1
            self._added_decoder[index] = token
            self._added_encoder[content] = index
        self._refresh_tables()

    def _refresh_tables(self) -> None:
        """Cache what derives from the (now fixed) vocabulary and added tokens."""
        self._len = len(set(self._base_vocab()) | set(self._added_encoder))
        self.all_special_tokens = self._all_special_tokens_uncached()
        # A special token unknown to a vocabulary without unk would give None here, as in transformers.
        self.all_special_ids = [self._token_to_id_or_none(t) for t in self.all_special_tokens]  # type: ignore[misc]
        self._all_special_token_set = frozenset(self.all_special_tokens)
        self._all_special_id_set = frozenset(i for i in self.all_special_ids if i is not None)
        # _decode: added tokens that are not special tokens, and additional special tokens outside the base
        # vocabulary, are decoded on their own (never merged with the surrounding byte/piece text).
        legacy = set(self._added_encoder) - set(self.all_special_tokens)
        for token in self.additional_special_tokens:
            index = self._token_to_id_or_none(token)
            if index is not None and index >= self.vocab_size:
                legacy.add(token)
        self._legacy_added_tokens = frozenset(legacy)
        contents = sorted((t for t in self._added_encoder if t), key=len, reverse=True)
        # One compiled alternation, longest first at each position: the leftmost-longest split of transformers'
        # Trie (the added tokens of these checkpoints never overlap, where the two could differ).
        self._split_pattern = re.compile("|".join(map(re.escape, contents))) if contents else None

    def _all_special_tokens_uncached(self) -> list[str]:
        """``all_special_tokens``: bos, eos, unk, sep, pad, cls, mask, then the additional ones, deduplicated."""
        seen: list[str] = []
        for key in SPECIAL_TOKEN_ATTRIBUTES:
            value = self._special.get(key)
            if value is not None and value not in seen:
                seen.append(value)
        for value in self.additional_special_tokens:
            if value not in seen:
                seen.append(value)
        return seen

    # -- model hooks (overridden) -------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary, without added tokens."""
        raise NotImplementedError

    def _base_vocab(self) -> dict[str, int]:
        """The base vocabulary, token -> id."""
        raise NotImplementedError

    def _tokenize(self, text: str) -> list[str]:
        """Tokens of a piece of text holding no added token."""
        raise NotImplementedError

    def _convert_token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def _convert_id_to_token(self, index: int) -> str:
        raise NotImplementedError

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Text of a run of tokens (no legacy added token inside)."""
        raise NotImplementedError

    def prepare_for_tokenization(self, text: str) -> str:
        """Hook applied to the whole text before splitting (Qwen2: NFC)."""
        return text

    def build_inputs_with_special_tokens(self, ids: list[int]) -> list[int]:
        """Add bos/eos around the ids (``add_bos_token``/``add_eos_token``; none by default)."""
        return list(ids)

    # -- special tokens -----------------------------------------------------------------------------------

    @property
    def bos_token(self) -> str | None:
        return self._special["bos_token"]

    @property
    def eos_token(self) -> str | None:
        return self._special["eos_token"]

    @property
    def unk_token(self) -> str | None:
        return self._special["unk_token"]

    @property
    def pad_token(self) -> str | None:
        return self._special["pad_token"]

    @property
    def bos_token_id(self) -> int | None:
        return self._token_to_id_or_none(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._token_to_id_or_none(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._token_to_id_or_none(self.unk_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._token_to_id_or_none(self.pad_token)

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        """The added tokens by id, sorted."""
        return dict(sorted(self._added_decoder.items()))

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        """The added tokens' ids by content."""
        return {tok.content: idx for idx, tok in sorted(self._added_decoder.items())}

    def get_vocab(self) -> dict[str, int]:
        """The whole vocabulary, base and added tokens, token -> id."""
        vocab = dict(self._base_vocab())
        vocab.update(self.added_tokens_encoder)
        return vocab

    def __len__(self) -> int:
        """Size of the vocabulary with the added tokens (distinct token strings, as transformers counts)."""
        return self._len

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(tokenizer_class={self.tokenizer_class!r}, path={self.name_or_path!r}, "
            f"vocab_size={self.vocab_size}, len={len(self)}, padding_side={self.padding_side!r})"
        )

    # -- token <-> id -------------------------------------------------------------------------------------

    def _token_to_id_or_none(self, token: str | None) -> int | None:
        """``_convert_token_to_id_with_added_voc``: added tokens first, then the model."""
        if token is None:
            return None
        index = self._added_encoder.get(token)
        if index is not None:
            return index
        return self._convert_token_to_id(token)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Ids of tokens; an unknown token gives the unk id (``None`` when there is no unk token)."""
        if isinstance(tokens, str):
            return self._token_to_id_or_none(tokens)
        return [self._token_to_id_or_none(token) for token in tokens]

    def _check_id(self, index: int) -> int:
        if index < 0 or (index >= self.vocab_size and index not in self._added_decoder):
            raise InvalidRequest(
                f"token id {index} is outside the vocabulary of the tokenizer in {self.name_or_path} "
                f"(base vocabulary {self.vocab_size}, {len(self)} with added tokens)"
            )
        return index

    def convert_ids_to_tokens(self, ids: Ids, skip_special_tokens: bool = False) -> str | list[str]:
        """Tokens of ids (a single id gives a single token); ``skip_special_tokens`` drops ``all_special_ids``."""
        if isinstance(ids, int) or (isinstance(ids, torch.Tensor) and ids.dim() == 0):
            index = self._check_id(int(ids))
            added = self._added_decoder.get(index)
            return added.content if added is not None else self._convert_id_to_token(index)
        tokens: list[str] = []
        for index in _as_id_list(ids):
            if skip_special_tokens and index in self._all_special_id_set:
                continue
            self._check_id(index)
            added = self._added_decoder.get(index)
            tokens.append(added.content if added is not None else self._convert_id_to_token(index))
        return tokens

    # -- encoding -----------------------------------------------------------------------------------------

    def _split_on_added_tokens(self, text: str) -> list[str]:
        """Cut the text at the added tokens, keeping them as separate pieces (no empty pieces)."""
        if self.split_special_tokens or self._split_pattern is None:
            return [text] if text else []
        pieces: list[str] = []
        position = 0
        for match in self._split_pattern.finditer(text):
            if match.start() > position:
                pieces.append(text[position : match.start()])
            pieces.append(match.group())
            position = match.end()
        if position < len(text):
            pieces.append(text[position:])
        return pieces

    def tokenize(self, text: str) -> list[str]:
        """``PreTrainedTokenizer.tokenize``: the text's tokens, added tokens kept whole."""
        text = self.prepare_for_tokenization(text)
        pieces = self._split_on_added_tokens(text)
        encoder = {} if self.split_special_tokens else self._added_encoder
        # PreTrainedTokenizer.tokenize: an added token with rstrip (lstrip) eats all the whitespace of the piece
        # on its right (left); single_word glues it to a neighbour that is not separated by a space. The pieces
        # are mutated in place while walking them, as there (a later piece is seen already stripped).
        for i, piece in enumerate(pieces):
            if piece not in encoder:
                continue
            token = self._added_decoder[encoder[piece]]
            left = pieces[i - 1] if i > 0 else None
            right = pieces[i + 1] if i < len(pieces) - 1 else None
            if token.rstrip and right:
                pieces[i + 1] = right.lstrip()
            if token.lstrip and left:
                pieces[i - 1] = left.rstrip()
            if token.single_word and left and left[-1] != " ":
                pieces[i - 1] += piece
                pieces[i] = ""
            elif token.single_word and right and right[0] != " ":
                pieces[i + 1] = piece + pieces[i + 1]
                pieces[i] = ""
        tokens: list[str] = []
        for piece in pieces:
            if not piece:  # fully stripped pieces vanish
                continue
            if piece in encoder:
                tokens.append(piece)
            else:
                tokens.extend(self._tokenize(piece))
        return tokens

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a text, with bos/eos as the checkpoint's flags say when ``add_special_tokens``."""
        if not isinstance(text, str):
            raise InvalidRequest(f"encode expects a string, got {type(text).__name__}")
        ids = [self._token_to_id_or_none(token) for token in self.tokenize(text)]
        if any(index is None for index in ids):
            raise InvalidRequest(
                f"the tokenizer in {self.name_or_path} has no unknown token and cannot encode {text!r}"
            )
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids  # type: ignore[arg-type]

    def __call__(
        self,
        text: str | Sequence[str],
        return_tensors: str | None = None,
        padding: bool | str = False,
        add_special_tokens: bool = True,
    ) -> BatchEncoding:
        """Encode one text or a batch: ``input_ids`` and ``attention_mask``.

        ``padding=True`` (or ``'longest'``) pads every row to the longest with ``pad_token_id`` on
        ``self.padding_side`` (mask 0 there). ``return_tensors='pt'`` gives ``torch.long`` tensors (a single
        text gets a batch axis of 1), as transformers does.
        """
        if return_tensors not in (None, "pt"):
            raise InvalidRequest(f"return_tensors must be None or 'pt', not {return_tensors!r}")
        if padding not in (False, True, "longest", "do_not_pad"):
            raise InvalidRequest(f"padding must be True, False, 'longest' or 'do_not_pad', not {padding!r}")
        single = isinstance(text, str)
        texts = [text] if single else list(text)  # type: ignore[list-item]
        rows = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        masks = [[1] * len(row) for row in rows]
        if padding in (True, "longest") and rows:
            rows, masks = self.pad(rows, masks)
        if return_tensors == "pt":
            if len({len(row) for row in rows}) > 1:
                raise InvalidRequest("sequences of different lengths cannot form a tensor: pass padding=True")
            width = len(rows[0]) if rows else 0
            return BatchEncoding(
                input_ids=torch.tensor(rows, dtype=torch.long).reshape(len(rows), width),
                attention_mask=torch.tensor(masks, dtype=torch.long).reshape(len(rows), width),
            )
        if single:
            return BatchEncoding(input_ids=rows[0], attention_mask=masks[0])
        return BatchEncoding(input_ids=rows, attention_mask=masks)

    def pad(self, rows: list[list[int]], masks: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
        """Pad rows (and their masks) to the longest with the pad id on ``padding_side``."""
        if self.padding_side not in ("left", "right"):
            raise InvalidRequest(f"padding_side must be 'left' or 'right', not {self.padding_side!r}")
        width = max((len(row) for row in rows), default=0)
        if all(len(row) == width for row in rows):
            return rows, masks
        pad_id = self.pad_token_id
        if pad_id is None:
            raise InvalidRequest(f"the tokenizer in {self.name_or_path} has no pad token and cannot pad")
        out_rows, out_masks = [], []
        for row, mask in zip(rows, masks):
            missing = width - len(row)
            if self.padding_side == "left":
                out_rows.append([pad_id] * missing + row)
                out_masks.append([0] * missing + mask)
            else:
                out_rows.append(row + [pad_id] * missing)
                out_masks.append(mask + [0] * missing)
        return out_rows, out_masks

    # -- decoding -----------------------------------------------------------------------------------------

    def decode(
        self,
        ids: Ids,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        spaces_between_special_tokens: bool | None = None,
    ) -> str:
        """Text of token ids (a list, a 1-D tensor or one id), as the official slow ``decode``.

        ``PreTrainedTokenizer._decode``: ``all_special_ids`` are dropped when ``skip_special_tokens``; a legacy
        added token stands alone between runs of ordinary tokens, each run turned into text by the model
        (empty runs before a legacy token are dropped); the parts are joined with a space when
        ``spaces_between_special_tokens`` (class default), then cleaned up when ``clean_up_tokenization_spaces``
        (class default or the config's flag).
        """
        tokens = self.convert_ids_to_tokens(_as_id_list(ids), skip_special_tokens=skip_special_tokens)
        sub_texts: list[str] = []
        current: list[str] = []
        for token in tokens:
            if token in self._legacy_added_tokens:
                if current:
                    string = self.convert_tokens_to_string(current)
                    if string:
                        sub_texts.append(string)
                    current = []
                sub_texts.append(token)
            else:
                current.append(token)
        if current:
            sub_texts.append(self.convert_tokens_to_string(current))
        if spaces_between_special_tokens is None:
            spaces_between_special_tokens = self.decode_spaces_between_special_tokens
        text = (" " if spaces_between_special_tokens else "").join(sub_texts)
        return self._maybe_clean_up(text, clean_up_tokenization_spaces)

    def _maybe_clean_up(self, text: str, clean_up_tokenization_spaces: bool | None) -> str:
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.decode_clean_up_default
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def batch_decode(
        self, sequences: Iterable[Ids] | torch.Tensor, skip_special_tokens: bool = False, **kwargs: Any
    ) -> list[str]:
        """:meth:`decode` of every row of a 2-D tensor or a list of id lists."""
        if isinstance(sequences, torch.Tensor):
            if sequences.dim() != 2:
                raise InvalidRequest(f"batch_decode expects a 2-D tensor, got shape {tuple(sequences.shape)}")
            sequences = sequences.tolist()
        return [self.decode(row, skip_special_tokens=skip_special_tokens, **kwargs) for row in sequences]


def _as_id_list(ids: Any) -> list[int]:
    """Ids given as an int, a list/tuple, a tensor (0-D or 1-D) or a numpy array, as a list of ints."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1:
            raise InvalidRequest(f"expected a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
        return [int(i) for i in ids.reshape(-1).tolist()]
    if hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    out: list[int] = []
    for index in ids:
        if isinstance(index, bool) or not isinstance(index, int):
            try:
                index = int(index)
            except (TypeError, ValueError):
                raise InvalidRequest(f"token ids must be integers, got {index!r}") from None
        out.append(index)
    return out


# ---------------------------------------------------------------------------------------------------------
# Byte-level BPE (slow Qwen2Tokenizer)
# ---------------------------------------------------------------------------------------------------------


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
    return dict(zip(printable, map(chr, codes)))


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


# ---------------------------------------------------------------------------------------------------------
# SentencePiece (InternLM2Tokenizer, LlamaTokenizer)
# ---------------------------------------------------------------------------------------------------------

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
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        if None in bos or None in eos:
            raise CheckpointError(f"{self.name_or_path}: add_bos_token/add_eos_token is set but the token is missing")
        return bos + list(ids) + eos  # type: ignore[operator]

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


# ---------------------------------------------------------------------------------------------------------
# tokenizer.json (PreTrainedTokenizerFast)
# ---------------------------------------------------------------------------------------------------------


class FastJsonTokenizer(Tokenizer):
    """``PreTrainedTokenizerFast``: a ``tokenizer.json`` run by the ``tokenizers`` library (Llama-3, 76B).

    transformers uses the library for everything here: added tokens, the post-processor (which adds
    ``<|begin_of_text|>``), and decoding (special tokens skipped by the library's ``special`` flag), then
    ``clean_up_tokenization`` when ``clean_up_tokenization_spaces`` (true in the 76B config).
    """

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


# ---------------------------------------------------------------------------------------------------------
# Class registry and AutoTokenizer
# ---------------------------------------------------------------------------------------------------------

#: ``tokenizer_class`` -> the class reproducing it.
_REGISTRY: dict[str, type[Tokenizer]] = {
    "Qwen2Tokenizer": BPETokenizer,
    "InternLM2Tokenizer": InternLM2Tokenizer,
    "LlamaTokenizer": LlamaTokenizer,
    "PreTrainedTokenizerFast": FastJsonTokenizer,
}


def load_tokenizer(path: str | os.PathLike[str], **kwargs: Any) -> Tokenizer:
    """Build the tokenizer of a checkpoint folder from its ``tokenizer_config.json``'s ``tokenizer_class``."""
    config = TokenizerConfig.from_folder(path, kwargs)
    tokenizer_type = _REGISTRY.get(config.tokenizer_class)
    if tokenizer_type is None:
        raise CheckpointError(
            f"{config.folder / 'tokenizer_config.json'}: unsupported tokenizer_class "
            f"{config.tokenizer_class!r}; supported: {', '.join(sorted(_REGISTRY))}"
        )
    return tokenizer_type(config)


class AutoTokenizer:
    """Drop-in for ``transformers.AutoTokenizer`` as the InternVL code calls it."""

    def __init__(self) -> None:
        raise TypeError("use AutoTokenizer.from_pretrained(path)")

    @staticmethod
    def from_pretrained(
        path: str | os.PathLike[str], trust_remote_code: bool = False, use_fast: bool = False, **kwargs: Any
    ) -> Tokenizer:
        """Load the tokenizer of a checkpoint folder; ``trust_remote_code``/``use_fast`` are ignored.

        No code of the folder is ever run, and the behaviour is always the official ``use_fast=False`` one.
        """
        del trust_remote_code, use_fast
        return load_tokenizer(path, **kwargs)

