"""Tokenizers of the seven InternVL2 checkpoint kinds against the official ones.

Two sources of truth:

* the goldens (``tests/fixtures/goldens/<variant>/<case>.json``, from the official chat code):
  every prompt's ``input_ids``, the left-padded batches with their attention masks, the generated tokens and
  the responses decoded from ``generated_ids``;
* ``tests/data/tokenizer/<variant>.json``: the official tokenizers (transformers 4.37.2, loaded as the
  official code does: ``AutoTokenizer.from_pretrained(dir, trust_remote_code=True, use_fast=False)``, and
  InternLM2Tokenizer from OpenGVLab/InternVL@dbda466 ``tokenization_internlm2.py``) run on a corpus built to
  hit the edge cases: added tokens glued to text or between spaces (and their lstrip/rstrip), Chinese, emoji,
  combining marks (NFC), leading/trailing/repeated spaces, newlines, tabs, numbers, ``▁`` in the text,
  contractions (clean-up), random strings, the chat prompts; decoding of every single id and of random id
  runs with special tokens, with and without ``skip_special_tokens``; batches padded on both sides; the
  special-token attributes, ``vocab_size``, ``len`` and ``convert_tokens_to_ids``. ``ids_no_special`` is
  null where it equals ``ids``; ``single_decode_skip`` lists only the ids whose decoding differs from
  ``single_decode``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

from internvl_runtime.errors import CheckpointError, InvalidRequest
from internvl_runtime.processing.tokenization import AutoTokenizer, BatchEncoding, Tokenizer
from paths import FIXTURES

VARIANTS = ["tiny-1B", "tiny-2B", "tiny-4B", "tiny-8B", "tiny-26B", "tiny-40B", "tiny-76B"]
DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "tokenizer"
REPO_ROOT = Path(__file__).resolve().parents[2]


def separator(variant: str) -> str:
    """The chat template's separator, where responses are cut (Phi-3 template for 4B)."""
    return "<|end|>" if variant == "tiny-4B" else "<|im_end|>"


@cache
def _load(folder: str) -> Tokenizer:
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=True, use_fast=False)


