"""Structured output: llguidance vs xgrammar on an InternVL2-1B-sized vocabulary (a script, never a test).

Prints, per grammar engine it can import:

* the set-up time (token bytes read from our tokenizer + the engine's tokenizer info);
* the compile time of four realistic constraints (a tool call, a nested record with arrays and enums, any
  JSON object, a date/e-mail regex): cold (nothing cached), including the first mask, as llguidance
  builds its lexer lazily;
* the per-token mask cost while walking 1 and 16 concurrent requests through valid outputs token by token:
  filling the bitmask of all rows in one batched call, applying it to float32 logits (B, V), and advancing
  each matcher, in microseconds per step (median and p90 over the steps).

The tokenizer is ``--tokenizer DIR`` (a checkpoint folder; InternVL2-1B's carries its 151655-token Qwen2
vocabulary). Without one, a stand-in of the same kind and size is built once and cached: a byte-level BPE of
151643 tokens trained with the ``tokenizers`` library on Python's standard library sources (about 90 s),
plus InternVL2-1B's 12 added tokens at 151643..151654, loaded through our ``BPETokenizer`` like the real one.
The tiny test checkpoint's vocabulary (712 tokens) is far too small for the mask cost.

    python benchmarks/structured_output.py [--tokenizer DIR] [--engines llguidance,xgrammar] [--threads N]

xgrammar is not a dependency of the project; to measure it, run this script from an environment that has it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from internvl_runtime.engine.structured_output import apply_token_bitmask, token_bytes
from internvl_runtime.processing.tokenization import AutoTokenizer, Tokenizer

FIXTURE_1B = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ckpt" / "tiny-1B"
BASE_VOCAB = 151643   # Qwen2's byte-level BPE; InternVL2-1B adds 12 tokens after it (151655 in all)
STOP_ID_NAME = "<|im_end|>"

TOOL_CALL = {
    "type": "object",
    "properties": {
        "name": {"enum": ["get_weather", "search_web", "send_email"]},
        "arguments": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "arguments"],
    "additionalProperties": False,
}
RECORD = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0},
        "name": {"type": "string", "minLength": 1, "maxLength": 64},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 8},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                           "country": {"enum": ["FR", "DE", "US", "CN", "JP"]}},
            "required": ["street", "zip", "country"],
        },
        "score": {"type": "number"},
        "active": {"type": "boolean"},
    },
    "required": ["id", "name", "email", "tags", "address", "active"],
}
CASES: list[tuple[str, str, Any, Any]] = [   # (label, kind, constraint, a valid output)
    ("tool call schema", "json_schema", TOOL_CALL,
     {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius", "days": 3}}),
    ("nested record schema", "json_schema", RECORD,
     {"id": 42, "name": "Ada Lovelace", "email": "ada@example.org", "tags": ["math", "engine", "poetry"],
      "address": {"street": "12 St James's Square", "zip": "10001", "country": "US"}, "score": 9.5,
      "active": True}),
    ("json_object", "json_object", None,
     {"title": "A report", "pages": 12, "authors": ["A", "B"], "meta": {"draft": False}}),
    ("regex (date + e-mail)", "regex", r"\d{4}-\d{2}-\d{2} [a-z]{1,20}@[a-z]{1,20}\.(com|org|net)",
     "2026-12-05 someone@example.com"),
]


def host_line() -> str:
    from internvl_runtime.hardware import INTERESTING_FLAGS, cpu_flags, cpu_model
    flags = cpu_flags()
    return (f"host: {cpu_model()} | {os.cpu_count()} CPUs | flags: "
            f"{' '.join(f for f in INTERESTING_FLAGS if f in flags) or 'none'} | torch {torch.__version__} | "
            f"python {platform.python_version()}")


def synthetic_tokenizer(folder: Path) -> Path:
    """A 151655-token Qwen2-kind tokenizer folder (see the module docstring), built once."""
    if (folder / "tokenizer_config.json").exists():
        return folder
    if not (folder / "vocab.json").exists():
        train_stand_in(folder)
    # InternVL2-1B's added tokens, at the real ids (after the base vocabulary).
    config = json.loads((FIXTURE_1B / "tokenizer_config.json").read_text())
    shift = BASE_VOCAB - min(int(i) for i in config["added_tokens_decoder"])
    config["added_tokens_decoder"] = {str(int(i) + shift): v for i, v in config["added_tokens_decoder"].items()}
    added = json.loads((FIXTURE_1B / "added_tokens.json").read_text())
    (folder / "added_tokens.json").write_text(json.dumps({k: v + shift for k, v in added.items()}, indent=2))
    (folder / "special_tokens_map.json").write_bytes((FIXTURE_1B / "special_tokens_map.json").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def train_stand_in(folder: Path) -> None:
    """Train the byte-level BPE (vocab.json + merges.txt) on the standard library's text files."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    print(f"building the stand-in vocabulary in {folder} (once)...", flush=True)
    root = os.path.dirname(os.__file__)
    files = []
    for ext in ("py", "txt", "rst", "html", "json"):
        for name in glob.glob(f"{root}/**/*.{ext}", recursive=True):
            try:
                if os.path.getsize(name) < 2_000_000:
                    Path(name).read_text(encoding="utf-8")
                    files.append(name)
            except (OSError, UnicodeDecodeError):
                continue
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train(files, trainers.BpeTrainer(vocab_size=BASE_VOCAB, min_frequency=1, show_progress=False,
                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True, exist_ok=True)
    bpe.model.save(str(folder))


def valid_ids(tokenizer: Tokenizer, output: Any) -> list[int]:
    text = output if isinstance(output, str) else json.dumps(output, separators=(",", ":"))
    return tokenizer.encode(text, add_special_tokens=False)


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    return f"{statistics.median(ordered):8.1f} {ordered[int(0.9 * (len(ordered) - 1))]:8.1f}"


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer: Tokenizer, stop_id: int, vocab: int, threads: int | None) -> None:
        import llguidance
        import llguidance.torch

        from internvl_runtime.engine.structured_output import StructuredOutputBackend
        self.version = llguidance.__version__
        self.backend = StructuredOutputBackend(tokenizer, [stop_id], vocab, cache_size=0, num_threads=threads)
        self.vocab = vocab

    def compile(self, kind: str, constraint: Any) -> Any:
        from internvl_runtime.processing.structured_output import StructuredOutput
        so = StructuredOutput(**{kind: True if kind == "json_object" else constraint})
        matcher = self.backend.matcher(so)
        self.fill([matcher])  # the lexer is built lazily, at the first mask
        return so

    def new_matcher(self, compiled: Any) -> Any:
        return self.backend.matcher(compiled)

    def allocate(self, n: int) -> torch.Tensor:
        return self.backend.allocate_bitmask(n)

    def fill(self, matchers: list[Any], bitmask: torch.Tensor | None = None) -> torch.Tensor:
        return self.backend.fill_bitmask(matchers, bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept(token))


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer: Tokenizer, stop_id: int, vocab: int, threads: int | None) -> None:
        import importlib.metadata

        import xgrammar
        self.xgr = xgrammar
        self.version = importlib.metadata.version("xgrammar")
        tokens, special = token_bytes(tokenizer)
        info = xgrammar.TokenizerInfo(tokens, xgrammar.VocabType.RAW, vocab_size=vocab, stop_token_ids=[stop_id])
        self.special = special
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=threads or 8, cache_enabled=False)
        self.batch = xgrammar.BatchGrammarMatcher(threads or "auto")
        self.vocab = vocab

    def compile(self, kind: str, constraint: Any) -> Any:
        if kind == "json_schema":
            compiled = self.compiler.compile_json_schema(constraint, any_whitespace=False, separators=(",", ":"))
        elif kind == "json_object":
            compiled = self.compiler.compile_builtin_json_grammar()
        else:
            compiled = self.compiler.compile_regex(constraint)
        self.fill([self.new_matcher(compiled)])
        return compiled

    def new_matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def allocate(self, n: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(n, self.vocab)

    def fill(self, matchers: list[Any], bitmask: torch.Tensor | None = None) -> torch.Tensor:
        out = self.allocate(len(matchers)) if bitmask is None else bitmask
        self.batch.batch_fill_next_token_bitmask(matchers, out)
        return out

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_engine(cls: Any, tokenizer: Tokenizer, stop_id: int, vocab: int, threads: int | None, rounds: int) -> None:
    engine, setup = timed(lambda: cls(tokenizer, stop_id, vocab, threads))
    print(f"\n== {engine.name} {engine.version}: set-up (token bytes + tokenizer info) {setup * 1000:.0f} ms")
    compiled = []
    for label, kind, constraint, _ in CASES:
        result, seconds = timed(lambda kind=kind, constraint=constraint: engine.compile(kind, constraint))
        compiled.append(result)
        print(f"  compile {label:<24} {seconds * 1000:8.1f} ms")
    print(f"  per decode step, us (median p90 over {rounds} walks through a valid output):")
    for label, picks in [*[(f"1 request, {case[0]}", [i]) for i, case in enumerate(CASES)],
                         *[(f"16 requests, {case[0]}", [i] * 16) for i, case in enumerate(CASES)],
                         ("16 requests, the four mixed", [i % len(CASES) for i in range(16)])]:
        fills, applies, accepts = [], [], []
        for _ in range(rounds):
            walk(engine, tokenizer, [compiled[i] for i in picks], [CASES[i][3] for i in picks], vocab,
                 fills, applies, accepts)
        totals = [f + a + c for f, a, c in zip(fills, applies, accepts, strict=True)]
        print(f"  {label:<40} fill {percentiles(fills)} | apply {percentiles(applies)} | "
              f"advance {percentiles(accepts)} | total {percentiles(totals)}")


def walk(engine: Any, tokenizer: Tokenizer, compiled: list[Any], outputs: list[Any], vocab: int,
         fills: list[float], applies: list[float], accepts: list[float]) -> None:
    """Walk fresh matchers through the valid outputs token by token, as a decode loop would: one batched
    fill, one apply on (rows, V) float32 logits, then each matcher advances; microseconds. Only the steps
    where every request is still running are recorded (the shortest output's length), so a "16 requests"
    figure is always 16 rows."""
    batch = len(compiled)
    matchers = [engine.new_matcher(c) for c in compiled]
    docs = [valid_ids(tokenizer, output) for output in outputs]
    logits = torch.randn(batch, vocab)
    bitmask = engine.allocate(batch)
    for step in range(min(len(d) for d in docs)):
        live = list(range(batch))
        rows = logits[:len(live)]
        _, fill = timed(lambda live=live: engine.fill([matchers[r] for r in live], bitmask[:len(live)]))
        _, apply = timed(lambda live=live, rows=rows: apply_token_bitmask(rows, bitmask[:len(live)]))
        ok, accept = timed(lambda live=live, step=step: [engine.accept(matchers[r], docs[r][step]) for r in live])
        assert all(ok), f"{engine.name} rejected a valid token at step {step}"
        fills.append(fill * 1e6)
        applies.append(apply * 1e6)
        accepts.append(accept * 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, help="a checkpoint folder (default: the cached stand-in)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "internvl_runtime" / "vocab-151k")
    parser.add_argument("--engines", default="llguidance,xgrammar")
    parser.add_argument("--threads", type=int, default=None, help="mask threads (default: each engine's own)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch's threads (default: torch's own)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    print(host_line() + f" | torch threads {torch.get_num_threads()} | mask threads {args.threads or 'default'} | "
          f"load average {os.getloadavg()[0]:.1f}")
    folder = args.tokenizer or synthetic_tokenizer(args.cache)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    stop_id = tokenizer.convert_tokens_to_ids(STOP_ID_NAME)
    assert isinstance(stop_id, int)
    vocab = len(tokenizer)
    print(f"tokenizer: {folder} ({type(tokenizer).__name__}, {vocab} tokens{'' if args.tokenizer else ', stand-in'})")
    for name in args.engines.split(","):
        cls = {"llguidance": LLGuidance, "xgrammar": XGrammar}[name]
        try:
            run_engine(cls, tokenizer, stop_id, vocab, args.threads, args.rounds)
        except ImportError as exc:
            print(f"\n== {name}: not installed here ({exc})")


if __name__ == "__main__":
    main()
