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

Beyond encoding and decoding, every tokenizer has transformers' ``apply_chat_template`` (the checkpoint's
``chat_template``, rendered in the same sandbox as ``--chat-template``: ``templating``) and ``save_pretrained``
(a folder that ours and transformers' ``AutoTokenizer`` load back into the same tokenizer: ``saving``). The
InternVL chat API takes a tokenizer by duck typing, so transformers' own tokenizer works there too.
"""

from __future__ import annotations

import os
from typing import Any

from .base import BatchEncoding, Tokenizer, clean_up_tokenization
from .bpe import BPETokenizer
from .config import AddedToken, TokenizerConfig
from .fast import FastJsonTokenizer
from .sentencepiece import InternLM2Tokenizer, LlamaTokenizer, SentencePieceTokenizer

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
    "TokenizerConfig",
    "clean_up_tokenization",
    "load_tokenizer",
]


def load_tokenizer(path: str | os.PathLike[str], **kwargs: Any) -> Tokenizer:
    """Build the tokenizer of a checkpoint folder (or hub id) from its ``tokenizer_config.json``'s
    ``tokenizer_class``."""
    return Tokenizer.from_pretrained(path, **kwargs)


class AutoTokenizer:
    """Drop-in for ``transformers.AutoTokenizer`` as the InternVL code calls it."""

    def __init__(self) -> None:
        raise TypeError("use AutoTokenizer.from_pretrained(path)")

    @staticmethod
    def from_pretrained(
        path: str | os.PathLike[str], trust_remote_code: bool = False, use_fast: bool = False, **kwargs: Any
    ) -> Tokenizer:
        """Load the tokenizer of a checkpoint folder or Hugging Face Hub id; ``trust_remote_code``/``use_fast``
        are ignored.

        A hub id fetches only the tokenizer's files, with transformers' keywords ``revision``, ``cache_dir``,
        ``token``, ``local_files_only`` (``Tokenizer.from_pretrained``). No code of the folder is ever run, and
        the behaviour is always the official ``use_fast=False`` one.
        """
        del trust_remote_code, use_fast
        return load_tokenizer(path, **kwargs)