@pytest.fixture(params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def ckpt(variant: str) -> Path:
    return FIXTURES / "ckpt" / variant


@pytest.fixture
def tok(ckpt: Path) -> Iterator[Tokenizer]:
    """A fresh-enough tokenizer (cached per folder; tests that change padding_side restore it)."""
    tokenizer = _load(str(ckpt))
    saved = tokenizer.padding_side
    yield tokenizer
    tokenizer.padding_side = saved


@pytest.fixture
def oracle(variant: str) -> dict[str, Any]:
    with open(DATA_DIR / f"{variant}.json", encoding="utf-8") as handle:
        return json.load(handle)


def golden_cases(variant: str) -> list[dict[str, Any]]:
    files = sorted((FIXTURES / "goldens" / variant).glob("*.json"))
    assert files, f"no goldens for {variant}"
    cases = []
    for path in files:
        with open(path, encoding="utf-8") as handle:
            cases.append(json.load(handle))
    return cases


# --------------------------------------------------------------------------------------------------------
# Goldens of the official chat code
# --------------------------------------------------------------------------------------------------------


def test_golden_prompts_encode_exactly(tok: Tokenizer, variant: str) -> None:
    checked = 0
    for case in golden_cases(variant):
        if case["type"] == "batch_chat":
            continue
        for i, rnd in enumerate(case["rounds"]):
            enc = tok(rnd["prompt"], return_tensors="pt")
            assert enc.input_ids.dtype == torch.long
            assert enc.input_ids.tolist() == rnd["input_ids"], f"{case['id']} round {i}"
            assert enc.attention_mask.tolist() == [[1] * len(rnd["input_ids"][0])]
            checked += 1
    assert checked >= 10


def test_golden_batches_pad_left(tok: Tokenizer, variant: str) -> None:
    checked = 0
    for case in golden_cases(variant):
        if case["type"] != "batch_chat":
            continue
        tok.padding_side = "left"  # what the official batch_chat sets
        enc = tok(case["prompts"], return_tensors="pt", padding=True)
        assert enc["input_ids"].tolist() == case["input_ids"], case["id"]
        assert enc["attention_mask"].tolist() == case["attention_mask"], case["id"]
        assert enc.input_ids.dtype == torch.long and enc.attention_mask.dtype == torch.long
        checked += 1
    assert checked == 2


def test_golden_responses_decode(tok: Tokenizer, variant: str) -> None:
    sep = separator(variant)
    for case in golden_cases(variant):
        if case["type"] == "batch_chat":
            texts = tok.batch_decode(torch.tensor(case["generated_ids"]), skip_special_tokens=True)
            assert [t.split(sep)[0].strip() for t in texts] == case["responses"], case["id"]
            for ids, tokens in zip(case["generated_ids"], case["generated_tokens"], strict=True):
                assert tok.convert_ids_to_tokens(ids) == tokens
            continue
        for rnd in case["rounds"]:
            ids = rnd["generated_ids"][0]
            assert tok.decode(ids, skip_special_tokens=True).split(sep)[0].strip() == rnd["response"], case["id"]
            assert tok.decode(torch.tensor(ids), skip_special_tokens=True).split(sep)[0].strip() == rnd["response"]
            assert tok.convert_ids_to_tokens(ids) == rnd["generated_tokens"][0]


# --------------------------------------------------------------------------------------------------------
# Oracle corpus (official tokenizers run on an edge-case corpus)
# --------------------------------------------------------------------------------------------------------


def test_oracle_attributes(tok: Tokenizer, oracle: dict[str, Any], ckpt: Path) -> None:
    meta = oracle["meta"]
    fresh = AutoTokenizer.from_pretrained(ckpt)
    assert fresh.padding_side == meta["padding_side"]
    for name in ("vocab_size", "bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id",
                 "eos_token_id", "pad_token_id", "unk_token_id", "all_special_ids", "all_special_tokens"):
        assert getattr(fresh, name) == meta[name], name
    assert len(fresh) == meta["len"]
    for token, index in meta["convert_tokens_to_ids"].items():
        assert fresh.convert_tokens_to_ids(token) == index, token
    probes = list(meta["convert_tokens_to_ids"])
    assert fresh.convert_tokens_to_ids(probes) == [meta["convert_tokens_to_ids"][p] for p in probes]


def test_oracle_tokens(tok: Tokenizer, oracle: dict[str, Any]) -> None:
    tokens = oracle["tokens"]
    assert tok.convert_ids_to_tokens(list(range(len(tokens)))) == tokens
    assert tok.convert_ids_to_tokens(len(tokens) - 1) == tokens[-1]
    assert tok.convert_ids_to_tokens(torch.tensor(3)) == tokens[3]
    special = set(tok.all_special_ids)
    kept = tok.convert_ids_to_tokens(list(range(len(tokens))), skip_special_tokens=True)
    assert kept == [t for i, t in enumerate(tokens) if i not in special]


def test_oracle_encode(tok: Tokenizer, oracle: dict[str, Any]) -> None:
    mismatches = []
    for entry in oracle["encode"]:
        text = entry["text"]
        no_special = entry["ids_no_special"] if entry["ids_no_special"] is not None else entry["ids"]
        if tok.encode(text) != entry["ids"]:
            mismatches.append(("encode", text, tok.encode(text), entry["ids"]))
        if tok.encode(text, add_special_tokens=False) != no_special:
            mismatches.append(("encode no special", text, tok.encode(text, add_special_tokens=False), no_special))
    assert not mismatches, mismatches[:5]
    assert len(oracle["encode"]) > 100


def test_oracle_decode_of_encodings(tok: Tokenizer, oracle: dict[str, Any]) -> None:
    mismatches = []
    for entry in oracle["encode"]:
        ids = entry["ids"]
        if tok.decode(ids) != entry["decode"]:
            mismatches.append(("decode", ids, tok.decode(ids), entry["decode"]))
        if tok.decode(ids, skip_special_tokens=True) != entry["decode_skip"]:
            mismatches.append(("decode skip", ids, tok.decode(ids, skip_special_tokens=True), entry["decode_skip"]))
    assert not mismatches, mismatches[:5]


def test_oracle_decode_id_runs(tok: Tokenizer, oracle: dict[str, Any]) -> None:
    mismatches = []
    for run in oracle["decode_runs"]:
        ids = run["ids"]
        if tok.decode(ids) != run["decode"]:
            mismatches.append(("decode", ids, tok.decode(ids), run["decode"]))
        if tok.decode(ids, skip_special_tokens=True) != run["decode_skip"]:
            mismatches.append(("decode skip", ids, tok.decode(ids, skip_special_tokens=True), run["decode_skip"]))
    assert not mismatches, mismatches[:5]
    runs = [run["ids"] for run in oracle["decode_runs"]]
    width = max(map(len, runs))
    same_length = [ids for ids in runs if len(ids) == width]
    expected = [r["decode"] for r in oracle["decode_runs"] if len(r["ids"]) == width]
    assert tok.batch_decode(torch.tensor(same_length)) == expected
    assert tok.batch_decode(runs, skip_special_tokens=True) == [r["decode_skip"] for r in oracle["decode_runs"]]


def test_oracle_single_token_decode(tok: Tokenizer, oracle: dict[str, Any]) -> None:
    single = oracle["single_decode"]
    skip = {int(k): v for k, v in oracle["single_decode_skip"].items()}
    assert [tok.decode([i]) for i in range(len(single))] == single
    assert [tok.decode(i, skip_special_tokens=True) for i in range(len(single))] == [
        skip.get(i, text) for i, text in enumerate(single)
    ]


def test_oracle_batches(tok: Tokenizer, oracle: dict[str, Any]) -> None:
    for batch in oracle["batches"]:
        tok.padding_side = batch["side"]
        enc = tok(batch["texts"], padding=True)
        assert enc["input_ids"] == batch["input_ids"], batch["side"]
        assert enc["attention_mask"] == batch["attention_mask"], batch["side"]
        as_tensors = tok(batch["texts"], padding=True, return_tensors="pt")
        assert as_tensors.input_ids.tolist() == batch["input_ids"]
        assert as_tensors.attention_mask.tolist() == batch["attention_mask"]


# --------------------------------------------------------------------------------------------------------
# Interface
# --------------------------------------------------------------------------------------------------------


def test_call_shapes_and_batch_encoding(tok: Tokenizer) -> None:
    single = tok("Hello world")
    assert isinstance(single, BatchEncoding)
    assert single.input_ids == single["input_ids"] == tok.encode("Hello world")
    assert single.attention_mask == [1] * len(single.input_ids)
    pt = tok("Hello world", return_tensors="pt")
    assert pt.input_ids.shape == (1, len(single.input_ids)) and pt.input_ids.dtype == torch.long
    assert pt.to("cpu") is pt
    unpadded = tok(["a", "Hello world"])
    assert [len(r) for r in unpadded.input_ids] == [len(tok.encode("a")), len(tok.encode("Hello world"))]
    with pytest.raises(InvalidRequest):
        tok(["a", "Hello world, how are you?"], return_tensors="pt")
    with pytest.raises(AttributeError):
        _ = single.token_type_ids


def test_padding_side_is_settable(tok: Tokenizer) -> None:
    texts = ["a", "Hello world, how are you?"]
    tok.padding_side = "right"
    right = tok(texts, padding=True, return_tensors="pt")
    tok.padding_side = "left"
    left = tok(texts, padding=True, return_tensors="pt")
    short = tok.encode("a")
    width = right.input_ids.shape[1]
    pad = tok.pad_token_id
    assert right.input_ids[0].tolist() == short + [pad] * (width - len(short))
    assert left.input_ids[0].tolist() == [pad] * (width - len(short)) + short
    assert right.attention_mask[0].tolist() == [1] * len(short) + [0] * (width - len(short))
    assert left.attention_mask[0].tolist() == [0] * (width - len(short)) + [1] * len(short)
    assert left.input_ids[1].tolist() == right.input_ids[1].tolist() == tok.encode(texts[1])


def test_padding_side_from_config_and_kwargs() -> None:
    ckpt = FIXTURES / "ckpt"
    assert AutoTokenizer.from_pretrained(ckpt / "tiny-1B").padding_side == "right"  # class default
    assert AutoTokenizer.from_pretrained(ckpt / "tiny-4B").padding_side == "left"  # tokenizer_config.json
    assert Tokenizer.from_pretrained(ckpt / "tiny-1B", padding_side="left").padding_side == "left"


def test_bos_flag_is_read_from_config() -> None:
    ckpt = FIXTURES / "ckpt"
    phi3 = AutoTokenizer.from_pretrained(ckpt / "tiny-4B")  # add_bos_token true, legacy false
    yi = AutoTokenizer.from_pretrained(ckpt / "tiny-40B")  # add_bos_token false, legacy true
    assert phi3.encode("hi")[0] == phi3.bos_token_id
    assert yi.encode("hi")[0] != yi.bos_token_id
    no_bos = AutoTokenizer.from_pretrained(ckpt / "tiny-4B", add_bos_token=False)
    assert no_bos.encode("hi") == phi3.encode("hi")[1:]
    assert phi3.encode("") == [phi3.bos_token_id] and yi.encode("") == []


def test_long_image_prompt_is_fast(tok: Tokenizer) -> None:
    prompt = "<|im_start|>user\n<img>" + "<IMG_CONTEXT>" * 4096 + "</img>\n描述这张图片。<|im_end|>\n"
    start = time.perf_counter()
    ids = tok.encode(prompt)
    elapsed = time.perf_counter() - start
    context_id = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert ids.count(context_id) == 4096
    assert elapsed < 0.5, f"encoding a 4096-image-token prompt took {elapsed:.3f}s"


def test_bad_ids_are_rejected(tok: Tokenizer) -> None:
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        tok.decode([len(tok) + 10])
    with pytest.raises(InvalidRequest):
        tok.decode([-1])
    with pytest.raises(InvalidRequest):
        tok.batch_decode(torch.zeros(2, 2, 2, dtype=torch.long))


def test_no_transformers_import() -> None:
    code = (
        "import sys; from internvl_runtime.processing.tokenization import AutoTokenizer; "
        f"AutoTokenizer.from_pretrained({str(FIXTURES / 'ckpt' / 'tiny-2B')!r}); "
        "assert 'transformers' not in sys.modules, 'transformers was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=120)


def test_checkpoint_code_is_never_run(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    source = FIXTURES / "ckpt" / "tiny-2B"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    marker = tmp_path / "ran"
    for name in ("tokenization_internlm2.py", "tokenization_internlm2_fast.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    reference = AutoTokenizer.from_pretrained(FIXTURES / "ckpt" / "tiny-2B")
    loaded = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    assert loaded.encode("你好 <IMG_CONTEXT>") == reference.encode("你好 <IMG_CONTEXT>")
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------------
# Bad checkpoints
# --------------------------------------------------------------------------------------------------------


def test_folder_without_tokenizer_files(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json is missing") as info:
        AutoTokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        AutoTokenizer.from_pretrained(tmp_path / "nowhere")


def test_unknown_tokenizer_class(tmp_path: Path) -> None:
    source = FIXTURES / "ckpt" / "tiny-1B"
    for name in ("tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(source / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "MysteryTokenizer"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError, match="MysteryTokenizer") as info:
        AutoTokenizer.from_pretrained(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "Qwen2Tokenizer" in message  # names the folder and the supported classes
    del config["tokenizer_class"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(CheckpointError, match="no 'tokenizer_class'"):
        AutoTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("variant_name", "kept", "missing"),
    [
        ("tiny-1B", ["tokenizer_config.json", "vocab.json"], "merges.txt"),
        ("tiny-2B", ["tokenizer_config.json", "special_tokens_map.json"], "tokenizer.model"),
        ("tiny-40B", ["tokenizer_config.json"], "tokenizer.model"),
        ("tiny-76B", ["tokenizer_config.json", "special_tokens_map.json"], "tokenizer.json"),
    ],
)
def test_missing_model_file(tmp_path: Path, variant_name: str, kept: list[str], missing: str) -> None:
    for name in kept:
        shutil.copy(FIXTURES / "ckpt" / variant_name / name, tmp_path / name)
    with pytest.raises(CheckpointError, match=missing) as info:
        AutoTokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_malformed_config(tmp_path: Path) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        AutoTokenizer.from_pretrained(tmp_path)
