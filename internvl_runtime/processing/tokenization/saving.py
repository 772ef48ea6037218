"""``Tokenizer.save_pretrained``: the tokenizer's files, as transformers 4.37 writes them.

The folder written loads back (with our ``AutoTokenizer`` and with transformers') into the same tokenizer:
same ids, same special and added tokens with their flags, same settings. It holds:

* ``tokenizer_config.json``: the loaded config's keys with the tokenizer's current values where it has one
  (``padding_side``, ``model_max_length``, ``add_bos_token``...), the special tokens, ``added_tokens_decoder``
  (every added token with its flags), ``tokenizer_class`` and ``chat_template``;
* ``special_tokens_map.json`` and, for the slow classes, ``added_tokens.json`` (the added tokens past the base
  vocabulary), for older readers;
* the model's own files (``vocab.json`` + ``merges.txt``, ``tokenizer.model`` or ``tokenizer.json``), copied
  byte for byte from the folder the tokenizer was loaded from (nothing can change them after loading), and
  the ``auto_map`` code files when that folder has them, so that ``trust_remote_code`` loads still work.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Protocol

from internvl_runtime.errors import CheckpointError, InvalidRequest

from .config import SPECIAL_TOKEN_ATTRIBUTES, AddedToken, TokenizerConfig


class SavableTokenizer(Protocol):
    """What saving needs from a tokenizer (``base.Tokenizer``, which imports this module)."""

    config: TokenizerConfig
    tokenizer_class: str
    additional_special_tokens: list[str]
    vocab_files: ClassVar[tuple[str, ...]]
    saves_added_tokens_file: ClassVar[bool]

    @property
    def special_token_values(self) -> Mapping[str, str | None]: ...

    @property
    def special_tokens_map(self) -> dict[str, str | list[str]]: ...

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]: ...

    @property
    def chat_template(self) -> str | dict[str, str] | None: ...

    @property
    def vocab_size(self) -> int: ...

#: Attributes transformers saves with their current value (besides the config's own keys that are attributes).
_ALWAYS_SAVED = ("model_max_length", "clean_up_tokenization_spaces", "padding_side")
#: Attributes of our tokenizers that mirror a config key of the same name.
_ATTRIBUTE_KEYS = (*_ALWAYS_SAVED, "add_bos_token", "add_eos_token", "legacy", "split_special_tokens", "errors")


def tokenizer_config(tokenizer: SavableTokenizer) -> dict[str, Any]:
    """The ``tokenizer_config.json`` that reloads into ``tokenizer`` (see the module docstring)."""
    config: dict[str, Any] = dict(tokenizer.config.init_kwargs)
    for key in _ATTRIBUTE_KEYS:
        if (key in config or key in _ALWAYS_SAVED) and getattr(tokenizer, key, None) is not None:
            config[key] = getattr(tokenizer, key)
    for key in SPECIAL_TOKEN_ATTRIBUTES:
        value = tokenizer.special_token_values.get(key)
        # A token the config set to null stays null; a class default that is not None is written out.
        if value is not None or key in tokenizer.config.special_tokens:
            config[key] = value
    if tokenizer.additional_special_tokens:
        config["additional_special_tokens"] = list(tokenizer.additional_special_tokens)
    config["added_tokens_decoder"] = {
        str(index): {
            "content": token.content,
            "lstrip": token.lstrip,
            "normalized": token.normalized,
            "rstrip": token.rstrip,
            "single_word": token.single_word,
            "special": token.special,
        }
        for index, token in sorted(tokenizer.added_tokens_decoder.items())
    }
    chat_template = tokenizer.chat_template
    if isinstance(chat_template, dict):
        config["chat_template"] = [{"name": name, "template": text} for name, text in chat_template.items()]
    elif chat_template is not None:
        config["chat_template"] = chat_template
    config["tokenizer_class"] = tokenizer.tokenizer_class
    return config


def _write_json(path: Path, value: Any) -> None:
    try:
        text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    except TypeError as exc:
        raise InvalidRequest(f"cannot save {path.name}: a setting is not JSON-serializable ({exc})") from None
    path.write_text(text, encoding="utf-8")


def save_tokenizer(tokenizer: SavableTokenizer, save_directory: str | os.PathLike[str],
                   filename_prefix: str | None = None) -> tuple[str, ...]:
    """Write the tokenizer's files into ``save_directory`` (created if needed); the paths written.

    ``filename_prefix`` prefixes the two JSON config files and ``added_tokens.json``, as in transformers (a
    folder saved with a prefix is not loadable by ``from_pretrained``, there as here).
    """
    folder = Path(save_directory)
    if folder.is_file():
        raise InvalidRequest(f"save_pretrained needs a directory, but {folder} is a file")
    folder.mkdir(parents=True, exist_ok=True)
    prefix = f"{filename_prefix}-" if filename_prefix else ""
    written: list[Path] = []

    config_path = folder / f"{prefix}tokenizer_config.json"
    _write_json(config_path, tokenizer_config(tokenizer))
    written.append(config_path)

    special_map: dict[str, Any] = dict(tokenizer.special_tokens_map)
    map_path = folder / f"{prefix}special_tokens_map.json"
    _write_json(map_path, special_map)
    written.append(map_path)

    if tokenizer.saves_added_tokens_file:
        beyond = {tok.content: index for index, tok in sorted(tokenizer.added_tokens_decoder.items())
                  if index >= tokenizer.vocab_size}
        if beyond:
            added_path = folder / f"{prefix}added_tokens.json"
            _write_json(added_path, beyond)
            written.append(added_path)

    source = tokenizer.config.folder
    auto_map = tokenizer.config.init_kwargs.get("auto_map") or {}
    code_files = []
    for reference in auto_map.get("AutoTokenizer", []) if isinstance(auto_map, dict) else []:
        if isinstance(reference, str) and "." in reference and "--" not in reference:
            code_files.append(reference.rsplit(".", 1)[0] + ".py")
    for name in (*tokenizer.vocab_files, *code_files):
        origin, target = source / name, folder / name
        if not origin.is_file():
            if name in tokenizer.vocab_files:
                raise CheckpointError(f"cannot save the tokenizer: {origin}, which it was loaded from, is gone")
            continue  # a code file the checkpoint folder never had
        if origin.resolve() != target.resolve():
            shutil.copyfile(origin, target)
        written.append(target)
    return tuple(str(path) for path in written)
