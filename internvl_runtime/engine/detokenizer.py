"""Incremental detokenization with stop strings, one instance per request (pure Python).

Each step decodes only a small window of recent tokens (vLLM's prefix_offset / read_offset scheme),
never the whole sequence:

* ``decode(ids[prefix_offset:read_offset])`` is the text already emitted from that window and
  ``decode(ids[prefix_offset:])`` the text with the new tokens; the difference is the new text. The
  leading context token(s) make a sentencepiece word-initial space come out (a lone ``▁Hello`` decodes
  to ``Hello``; after a context token it is `` Hello``). The first window starts with up to 5 prompt
  tokens, so the first output token gets the same treatment as in ``decode(prompt + output)``.
* Text whose decode ends in U+FFFD is held back: a byte-level BPE token can carry part of a UTF-8
  character, completed by a later token.
* Text ending in whitespace, or in the start of one of transformers' ``clean_up_tokenization`` patterns
  (`` n't``, `` 's``, ...), is held back until a later token follows it: with
  ``clean_up_tokenization_spaces`` a later `` .`` or ``'t`` removes the space, and a legacy Llama decode
  (40B) strips the leading spaces of a window that starts with bare ``▁`` tokens, so such text is not
  final yet and must not start a window. Should a window's context still decode to blank text, it is
  widened backwards by a few tokens.
* The last ``len(longest stop string) - 1`` characters are held back so that a stop string split across
  tokens is caught before any of it is emitted.

Example::

    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop=["\\n\\n"])
    for token in generated:
        delta = detok.add([token])       # stream delta to the client
        if detok.stopped_by is not None:
            break                        # and tell the scheduler: finish(seq, "stop", detok.stopped_by)
    delta = detok.flush()                # at the end: whatever was still held back
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Sequence as SequenceABC
from typing import Protocol

_CONTEXT_TOKENS = 5  # prompt tokens decoded as context before the first output token (as vLLM)
_MAX_WINDOW_WIDENING = 8  # tokens a blank window context may be widened by
# transformers' clean_up_tokenization removes the space of " n't", " 'm", " 's", " 've", " 're", " ' " and
# " ." " ?" " !" " ,": text ending in whitespace or in one of these unfinished heads may still change.
_CLEAN_UP_HEADS = (" n", " n'", " '", " 'v", " 'r")
_UNSTABLE_TAILS = tuple(sorted((" ", *_CLEAN_UP_HEADS), key=len, reverse=True))
_REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    """The part of the tokenizer the detokenizer uses."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str:
        """Text of ``ids``."""
        ...


