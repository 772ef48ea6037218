"""Structured output: a :class:`StructuredOutput` compiled by llguidance into token masks.

The grammar engine is llguidance (chosen by measuring against xgrammar: ``benchmarks/structured_output.py``
and the "Structured output" section of ``benchmarks/RESULTS.md``; it has no Python dependency, where
xgrammar pulls transformers and triton). This module is the only one that imports it.

* :func:`token_bytes` reads each token's bytes from OUR tokenizer (byte-level BPE or sentencepiece), so the
  grammar engine sees exactly the vocabulary the model samples from; added tokens are special (a grammar
  never produces them) and the template's stop ids are the grammar's EOS.
* :class:`StructuredOutputBackend` compiles a constraint into a grammar (JSON compact: no free whitespace,
  ``,`` and ``:`` separators, so that even a random model's output ends and parses), keeps a bounded LRU
  cache of compiled matchers (a new request copies one), and fills the bitmasks of a batch's constrained
  rows in one call (llguidance's thread pool, GIL released).
* :class:`GrammarMatcher` is one request's parser state: created at ``add_request``, advanced with each
  sampled token, freed with the request.
* :func:`apply_token_bitmask` sets the disallowed logits of the constrained rows to -inf (torch ops, on the
  logits' device).

Example::

    backend = StructuredOutputBackend(tokenizer, stop_token_ids=[151645], vocab_size=151655)
    matcher = backend.matcher(StructuredOutput(choice=("yes", "no")))    # InvalidRequest if it does not compile
    bitmask = backend.fill_bitmask([matcher])                            # (1, ceil(V / 32)) int32
    apply_token_bitmask(logits[:1], bitmask)
    matcher.accept(token)                                                # False: the grammar rejects it
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import llguidance
import llguidance.numpy  # not llguidance.torch: it imports torch.compile (~200 MB resident, seconds)
import numpy as np
import torch

from ..errors import InvalidRequest
from ..processing.structured_output import StructuredOutput, TaggedJSON
from ..processing.tokenization import SentencePieceTokenizer, Tokenizer
from ..processing.tokenization.bpe import bytes_to_unicode

__all__ = ["GrammarMatcher", "StructuredOutputBackend", "apply_token_bitmask", "compile_grammar", "token_bytes",
           "unpack_bitmask"]

JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
"""llguidance's JSON options for every schema: compact separators and no free whitespace (vLLM's
``any_whitespace=False``): a random model would otherwise fill the output with whitespace runs."""

DEFAULT_CACHE_SIZE = 256
"""Compiled constraints kept (least recently used dropped first)."""

CLOSING_BYTES = frozenset(b"}]")
"""Bytes that close a JSON object or array: with a leading ``"`` (which closes a string), the end game's choice."""

ENDGAME_MARGIN = 16
"""Tokens added to a constraint's shortest completion to decide when its end game starts."""

MAX_SIMULATED_TOKENS = 256
"""The longest shortest-completion the end game is sized from; longer (or endless) ones use this."""

_BYTE_DECODER = {char: byte for byte, char in bytes_to_unicode().items()}


def token_bytes(tokenizer: Tokenizer) -> tuple[list[bytes], list[int]]:
    """Every token id's bytes, and the ids of the special (added) tokens, read from ``tokenizer``.

    Byte-level BPE tokens (Qwen2, Llama-3) map each character back through GPT-2's byte alphabet;
    sentencepiece tokens (InternLM2, Phi-3, Yi) turn ``▁`` into a space and ``<0xAB>`` into that byte.
    Added tokens (``<|im_end|>``, ``<IMG_CONTEXT>``...) are special: a grammar never emits them (except
    the EOS ids given to :class:`StructuredOutputBackend`).
    """
    added = tokenizer.added_tokens_decoder
    sentencepiece = isinstance(tokenizer, SentencePieceTokenizer)
    tokens: list[bytes] = []
    for index in range(len(tokenizer)):
        if index in added:
            tokens.append(added[index].content.encode("utf-8"))
            continue
        try:
            piece = tokenizer.convert_ids_to_tokens(index)
        except InvalidRequest:  # a hole in the vocabulary: a token no text is made of
            tokens.append(b"")
            continue
        assert isinstance(piece, str)
        if sentencepiece:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                tokens.append(bytes([int(piece[3:5], 16)]))
            else:
                tokens.append(piece.replace("\u2581", " ").encode("utf-8"))
        else:
            data = bytearray()
            for char in piece:
                byte = _BYTE_DECODER.get(char)
                data.extend(char.encode("utf-8") if byte is None else (byte,))
            tokens.append(bytes(data))
    return tokens, sorted(added)


