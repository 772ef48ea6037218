"""The shared base of the tokenizers: added-token splitting, the encode/decode/batch API and :class:`BatchEncoding`.

:class:`Tokenizer` reproduces ``PreTrainedTokenizer``'s algorithm; the subclasses (``bpe``, ``sentencepiece``,
``fast``) provide the model.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, TypeAlias, overload

import torch

from internvl_runtime.errors import CheckpointError, InvalidRequest, UnsupportedFeature
from internvl_runtime.hub import HubOptions, resolve_checkpoint

from .config import SPECIAL_TOKEN_ATTRIBUTES, AddedToken, TokenizerConfig, _token_content
from .saving import save_tokenizer
from .templating import is_batch, render_chat, template_from_config

Ids: TypeAlias = int | Sequence[int] | torch.Tensor


class BatchEncoding(dict[str, Any]):
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


class Tokenizer:
    """Base of the InternVL2 tokenizers: the public interface, padding, and the slow tokenizer's algorithm.

    Subclasses provide the model (``_tokenize``, ``_convert_token_to_id``, ``_convert_id_to_token``,
    ``convert_tokens_to_string``, ``vocab_size``, ``_base_vocab``). Use :meth:`from_pretrained` (or
    :class:`AutoTokenizer`), which picks the subclass from ``tokenizer_class``.
    """

    #: The official class's constructor defaults (special tokens and flags) when the config is silent.
    #: The transformers class this one reproduces (``tokenizer_config.json``'s ``tokenizer_class``), if any.
    reproduces: ClassVar[str | None] = None
    class_defaults: ClassVar[dict[str, Any]] = {}
    #: ``decode``'s default ``spaces_between_special_tokens`` (slow ``_decode``: True; Qwen2's decode: False).
    decode_spaces_between_special_tokens: ClassVar[bool] = True
    #: When not None, ``decode``'s default ``clean_up_tokenization_spaces`` regardless of the config (Qwen2).
    decode_clean_up_default: ClassVar[bool | None] = None
    #: The model's own files in a checkpoint folder, copied by :meth:`save_pretrained`.
    vocab_files: ClassVar[tuple[str, ...]] = ()
    #: Whether :meth:`save_pretrained` writes ``added_tokens.json`` (the slow classes do, the fast one not).
    saves_added_tokens_file: ClassVar[bool] = True

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
        #: ``tokenizer_config.json``'s ``chat_template`` (named templates as a dict), settable as in transformers.
        self.chat_template: str | dict[str, str] | None = template_from_config(kwargs.get("chat_template"))

    # -- construction -------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, revision: str | None = None,
                        cache_dir: str | os.PathLike[str] | None = None, token: str | bool | None = None,
                        local_files_only: bool = False, **kwargs: Any) -> Tokenizer:
        """Load the tokenizer of a checkpoint folder (class chosen by ``tokenizer_config.json``).

        ``path`` may be a Hugging Face Hub id: only its tokenizer files are fetched into the hub's cache
        (``revision``, ``cache_dir``, ``token``, ``local_files_only`` as in transformers; ``hub.HubOptions``).
        ``trust_remote_code`` and ``use_fast`` are accepted and ignored (the behaviour is always the one of
        the official ``use_fast=False`` load); other keyword arguments override the config's keys, as in
        transformers (``padding_side='left'``, ``add_bos_token=False``...).
        """
        options = HubOptions(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
        folder = resolve_checkpoint(path, options, files="tokenizer")
        config = TokenizerConfig.from_folder(folder, kwargs)
        return tokenizer_class_for(config)(config)

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
    def special_token_values(self) -> dict[str, str | None]:
        """Every special-token attribute (``bos_token``... ``mask_token``) with its value, None when unset."""
        return dict(self._special)

    @property
    def special_tokens_map(self) -> dict[str, str | list[str]]:
        """The special tokens that are set, by attribute name (and ``additional_special_tokens``), as in
        transformers."""
        out: dict[str, str | list[str]] = {key: value for key in SPECIAL_TOKEN_ATTRIBUTES
                                           if (value := self._special.get(key)) is not None}
        if self.additional_special_tokens:
            out["additional_special_tokens"] = list(self.additional_special_tokens)
        return out

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

    # A str is also a Sequence[str]: the first overload wins for it, as at run time (typeshed's usual ignore).
    @overload
    def convert_tokens_to_ids(self, tokens: str) -> int | None: ...  # type: ignore[overload-overlap]

    @overload
    def convert_tokens_to_ids(self, tokens: Sequence[str]) -> list[int | None]: ...

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int | None] | None:
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
        ids = []
        for token in self.tokenize(text):
            index = self._token_to_id_or_none(token)
            if index is None:
                raise InvalidRequest(
                    f"the tokenizer in {self.name_or_path} has no unknown token and cannot encode {text!r}"
                )
            ids.append(index)
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

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
        texts = [text] if isinstance(text, str) else list(text)
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
        for row, mask in zip(rows, masks, strict=True):
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

    # -- chat template and saving ---------------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation: Any,
        tools: Sequence[Any] | None = None,
        documents: Sequence[Any] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """transformers' ``apply_chat_template`` with the checkpoint's ``chat_template`` (``templating``).

        ``conversation`` is a list of ``{"role", "content"}`` dicts, or a list of such lists (a batch: a list
        of results). Returns the prompt text when ``tokenize=False``; else its ids (``add_special_tokens=False``:
        the template writes the bos token), as a ``(batch, length)`` tensor with ``return_tensors='pt'``, or the
        whole :class:`BatchEncoding` with ``return_dict``. ``tools``/``documents`` and every other keyword reach
        the template as variables. ``truncation``/``max_length`` are not supported (the prompt is never cut).
        """
        if truncation or max_length is not None:
            raise UnsupportedFeature("apply_chat_template does not truncate: drop truncation/max_length")
        template_kwargs = dict(kwargs)
        if documents is not None:
            template_kwargs["documents"] = list(documents)
        batched = is_batch(conversation)
        conversations = list(conversation) if batched else [conversation]
        rendered = [
            render_chat(self, chat, tools=tools, chat_template=chat_template,
                        add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                        template_kwargs=template_kwargs)
            for chat in conversations
        ]
        if not tokenize:
            return rendered if batched else rendered[0]
        encoded = self(rendered if batched else rendered[0], return_tensors=return_tensors, padding=padding,
                       add_special_tokens=False, **(tokenizer_kwargs or {}))
        return encoded if return_dict else encoded["input_ids"]

    def save_pretrained(self, save_directory: str | os.PathLike[str], legacy_format: bool | None = None,
                        filename_prefix: str | None = None, push_to_hub: bool = False,
                        **kwargs: Any) -> tuple[str, ...]:
        """Write the tokenizer's files into a folder that :meth:`from_pretrained` (ours or transformers')
        loads back into the same tokenizer; returns the paths written (``saving``).

        ``legacy_format`` is accepted (both formats are written); ``push_to_hub`` is not supported.
        """
        del legacy_format, kwargs
        if push_to_hub:
            raise UnsupportedFeature("save_pretrained(push_to_hub=True) is not supported: upload the folder")
        return save_tokenizer(self, save_directory, filename_prefix)


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


def tokenizer_class_for(config: TokenizerConfig) -> type[Tokenizer]:
    """The class reproducing ``config.tokenizer_class``: the subclass of :class:`Tokenizer` whose
    ``reproduces`` names it (every subclass is defined once the package is imported)."""
    classes = {}
    pending = list(Tokenizer.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.reproduces:
            classes[cls.reproduces] = cls
    tokenizer_type = classes.get(config.tokenizer_class)
    if tokenizer_type is None:
        found = f"unsupported tokenizer_class {config.tokenizer_class!r}" if config.tokenizer_class else \
            "no 'tokenizer_class'"
        raise CheckpointError(f"{config.folder / 'tokenizer_config.json'}: {found}; supported: "
                              f"{', '.join(sorted(classes))}")
    return tokenizer_type
