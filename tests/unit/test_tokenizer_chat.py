"""``apply_chat_template``, ``save_pretrained``, and ``chat`` handed a transformers-style tokenizer.

The expected outputs come from the official tokenizers: ``tests/data/tokenizer/chat/<variant>.json`` was made
by ``make_oracle.py`` there (transformers 4.37.2's ``apply_chat_template`` with each tiny checkpoint's
``chat_template``; that script also checked that transformers loads what our ``save_pretrained`` writes into
the same tokenizer). ``save_pretrained`` is tested here by reloading with our ``AutoTokenizer`` and comparing
with the original tokenizer and with the official encodings of ``tests/data/tokenizer/<variant>.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

from internvl_runtime.errors import InvalidRequest, UnsupportedFeature
from internvl_runtime.processing.tokenization import AutoTokenizer, Tokenizer
from paths import FIXTURES

VARIANTS = ["tiny-1B", "tiny-2B", "tiny-4B", "tiny-8B", "tiny-26B", "tiny-40B", "tiny-76B"]
DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "tokenizer"
REPO_ROOT = Path(__file__).resolve().parents[2]


@cache
def _load(folder: str) -> Tokenizer:
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=True, use_fast=False)


@cache
def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(params=VARIANTS)
def variant(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def tok(variant: str) -> Tokenizer:
    return _load(str(FIXTURES / "ckpt" / variant))


def copy_tokenizer_files(variant: str, into: Path) -> Path:
    """The tokenizer files of a tiny checkpoint in a folder of their own (no weights)."""
    into.mkdir(parents=True, exist_ok=True)
    for path in (FIXTURES / "ckpt" / variant).iterdir():
        if not path.name.endswith(".safetensors") and path.name != "model.safetensors.index.json":
            shutil.copy(path, into)
    return into


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config), encoding="utf-8")


# --------------------------------------------------------------------------------------------------------
# apply_chat_template against transformers


def test_chat_template_matches_official(tok: Tokenizer, variant: str) -> None:
    cases = _json(DATA_DIR / "chat" / f"{variant}.json")["cases"]
    assert len(cases) == 8
    for case in cases:
        messages, add = case["messages"], case["add_generation_prompt"]
        assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add) == case["text"]
        assert tok.apply_chat_template(messages, add_generation_prompt=add) == case["ids"]
        tensor = tok.apply_chat_template(messages, add_generation_prompt=add, return_tensors="pt")
        assert tensor.dtype == torch.long and tensor.tolist() == [case["ids"]]
        encoding = tok.apply_chat_template(messages, add_generation_prompt=add, return_dict=True)
        assert encoding["input_ids"] == case["ids"] and encoding["attention_mask"] == [1] * len(case["ids"])


def test_chat_template_batch_matches_official(tok: Tokenizer, variant: str) -> None:
    batch = _json(DATA_DIR / "chat" / f"{variant}.json")["batch"]
    assert tok.padding_side == batch["padding_side"]
    conversations = batch["conversations"]
    texts = tok.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True)
    assert isinstance(texts, list) and len(texts) == 2
    assert tok.apply_chat_template(conversations, add_generation_prompt=True) == [
        tok.apply_chat_template(c, add_generation_prompt=True) for c in conversations
    ]
    encoding = tok.apply_chat_template(conversations, add_generation_prompt=True, padding=True,
                                       return_tensors="pt", return_dict=True)
    assert encoding["input_ids"].tolist() == batch["input_ids"]
    assert encoding["attention_mask"].tolist() == batch["attention_mask"]


def test_continue_final_message(tok: Tokenizer, variant: str) -> None:
    case = _json(DATA_DIR / "chat" / f"{variant}.json")["cases"][6]  # ends with an assistant message
    assert case["messages"][-1]["role"] == "assistant" and not case["add_generation_prompt"]
    text = tok.apply_chat_template(case["messages"], tokenize=False, continue_final_message=True)
    assert text.endswith("Quiet morning light")
    assert case["text"].startswith(text) and len(case["text"]) > len(text)
    ids = tok.apply_chat_template(case["messages"], continue_final_message=True)
    assert ids == tok.encode(text, add_special_tokens=False)
    with pytest.raises(InvalidRequest, match="not compatible"):
        tok.apply_chat_template(case["messages"], continue_final_message=True, add_generation_prompt=True)


def test_template_variables_tools_and_kwargs() -> None:
    """The template sees the special tokens, tools, documents and extra keywords, as in transformers."""
    tok = _load(str(FIXTURES / "ckpt" / "tiny-2B"))
    template = (
        "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token }}|{{ additional_special_tokens[0] }}|"
        "{% for tool in tools %}{{ tool.function.name }};{% endfor %}|{{ documents | length }}|{{ flavour }}|"
        "{{ messages | length }}|{{ {'k': 'é'} | tojson }}|{{ add_generation_prompt }}"
    )
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}},
             {"type": "function", "function": {"name": "search", "parameters": {}}}]
    text = tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template, tools=tools,
                                   documents=[{"text": "d"}], flavour="mint", tokenize=False,
                                   add_generation_prompt=True)
    assert text == '<s>|</s>|<unk>|</s>|<|im_start|>|get_weather;search;|1|mint|1|{"k": "é"}|True'
    with pytest.raises(UnsupportedFeature):
        tok.apply_chat_template([{"role": "user", "content": "x"}], tools=[len], tokenize=False)
    with pytest.raises(InvalidRequest, match="boom"):
        tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ raise_exception('boom') }}")
    with pytest.raises(UnsupportedFeature):
        tok.apply_chat_template([{"role": "user", "content": "x"}], truncation=True, max_length=4)


def test_missing_and_named_templates(tmp_path: Path) -> None:
    folder = copy_tokenizer_files("tiny-1B", tmp_path / "none")
    edit_config(folder, chat_template=None)
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template is None
    with pytest.raises(ValueError, match=r"tokenizer\.chat_template is not set"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    # A template given as an argument still works; a template set on the tokenizer too (as transformers).
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="<{{ messages[0].content }}>",
                                   tokenize=False) == "<hi>"
    tok.chat_template = "[{{ messages[0].role }}]"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "[user]"

    named = copy_tokenizer_files("tiny-1B", tmp_path / "named")
    edit_config(named, chat_template=[{"name": "default", "template": "D{{ messages[0].content }}"},
                                      {"name": "tool_use", "template": "T{{ messages[0].content }}"}])
    tok = AutoTokenizer.from_pretrained(named)
    chat = [{"role": "user", "content": "q"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "Dq"
    assert tok.apply_chat_template(chat, chat_template="tool_use", tokenize=False) == "Tq"
    saved = AutoTokenizer.from_pretrained(Path(tok.save_pretrained(tmp_path / "named_saved")[0]).parent)
    assert saved.chat_template == tok.chat_template


# --------------------------------------------------------------------------------------------------------
# save_pretrained round trips

ATTRIBUTES = ["tokenizer_class", "vocab_size", "padding_side", "model_max_length", "clean_up_tokenization_spaces",
              "split_special_tokens", "bos_token", "eos_token", "unk_token", "pad_token", "bos_token_id",
              "eos_token_id", "unk_token_id", "pad_token_id", "all_special_tokens", "all_special_ids",
              "additional_special_tokens", "special_tokens_map", "added_tokens_decoder", "chat_template",
              "add_bos_token", "add_eos_token", "legacy", "errors"]


def assert_same_tokenizer(reloaded: Tokenizer, original: Tokenizer, variant: str) -> None:
    assert type(reloaded) is type(original)
    for name in ATTRIBUTES:
        assert getattr(reloaded, name, None) == getattr(original, name, None), name
    assert len(reloaded) == len(original) and reloaded.get_vocab() == original.get_vocab()
    oracle = _json(DATA_DIR / f"{variant}.json")
    assert oracle["encode"], variant
    for case in oracle["encode"]:
        text, ids = case["text"], case["ids"]
        assert reloaded.encode(text) == ids, text
        no_special = case["ids_no_special"] if case["ids_no_special"] is not None else ids
        assert reloaded.encode(text, add_special_tokens=False) == no_special, text
        assert reloaded.decode(ids) == case["decode"], text
        assert reloaded.decode(ids, skip_special_tokens=True) == case["decode_skip"], text
    chat = [{"role": "user", "content": "<img><IMG_CONTEXT></img>\nhi"}]
    assert reloaded.apply_chat_template(chat, add_generation_prompt=True) == \
        original.apply_chat_template(chat, add_generation_prompt=True)


def test_save_pretrained_round_trips(tok: Tokenizer, variant: str, tmp_path: Path) -> None:
    written = tok.save_pretrained(tmp_path / "saved")
    names = {Path(p).name for p in written}
    assert all(Path(p).is_file() for p in written)
    assert {"tokenizer_config.json", "special_tokens_map.json", *type(tok).vocab_files} <= names
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == sorted(names)
    config = json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == tok.tokenizer_class
    assert len(config["added_tokens_decoder"]) == len(tok.added_tokens_decoder)
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "saved", trust_remote_code=True, use_fast=False)
    assert_same_tokenizer(reloaded, tok, variant)
    # Saving the reloaded tokenizer again writes the same files (a fixed point).
    again = reloaded.save_pretrained(tmp_path / "again")
    for path in again:
        assert Path(path).read_bytes() == (tmp_path / "saved" / Path(path).name).read_bytes(), path


def test_save_pretrained_keeps_changed_settings(tmp_path: Path) -> None:
    """Settings given at load time or changed afterwards are what the saved folder holds."""
    tok = AutoTokenizer.from_pretrained(FIXTURES / "ckpt" / "tiny-4B", add_bos_token=False)
    assert tok.padding_side == "left"
    tok.padding_side = "right"
    tok.chat_template = "{{ messages[0].content }}!"
    reloaded = AutoTokenizer.from_pretrained(Path(tok.save_pretrained(tmp_path / "s")[0]).parent)
    assert reloaded.padding_side == "right" and reloaded.add_bos_token is False
    assert reloaded.encode("hi") == tok.encode("hi") and reloaded.encode("hi")[0] != tok.bos_token_id
    assert reloaded.apply_chat_template([{"role": "user", "content": "a"}], tokenize=False) == "a!"


@pytest.mark.parametrize("variant_name", ["tiny-1B", "tiny-4B", "tiny-76B"])
def test_save_pretrained_keeps_added_token_flags(variant_name: str, tmp_path: Path) -> None:
    """An added token that is not special, with lstrip/single_word flags, survives the round trip."""
    folder = copy_tokenizer_files(variant_name, tmp_path / "src")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    index = len(_load(str(FIXTURES / "ckpt" / variant_name)))
    config["added_tokens_decoder"][str(index)] = {"content": "<extra>", "special": False, "lstrip": True,
                                                  "rstrip": False, "single_word": True, "normalized": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.added_tokens_decoder[index].special is False
    reloaded = AutoTokenizer.from_pretrained(Path(tok.save_pretrained(tmp_path / "saved")[0]).parent)
    assert reloaded.added_tokens_decoder == tok.added_tokens_decoder
    for text in ["a <extra> b", "a<extra>b", "x  <extra>", "<extra>"]:
        ids = tok.encode(text)
        assert reloaded.encode(text) == ids, text
        assert reloaded.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    assert "<extra>" in reloaded.decode(tok.encode("a <extra> b"), skip_special_tokens=True)


def test_save_pretrained_copies_remote_code_and_edge_cases(tmp_path: Path) -> None:
    folder = copy_tokenizer_files("tiny-2B", tmp_path / "src")
    (folder / "tokenization_internlm2.py").write_text("# the checkpoint's code, copied, never run\n")
    tok = AutoTokenizer.from_pretrained(folder)
    written = {Path(p).name for p in tok.save_pretrained(tmp_path / "out")}
    assert "tokenization_internlm2.py" in written
    assert (tmp_path / "out" / "tokenization_internlm2.py").read_text() == \
        (folder / "tokenization_internlm2.py").read_text()
    # Saving into the folder it was loaded from rewrites the configs and leaves the model files alone.
    model_bytes = (folder / "tokenizer.model").read_bytes()
    tok.save_pretrained(folder)
    assert (folder / "tokenizer.model").read_bytes() == model_bytes
    assert AutoTokenizer.from_pretrained(folder).encode("hi <img>") == tok.encode("hi <img>")
    # transformers' filename_prefix; a file in the way; push_to_hub.
    prefixed = {Path(p).name for p in tok.save_pretrained(tmp_path / "prefixed", filename_prefix="v1")}
    assert {"v1-tokenizer_config.json", "v1-special_tokens_map.json", "v1-added_tokens.json"} <= prefixed
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidRequest, match="is a file"):
        tok.save_pretrained(tmp_path / "file")
    with pytest.raises(UnsupportedFeature):
        tok.save_pretrained(tmp_path / "hub", push_to_hub=True)


# --------------------------------------------------------------------------------------------------------
# chat() with a transformers tokenizer


class TransformersStyleTokenizer:
    """What ``chat``/``batch_chat`` get from ``transformers.AutoTokenizer.from_pretrained(path,
    trust_remote_code=True, use_fast=False)``: not our class, with transformers' call surface only.

    Encodings are plain dicts of tensors (transformers' ``BatchEncoding`` is a ``UserDict``, not our class);
    the ids are our tokenizer's (equal to the official ones: ``test_tokenizer.py``), padded here; every call is
    recorded so that the test sees what ``chat`` used. ``test_chat_with_transformers`` runs the real thing
    where transformers is installed.
    """

    def __init__(self, inner: Tokenizer) -> None:
        self._inner = inner
        self.padding_side = inner.padding_side
        self.eos_token_id = inner.eos_token_id
        self.pad_token_id = inner.pad_token_id
        self.calls: list[str] = []

    def __call__(self, text: str | Sequence[str], return_tensors: str | None = None, padding: bool = False,
                 **kwargs: Any) -> dict[str, torch.Tensor]:
        self.calls.append("__call__")
        texts = [text] if isinstance(text, str) else list(text)
        rows = [self._inner.encode(t) for t in texts]
        width = max(len(r) for r in rows)
        assert padding or len(rows) == 1
        ids, mask = [], []
        for row in rows:
            pad = [self.pad_token_id] * (width - len(row))
            ones, zeros = [1] * len(row), [0] * (width - len(row))
            ids.append(pad + row if self.padding_side == "left" else row + pad)
            mask.append(zeros + ones if self.padding_side == "left" else ones + zeros)
        assert return_tensors == "pt"
        return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask)}

    def convert_tokens_to_ids(self, token: str) -> int:
        self.calls.append("convert_tokens_to_ids")
        index = self._inner.convert_tokens_to_ids(token)
        assert isinstance(index, int)
        return index

    def batch_decode(self, sequences: torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        self.calls.append("batch_decode")
        return [self._inner.decode(row, skip_special_tokens=skip_special_tokens) for row in sequences.tolist()]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        self.calls.append("decode")
        return self._inner.decode(list(ids), skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("variant_name", ["tiny-1B", "tiny-2B"])
def test_chat_with_a_transformers_style_tokenizer(variant_name: str) -> None:
    from internvl_runtime import AutoModel

    folder = FIXTURES / "ckpt" / variant_name
    model = AutoModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
    ours = _load(str(folder))
    theirs = TransformersStyleTokenizer(ours)
    size = int(json.loads((folder / "config.json").read_text())["force_image_size"])
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    config = {"max_new_tokens": 6, "do_sample": False}
    answer, history = model.chat(theirs, pixels[:1], "<image>\nDescribe it.", config, return_history=True)
    assert (answer, history) == model.chat(ours, pixels[:1], "<image>\nDescribe it.", config, return_history=True)
    assert {"__call__", "convert_tokens_to_ids", "batch_decode"} <= set(theirs.calls)
    answers = model.batch_chat(theirs, pixels, ["one?", "two?"], config, num_patches_list=[1, 1])
    assert answers == model.batch_chat(ours, pixels, ["one?", "two?"], config, num_patches_list=[1, 1])
    assert theirs.padding_side == ours.padding_side  # batch_chat restores it


#: A Python with transformers installed (e.g. 4.37.2, in a virtual environment outside the repository) runs
#: ``chat`` with the real transformers tokenizer; unset, the test is skipped (the stand-in above still runs).
TRANSFORMERS_PYTHON = os.environ.get("INTERNVL_TRANSFORMERS_PYTHON")

_CHAT_WITH_TRANSFORMERS = """
import json, sys, torch
from transformers import AutoTokenizer as OfficialAutoTokenizer
from internvl_runtime import AutoModel
from internvl_runtime.processing.tokenization import AutoTokenizer
folder = sys.argv[1]
theirs = OfficialAutoTokenizer.from_pretrained(folder, trust_remote_code=True, use_fast=False)
ours = AutoTokenizer.from_pretrained(folder)
model = AutoModel.from_pretrained(folder, torch_dtype=torch.float32).eval()
size = model.config.force_image_size
pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
config = {"max_new_tokens": 6, "do_sample": False}
out = {}
for name, tok in (("theirs", theirs), ("ours", ours)):
    answer = model.chat(tok, pixels[:1], "<image>\\nDescribe it.", config)
    answers = model.batch_chat(tok, pixels, ["one?", "two?"], config, num_patches_list=[1, 1])
    out[name] = [answer, answers, tok.padding_side]
out["class"] = type(theirs).__module__
print(json.dumps(out))
"""


@pytest.mark.skipif(not TRANSFORMERS_PYTHON, reason="set INTERNVL_TRANSFORMERS_PYTHON to a Python with transformers")
@pytest.mark.parametrize("variant_name", ["tiny-1B", "tiny-4B", "tiny-40B", "tiny-76B"])
def test_chat_with_transformers(variant_name: str) -> None:
    """``chat``/``batch_chat`` handed transformers' own tokenizer answer as with ours (no remote code needed for
    these kinds; InternLM2's tokenizer is remote code the tiny folders do not carry)."""
    assert TRANSFORMERS_PYTHON is not None
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    result = subprocess.run([TRANSFORMERS_PYTHON, "-c", _CHAT_WITH_TRANSFORMERS, str(FIXTURES / "ckpt" / variant_name)],
                            capture_output=True, text=True, env=env, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["class"].startswith("transformers.")
    assert out["theirs"] == out["ours"]