class _TokenizerAdapter:
    """What ``llguidance.TokenizerWrapper`` reads: the token bytes, the EOS and special ids, and a callable
    that tokenizes text. llguidance allows exactly that tokenization of the text a grammar forces (the
    ``{`` a JSON value starts with), so its tokens' bytes must be the text's and nothing more, and none of them
    special (the text ``<ref>`` is not the special token ``<ref>``): sentencepiece
    encodes a text with a dummy-prefix space (``▁{``), which is dropped here, and any other mismatch falls
    back to a greedy longest-match over the vocabulary."""

    def __init__(self, tokenizer: Tokenizer, eos_token_id: int) -> None:
        self._tokenizer = tokenizer
        self.tokens, self.special_token_ids = token_bytes(tokenizer)
        self.eos_token_id = eos_token_id
        self.bos_token_id = tokenizer.bos_token_id
        special = self._special = frozenset(self.special_token_ids)
        self._ids: dict[bytes, int] = {}
        for index, data in enumerate(self.tokens):
            if data and index not in special:
                self._ids.setdefault(data, index)
        self._longest = max(map(len, self._ids), default=1)

    def __call__(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        ids = self._tokenizer.encode(text, add_special_tokens=False)
        if any(i in self._special for i in ids):   # text spelling a special token ("<ref>") is text to
            return self._greedy(data)                 # the grammar, which sees special tokens only as tags
        produced = b"".join(self.tokens[i] for i in ids)
        if produced == data:
            return ids
        if ids and produced == b" " + data:        # sentencepiece's dummy prefix
            rest = self.tokens[ids[0]][1:]
            if not rest:
                return ids[1:]
            if rest in self._ids:
                return [self._ids[rest], *ids[1:]]
        return self._greedy(data)

    def _greedy(self, data: bytes) -> list[int]:
        ids: list[int] = []
        start = 0
        while start < len(data):
            for end in range(min(len(data), start + self._longest), start, -1):
                index = self._ids.get(data[start:end])
                if index is not None:
                    ids.append(index)
                    start = end
                    break
            else:
                raise InvalidRequest(f"the vocabulary cannot spell {data[start:start + 8]!r}")
        return ids


def _lark_literal(text: str) -> str:
    """A Lark string literal for ``text`` (JSON's escapes are Lark's)."""
    return json.dumps(text)


def _json_with_options(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": {**JSON_OPTIONS, **schema.get("x-guidance", {})}}


def _lark_sequence(text: str, special_tokens: Mapping[str, int]) -> str:
    """A Lark sequence spelling ``text``, where each special token's text (InternLM2's
    ``<|action_start|>``...) is that token (``<[id]>``): a grammar emits special tokens only by id."""
    if not text:
        return '""'
    names = sorted((name for name in special_tokens if name and name in text), key=len, reverse=True)
    if not names:
        return _lark_literal(text)
    pieces: list[str] = []
    start = 0
    while start < len(text):
        found = min(((text.find(name, start), -len(name), name) for name in names if text.find(name, start) >= 0),
                    default=None)
        if found is None:
            pieces.append(_lark_literal(text[start:]))
            break
        at, _, name = found
        if at > start:
            pieces.append(_lark_literal(text[start:at]))
        pieces.append(f"<[{special_tokens[name]}]>")
        start = at + len(name)
    return " ".join(pieces)


def _tagged_json_lark(tagged: TaggedJSON, special_tokens: Mapping[str, int]) -> str:
    """``begin`` JSON ``end``, ``min_items`` to ``max_items`` times, ``separator`` between: a Lark grammar
    whose JSON values are llguidance's ``%json`` (one alternative per schema). Special tokens in ``begin``,
    ``end`` and ``separator`` are emitted as those tokens."""
    values = " | ".join(f"%json {json.dumps(_json_with_options(schema))}" for schema in tagged.schemas)
    lo = max(tagged.min_items, 1) - 1                  # further items after the first: lo .. hi
    hi = None if tagged.max_items is None else tagged.max_items - 1
    next_item = f"({_lark_sequence(tagged.separator, special_tokens)} item)" if tagged.separator else "item"
    if hi is None:
        more = f" {next_item}" * lo + f" {next_item}*"
    elif hi == 0:
        more = ""                                      # Lark refuses a {0,0} repetition
    else:
        more = f" {next_item}{{{lo},{hi}}}"
    items = "item" + more
    start = f"({items})?" if tagged.min_items == 0 else items
    end = _lark_sequence(tagged.end, special_tokens)
    if tagged.begins:                                  # one begin per schema: the alternatives are whole items
        alternatives = " | ".join(f"{_lark_sequence(begin, special_tokens)} %json "
                                  f"{json.dumps(_json_with_options(schema))} {end}"
                                  for begin, schema in zip(tagged.begins, tagged.schemas, strict=True))
        return f"start: {start}\nitem: {alternatives}\n"
    return (f"start: {start}\n"
            f"item: {_lark_sequence(tagged.begin, special_tokens)} value {end}\n"
            f"value: {values}\n")


def compile_grammar(constraint: StructuredOutput, special_tokens: Mapping[str, int] | None = None) -> str:
    """The llguidance grammar of ``constraint`` (not yet checked: see ``StructuredOutputBackend.matcher``).
    ``special_tokens``: the tokenizer's special tokens by text, which tagged JSON's tags may contain.

    Raises:
        InvalidRequest: the constraint cannot even be turned into a grammar (a grammar that is neither
            Lark nor GBNF, a schema that is not a JSON object).
    """
    try:
        if constraint.json_schema is not None:
            if not isinstance(constraint.json_schema, dict):
                raise InvalidRequest("json_schema must be a JSON object")
            return str(llguidance.LLMatcher.grammar_from_json_schema(_json_with_options(constraint.json_schema)))
        if constraint.json_object:
            return str(llguidance.LLMatcher.grammar_from_json_schema(_json_with_options({"type": "object"})))
        if constraint.regex is not None:
            return str(llguidance.LLMatcher.grammar_from_regex(constraint.regex))
        if constraint.choice is not None:
            return str(llguidance.grammar_from("lark", "start: " + " | ".join(map(_lark_literal, constraint.choice))))
        if constraint.grammar is not None:
            # llguidance reads Lark, and converts GBNF/EBNF (``::=`` rules, llama.cpp's and vLLM's form).
            return str(llguidance.grammar_from("grammar", constraint.grammar))
        assert constraint.tagged_json is not None
        return str(llguidance.grammar_from("lark", _tagged_json_lark(constraint.tagged_json, special_tokens or {})))
    except ValueError as exc:
        raise InvalidRequest(f"invalid {constraint.kind}: {exc}") from exc


def _cache_key(constraint: StructuredOutput) -> str:
    tagged = constraint.tagged_json
    return json.dumps([constraint.kind, constraint.json_schema, constraint.json_object, constraint.regex,
                       constraint.choice, constraint.grammar,
                       None if tagged is None else [tagged.begin, tagged.end, tagged.schemas, tagged.min_items,
                                                    tagged.max_items, tagged.separator, tagged.begins]],
                      sort_keys=True, default=str)


class GrammarMatcher:
    """One request's position in its grammar. ``accept`` each sampled token in order; ``is_terminated``
    once the grammar is complete and allows nothing more (the request then finishes, reason "stop").

    ``endgame_tokens``: when no more than this many tokens are left of the request's budget, the engine
    narrows the mask to the tokens that finish the output soonest (see ``StructuredOutputBackend.narrow``),
    so that a model that would run on (a random one in a string) still ends with text that parses.

    Its state depends only on the tokens accepted, so a preempted request (recomputed, its output kept)
    resumes where it was."""

    def __init__(self, matcher: llguidance.LLMatcher, endgame_tokens: int = ENDGAME_MARGIN) -> None:
        self._matcher = matcher
        self.num_accepted = 0
        self.endgame_tokens = endgame_tokens

    @property
    def llmatcher(self) -> llguidance.LLMatcher:
        """The llguidance matcher (for the batched bitmask fill)."""
        return self._matcher

    def accept(self, token_id: int) -> bool:
        """Advance by one sampled token; False (and the matcher is dead) if the grammar rejects it."""
        if not self._matcher.consume_token(token_id):
            return False
        self.num_accepted += 1
        return True

    @property
    def is_terminated(self) -> bool:
        """True when the grammar accepts no further token but EOS: the constrained output is complete."""
        return bool(self._matcher.is_stopped()) and not self._matcher.is_error()

    @property
    def error(self) -> str | None:
        """Why the matcher failed (a rejected token, a resource limit), or None."""
        return str(self._matcher.get_error()) if self._matcher.is_error() else None


class StructuredOutputBackend:
    """llguidance set up for one tokenizer: compiles constraints (cached) and fills bitmasks.

    Args:
        tokenizer: the engine's tokenizer (the token bytes are read once, here).
        stop_token_ids: the ids that end a constrained output (the template's stop ids,
            ``InputProcessor.stop_token_ids``): allowed once the grammar is complete.
        vocab_size: the logits' width (``logits_width``); ids past the tokenizer's are never allowed.
        cache_size: compiled constraints kept.
        num_threads: llguidance's mask threads (None: its default, 80% of the CPUs).
    """

    def __init__(self, tokenizer: Tokenizer, stop_token_ids: Sequence[int], vocab_size: int, *,
                 cache_size: int = DEFAULT_CACHE_SIZE, num_threads: int | None = None) -> None:
        if not stop_token_ids:
            raise InvalidRequest("structured output needs at least one stop token id")
        adapter = _TokenizerAdapter(tokenizer, stop_token_ids[0])
        self.stop_token_ids = frozenset(stop_token_ids)
        self._token_bytes = adapter.tokens
        self._special_tokens = {token.content: index for index, token in tokenizer.added_tokens_decoder.items()}
        special = set(adapter.special_token_ids)
        self._tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(adapter), n_vocab=len(adapter.tokens),
                                                 eos_token=list(stop_token_ids))
        # The bitmask covers the grammar's vocabulary (the tokenizer's); logits past it (embedding rows no
        # token has) are disallowed by apply_token_bitmask.
        self.vocab_size: int = self._tokenizer.vocab_size
        self.logits_width = vocab_size
        self._executor = llguidance.LLExecutor(num_threads)
        self._cache: OrderedDict[str, tuple[llguidance.LLMatcher, int]] = OrderedDict()
        self._tiers = [
            self._mask_of(lambda index, data: index in set(stop_token_ids)),
            # inside a string, `"` (then closers) ends it; elsewhere `"` opens an empty key or string
            self._mask_of(lambda index, data: data[:1] == b'"' and set(data[1:]) <= CLOSING_BYTES
                          and index not in special),
            self._mask_of(lambda index, data: bool(data) and set(data) <= CLOSING_BYTES and index not in special),
            self._mask_of(lambda index, data: bool(data) and set(data) <= CLOSING_BYTES | set(b',"')
                          and index not in special),
        ]
        self._cache_size = cache_size
        self._lock = threading.Lock()   # add_request may run on a server thread while step() runs

    @property
    def words(self) -> int:
        """int32 words in one bitmask row."""
        return (self.vocab_size + 31) // 32

    def matcher(self, constraint: StructuredOutput) -> GrammarMatcher:
        """A fresh matcher for ``constraint``, compiled once and copied from the cache afterwards.

        Raises:
            InvalidRequest: the schema, regex or grammar does not compile (the message says why).
        """
        key = _cache_key(constraint)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
        if cached is None:
            grammar = compile_grammar(constraint, self._special_tokens)
            template = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
            if template.is_error():
                raise InvalidRequest(f"invalid {constraint.kind}: {template.get_error().strip()}")
            cached = (template, self._shortest_completion(template) + ENDGAME_MARGIN)
            with self._lock:
                self._cache[key] = cached
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        template, endgame = cached
        return GrammarMatcher(template.deep_copy(), endgame)

    def _mask_of(self, wanted: Callable[[int, bytes], bool]) -> torch.Tensor:
        """A (words,) int32 bitmask of the tokens ``wanted(id, bytes)`` selects."""
        bits = np.zeros(32 * self.words, dtype=np.uint8)
        bits[[i for i, data in enumerate(self._token_bytes) if wanted(i, data)]] = 1
        return torch.from_numpy(np.packbits(bits, bitorder="little").view("<i4").astype(np.int32))

    def narrow(self, row: torch.Tensor) -> None:
        """The end game, on one bitmask row (words,) in place: keep the first non-empty of (the stop ids:
        the output is complete, end it), (``"`` then ``}``/``]``s: end a string, and what encloses it),
        (``}``/``]``s: close objects and arrays), (those with ``,`` and ``"``: on to the next required key),
        else leave the row as it is (a number's first digit, ``true``...). A random model in a string or an
        open array then ends within a few tokens, where it would otherwise run to ``max_new_tokens``."""
        for tier in self._tiers:
            narrowed = row & tier
            if bool(narrowed.any()):
                row.copy_(narrowed)
                return

    def _shortest_completion(self, template: llguidance.LLMatcher) -> int:
        """How many tokens the end-game policy takes to finish the constraint from its start (lowest
        allowed id when no tier applies), at most ``MAX_SIMULATED_TOKENS``: the end game starts when the
        budget left is this plus ``ENDGAME_MARGIN``."""
        matcher = template.deep_copy()
        row = self.allocate_bitmask(1)
        for count in range(MAX_SIMULATED_TOKENS):
            llguidance.numpy.fill_next_token_bitmask(matcher, row.numpy())
            if matcher.is_error():
                break
            self.narrow(row[0])
            if bool((row[0] & self._tiers[0]).any()) or matcher.is_stopped():
                return count
            nonzero = row[0].nonzero()
            if nonzero.numel() == 0:
                break
            word = int(nonzero[0])
            bits = int(row[0, word]) & 0xFFFFFFFF
            if not matcher.consume_token(32 * word + (bits & -bits).bit_length() - 1):   # the lowest allowed id
                break
        return MAX_SIMULATED_TOKENS

    def allocate_bitmask(self, rows: int) -> torch.Tensor:
        """A (rows, words) int32 bitmask, all tokens allowed."""
        return torch.full((rows, self.words), -1, dtype=torch.int32)

    def fill_bitmask(self, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor | None = None) -> torch.Tensor:
        """The allowed tokens of each matcher's next step, row ``i`` for ``matchers[i]``, in one batched
        call. A matcher that fails here is left in its error state (check ``GrammarMatcher.error``)."""
        out = self.allocate_bitmask(len(matchers)) if bitmask is None else bitmask
        assert out.shape == (len(matchers), self.words) and out.dtype == torch.int32 and out.is_contiguous()
        if matchers:
            llguidance.numpy.fill_next_token_bitmask_par(      # writes into ``out`` through its numpy view
                self._executor, [(m.llmatcher, i) for i, m in enumerate(matchers)], out.numpy())
        return out


_BIT_POSITIONS: dict[torch.device, torch.Tensor] = {}
_NEAR_MAX = 3e38   # subtracted twice from a disallowed logit: it overflows to -inf in float32, bf16 and fp16


def unpack_bitmask(bitmask: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """(R, words) int32 bitmask -> (R, vocab) uint8 on ``device``, 1 where the token is allowed; tokens past
    ``32 * words`` are 0. On the CPU numpy's ``unpackbits`` (little-endian words: bit ``t`` of word ``w`` is
    token ``32 w + t``), elsewhere shifts on the device."""
    rows, words = bitmask.shape
    width = min(vocab, 32 * words)
    if device.type == "cpu":
        data = bitmask.numpy().astype("<i4", copy=False).view(np.uint8)
        bits = torch.from_numpy(np.unpackbits(data, axis=1, count=width, bitorder="little"))
    else:
        shifts = _BIT_POSITIONS.get(device)
        if shifts is None:
            shifts = _BIT_POSITIONS.setdefault(device, torch.arange(32, dtype=torch.int32, device=device))
        on_device = bitmask.to(device, non_blocking=True)
        bits = ((on_device.unsqueeze(-1) >> shifts) & 1).to(torch.uint8).reshape(rows, -1)[:, :width]
    if width < vocab:
        bits = torch.cat([bits, bits.new_zeros(rows, vocab - width)], dim=1)
    return bits


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set ``logits[i, t]`` to -inf where bit ``t`` of ``bitmask[i]`` is 0, in place. ``logits`` (R, V) of any
    float dtype and device, ``bitmask`` (R, ceil(V' / 32)) int32 on the CPU; tokens past ``32 * words`` are
    disallowed.

    Two subtractions of a near-maximal float instead of ``masked_fill_``: the same result (an allowed logit
    minus 0 is itself, a disallowed one overflows to -inf) at a fraction of the cost on the CPU, where
    ``masked_fill_``/``where`` over 151k logits took ~0.5 ms a row against ~0.08 ms."""
    rows, vocab = logits.shape
    assert bitmask.shape[0] == rows, (tuple(bitmask.shape), rows)
    allowed = unpack_bitmask(bitmask, vocab, logits.device)
    penalty = allowed.to(torch.float32).sub_(1.0).mul_(-_NEAR_MAX)   # 0 where allowed, 3e38 where not
    logits.sub_(penalty).sub_(penalty)
