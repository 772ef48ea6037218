"""What a checkpoint folder says about its tokenizer: ``tokenizer_config.json`` and the older special-token files.

:class:`TokenizerConfig` reads them as transformers 4.37 does (``_from_pretrained``); :class:`AddedToken` carries
the flags of one added token.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from internvl_runtime.errors import CheckpointError

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
        tokenizer_class = init_kwargs.pop("tokenizer_class", None) or ""   # "" -> refused by the dispatcher

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