class IncrementalDetokenizer:
    """Turns generated token ids into final text deltas, cutting at the first stop string.

    Args:
        tokenizer: anything with ``decode(ids, skip_special_tokens=...)``.
        prompt_token_ids: the prompt; only its last few tokens are kept, as decoding context.
        skip_special_tokens: passed to ``decode``.
        special_tokens: the text of each special token id. With ``skip_special_tokens=False`` they are given
            verbatim, and the text between them is decoded run by run, as Hugging Face's fast tokenizers do:
            a slow-tokenizer decode puts spaces around special tokens that depend on where a window starts,
            which would break the window arithmetic (InternLM2's tool-call tags are special tokens).
        stop: stop strings; the output ends before the earliest occurrence of any of them.
        include_stop_str: keep the stop string at the end of the output.

    With prompt context a first token ``▁Paris`` comes out as `` Paris``, as in ``decode(prompt + output)``
    (vLLM's behaviour). The reference ``chat()`` decodes the generated ids alone (``Paris``); pass
    ``prompt_token_ids=[]`` to get exactly ``decode(output_ids)``.

    Stop strings are also searched in the text still held back (an unfinished character excepted), so a
    stop string ending in whitespace (``"\\n\\n"``) is caught on the token that completes it.

    Attributes:
        stopped_by: the stop string that ended the output, or None.
    """

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: SequenceABC[int],
        *,
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
        include_stop_str: bool = False,
        special_tokens: Mapping[int, str] | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._special = dict(special_tokens or {}) if not skip_special_tokens else {}
        self._stop = [s for s in stop if s]
        self._include_stop_str = include_stop_str
        self._max_stop_len = max((len(s) for s in self._stop), default=0)
        # With include_stop_str the text before a stop string is emitted anyway: nothing to hold back.
        self._hold = 0 if include_stop_str else max(self._max_stop_len - 1, 0)
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:]) if prompt_token_ids else []
        self._num_context = len(context)
        self._ids: list[int] = context  # context + output ids
        self._prefix_offset = 0  # window start: context tokens whose text is already accounted for
        self._read_offset = len(context)  # tokens before this are decoded into _decoded
        self._decoded = ""  # final text of ids[:_read_offset] (output part), held-back text included
        self._pending = ""  # tentative text of ids[_read_offset:] (not final yet)
        self._emitted = 0  # characters of _decoded returned to the caller
        self._searched = 0  # len(_decoded) at the last stop-string search
        self.stopped_by: str | None = None

    @property
    def text(self) -> str:
        """The text returned so far (the concatenation of every delta)."""
        return self._decoded[: self._emitted]

    @property
    def token_ids(self) -> list[int]:
        """The output token ids added so far."""
        return self._ids[self._num_context :]

    def add(self, token_ids: Iterable[int]) -> str:
        """Add generated tokens; return the new final text (possibly empty).

        After a stop string was found, further tokens are ignored and "" is returned.
        """
        if self.stopped_by is not None:
            return ""
        for token_id in token_ids:
            self._ids.append(token_id)
            self._decode_window(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """End of generation: decode what was held back (even an incomplete character) and return it."""
        if self.stopped_by is not None:
            return ""
        self._decode_window(final=True)
        return self._release(final=True)

    def _decode(self, start: int, end: int | None = None) -> str:
        ids = self._ids[start:end]
        if not self._special or not any(i in self._special for i in ids):
            return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
        parts: list[str] = []
        run: list[int] = []
        for token_id in [*ids, -1]:
            text = self._special.get(token_id)
            if text is None and token_id != -1:
                run.append(token_id)
                continue
            if run:
                parts.append(self._tokenizer.decode(run, skip_special_tokens=True))
                run = []
            if text is not None:
                parts.append(text)
        return "".join(parts)

    def _decode_window(self, *, final: bool) -> None:
        if self._read_offset == len(self._ids):
            return
        start, read = self._prefix_offset, self._read_offset
        prefix_text = self._decode(start, read)
        while not prefix_text.strip() and start > 0 and read - start < _MAX_WINDOW_WIDENING:
            start -= 1  # blank context cannot anchor the decode: widen it
            prefix_text = self._decode(start, read)
        self._prefix_offset = start
        new_text = self._decode(start)
        delta = new_text[len(prefix_text) :]
        unfinished = (
            not delta
            or new_text.endswith(_REPLACEMENT_CHAR)
            or new_text[-1].isspace()
            or new_text.endswith(_CLEAN_UP_HEADS)
        )
        if unfinished and not final:
            self._pending = delta
            return
        self._decoded += delta
        self._pending = ""
        self._prefix_offset, self._read_offset = read, len(self._ids)

    def _searchable_pending(self) -> str:
        """The held-back text that will not change: without an unfinished character at its end, nor a
        trailing space (or clean-up pattern head) that a later token may still remove."""
        tentative = self._pending.rstrip(_REPLACEMENT_CHAR)
        for head in _UNSTABLE_TAILS:
            if tentative.endswith(head):
                return tentative[: -len(head)]
        return tentative

    def _release(self, *, final: bool) -> str:
        if self._stop:
            text = self._decoded + self._searchable_pending()
            # A stop string not found before must end in text not searched yet.
            start = max(0, self._searched - self._max_stop_len + 1)
            self._searched = len(self._decoded)
            found = [(i, s) for s in self._stop if (i := text.find(s, start)) >= 0]
            if found:
                position, stop = min(found, key=lambda f: f[0])
                self.stopped_by = stop
                cut = position + len(stop) if self._include_stop_str else position
                self._decoded, self._pending = text[:cut], ""
                delta, self._emitted = text[self._emitted : cut], cut
                return delta
        limit = len(self._decoded) if final else max(len(self._decoded) - self._hold, self._emitted)
        delta, self._emitted = self._decoded[self._emitted : limit], limit
        return delta
