"""Hub ids wherever a checkpoint folder is accepted (``internvl_runtime.hub``), without network.

A cache folder laid out as huggingface_hub lays it (``tests/hub_cache.py``) holds the tiny InternVL2-1B as
``OpenGVLab/InternVL2-1B``; with ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` pointing at it, ``AutoModel``,
``AutoTokenizer``, ``LLMEngine.from_pretrained``, ``pipeline`` and ``internvl generate`` load from it and answer
as the folder does. ``revision`` selects a snapshot; an unknown revision, an uncached id and a name that is
neither a folder nor an id give one clear ``CheckpointNotFound``; a folder of the same name wins over the id.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub.utils import filter_repo_objects

from hub_cache import CKPT, REPO_ID, REVISION, make_hub_cache
from internvl_runtime import (
    AutoModel,
    AutoTokenizer,
    CheckpointNotFound,
    ConfigError,
    GenerationConfig,
    HubOptions,
    LLMEngine,
    SamplingParams,
    pipeline,
)
from internvl_runtime.hub import MODEL_FILES, PICKLED_FILES, TOKENIZER_FILES, is_hub_id, resolve_checkpoint
from internvl_runtime.loading import plan_load
from internvl_runtime.processing.inputs import Message

REPO_ROOT = Path(__file__).resolve().parents[2]
GREEDY = dict(max_new_tokens=6, do_sample=False)


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline hub cache holding the tiny 1B as ``OpenGVLab/InternVL2-1B``, set as ``HF_HUB_CACHE``."""
    cache = tmp_path / "hf-cache"
    make_hub_cache(cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)      # no folder named OpenGVLab/ where the test runs
    return cache


@pytest.fixture(scope="module")
def folder_answer() -> str:
    model = AutoModel.from_pretrained(CKPT, torch_dtype=torch.float32).eval()
    return model.chat(AutoTokenizer.from_pretrained(CKPT), None, "Hello, who are you?", GREEDY)


# ---------------------------------------------------------------------------------------------------
# what counts as an id, and what is fetched
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["OpenGVLab/InternVL2-1B", "owner/name.v2", "a/b", "user_1/model-x.y"])
def test_hub_ids(text: str) -> None:
    assert is_hub_id(text)


@pytest.mark.parametrize("text", ["InternVL2-1B", "./OpenGVLab/InternVL2-1B", "/abs/path", "a/b/c", "~/model",
                                  "owner/-name", "owner/name.", "own--er/name", "owner/na..me", "", "owner/",
                                  "a/" + "b" * 100])
def test_not_hub_ids(text: str) -> None:
    assert not is_hub_id(text)


# The files of the real OpenGVLab/InternVL2-1B repository (and a sharded, a pickled and a sentencepiece one).
REPO_FILES = [
    ".gitattributes", "README.md", "config.json", "configuration_intern_vit.py", "configuration_internlm2.py",
    "configuration_internvl_chat.py", "conversation.py", "examples/image1.jpg", "examples/red-panda.mp4",
    "generation_config.json", "model.safetensors", "modeling_intern_vit.py", "modeling_internvl_chat.py",
    "preprocessor_config.json", "special_tokens_map.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "added_tokens.json", "tokenizer.model", "tokenizer.json", "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
    "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json", "tokenization_internlm2.py",
]


def test_only_what_the_loader_reads_is_fetched() -> None:
    # huggingface_hub's own matcher decides what snapshot_download fetches
    model = set(filter_repo_objects(REPO_FILES, allow_patterns=list(MODEL_FILES)))
    assert model == {"config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
                     "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model",
                     "tokenizer.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json", "preprocessor_config.json"}   # the HF format's tiling
    assert not any(name.endswith((".py", ".bin")) for name in model)
    tokenizer = set(filter_repo_objects(REPO_FILES, allow_patterns=list(TOKENIZER_FILES)))
    assert tokenizer == {"config.json", "special_tokens_map.json", "tokenizer_config.json", "vocab.json",
                         "merges.txt", "added_tokens.json", "tokenizer.model", "tokenizer.json"}
    pickled = set(filter_repo_objects(REPO_FILES, allow_patterns=list(PICKLED_FILES)))
    assert pickled == {"pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"}


# ---------------------------------------------------------------------------------------------------
# loading from the cache, as from the folder
# ---------------------------------------------------------------------------------------------------


def test_automodel_and_autotokenizer_load_a_hub_id(hub_cache: Path, folder_answer: str) -> None:
    model = AutoModel.from_pretrained(REPO_ID, torch_dtype=torch.float32, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(REPO_ID, trust_remote_code=True, use_fast=False)
    assert model.chat(tokenizer, None, "Hello, who are you?", GREEDY) == folder_answer
    reference = AutoTokenizer.from_pretrained(CKPT)
    assert tokenizer("Hello <image> world")["input_ids"] == reference("Hello <image> world")["input_ids"]
    assert plan_load(REPO_ID).folder == hub_cache / "models--OpenGVLab--InternVL2-1B" / "snapshots" / REVISION


def test_keywords_instead_of_the_environment(hub_cache: Path, monkeypatch: pytest.MonkeyPatch,
                                             folder_answer: str) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_HUB_CACHE")
    model = AutoModel.from_pretrained(REPO_ID, torch_dtype=torch.float32, cache_dir=hub_cache, revision=REVISION,
                                      local_files_only=True, token=False)
    tokenizer = AutoTokenizer.from_pretrained(REPO_ID, cache_dir=hub_cache, revision="main", local_files_only=True)
    assert model.chat(tokenizer, None, "Hello, who are you?", GREEDY) == folder_answer


def test_engine_and_pipeline_load_a_hub_id(hub_cache: Path) -> None:
    ours = LLMEngine.from_pretrained(REPO_ID, dtype=torch.float32, num_blocks=64)
    theirs = LLMEngine.from_pretrained(CKPT, dtype=torch.float32, num_blocks=64)
    params = SamplingParams(max_new_tokens=6, temperature=0.0)
    answers = [engine.generate([engine.processor.prepare([Message("user", "Hello")])], params)[0].text
               for engine in (ours, theirs)]
    assert answers[0] == answers[1]
    config = GenerationConfig(max_new_tokens=6)
    assert pipeline(REPO_ID, dtype=torch.float32, num_blocks=64)("Hello", config).text == \
        pipeline(CKPT, dtype=torch.float32, num_blocks=64)("Hello", config).text
    pinned = LLMEngine.from_pretrained(REPO_ID, dtype=torch.float32, num_blocks=64, hub=HubOptions(revision=REVISION))
    assert pinned.generate([pinned.processor.prepare([Message("user", "Hello")])], params)[0].text == answers[1]


def test_revision_selects_the_snapshot(hub_cache: Path) -> None:
    other = "f" * 40      # a second snapshot, of another checkpoint, under a tag
    make_hub_cache(hub_cache, revision=other, source=CKPT.parent / "tiny-2B", refs=("v2",))
    assert AutoModel.from_pretrained(REPO_ID).config.llm.architecture == "Qwen2ForCausalLM"
    for revision in ("v2", other):
        assert AutoModel.from_pretrained(REPO_ID, revision=revision).config.llm.architecture == \
            "InternLM2ForCausalLM"
        assert type(AutoTokenizer.from_pretrained(REPO_ID, revision=revision)).__name__ == "InternLM2Tokenizer"
    # the engine, and the pipeline through it, take the same options as one HubOptions
    pipe = pipeline(REPO_ID, dtype=torch.float32, num_blocks=64, hub=HubOptions(revision="v2"))
    assert pipe.engine.model.config.llm.architecture == "InternLM2ForCausalLM"


# ---------------------------------------------------------------------------------------------------
# the errors
# ---------------------------------------------------------------------------------------------------


def test_an_unknown_revision_offline_names_id_revision_cache_and_offline(hub_cache: Path) -> None:
    with pytest.raises(CheckpointNotFound) as caught:
        AutoModel.from_pretrained(REPO_ID, revision="v9")
    text = str(caught.value)
    assert REPO_ID in text and "'v9'" in text and str(hub_cache) in text and "HF_HUB_OFFLINE" in text


def test_an_uncached_id_offline_names_id_cache_and_offline(hub_cache: Path) -> None:
    for load in (AutoModel.from_pretrained, AutoTokenizer.from_pretrained, LLMEngine.from_pretrained, pipeline):
        with pytest.raises(CheckpointNotFound) as caught:
            load("OpenGVLab/InternVL2-2B")
        text = str(caught.value)
        assert "OpenGVLab/InternVL2-2B" in text and str(hub_cache) in text and "HF_HUB_OFFLINE" in text


def test_local_files_only_is_named_when_it_is_the_reason(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(CheckpointNotFound, match="local_files_only"):
        AutoModel.from_pretrained("OpenGVLab/InternVL2-2B", local_files_only=True)


@pytest.mark.parametrize("name", ["missing-folder", "./OpenGVLab/InternVL2-1B", "a/b/c"])
def test_neither_folder_nor_id_is_todays_error(hub_cache: Path, name: str) -> None:
    with pytest.raises(CheckpointNotFound, match="does not exist") as caught:
        AutoModel.from_pretrained(name)
    assert isinstance(caught.value, ConfigError)     # what a missing folder raised before hub ids


def test_a_folder_wins_over_a_same_named_id(hub_cache: Path, tmp_path: Path) -> None:
    local = tmp_path / "OpenGVLab" / "InternVL2-1B"
    local.parent.mkdir()
    local.symlink_to(CKPT.parent / "tiny-2B")
    assert resolve_checkpoint(REPO_ID) == Path(REPO_ID)
    assert AutoModel.from_pretrained(REPO_ID).config.llm.architecture == "InternLM2ForCausalLM"
    assert type(AutoTokenizer.from_pretrained(REPO_ID)).__name__ == "InternLM2Tokenizer"


# ---------------------------------------------------------------------------------------------------
# the terminal commands
# ---------------------------------------------------------------------------------------------------


def _internvl(*args: str, cache: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "internvl_runtime", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


def test_internvl_generate_with_a_hub_id(hub_cache: Path, tmp_path: Path) -> None:
    common = ("--prompt", "Hello", "--max-tokens", "6", "--dtype", "float32")
    by_id = _internvl("generate", REPO_ID, *common, cache=hub_cache, cwd=tmp_path)
    assert by_id.returncode == 0, by_id.stderr
    by_folder = _internvl("generate", str(CKPT), *common, cache=hub_cache, cwd=tmp_path)
    assert by_folder.returncode == 0, by_folder.stderr
    assert by_id.stdout == by_folder.stdout and by_id.stdout.strip()
    pinned = _internvl("generate", REPO_ID, "--revision", REVISION, *common, cache=hub_cache, cwd=tmp_path)
    assert pinned.returncode == 0 and pinned.stdout == by_folder.stdout, pinned.stderr


def test_internvl_generate_errors_are_one_line(hub_cache: Path, tmp_path: Path) -> None:
    uncached = _internvl("generate", "OpenGVLab/InternVL2-2B", "--prompt", "hi", cache=hub_cache, cwd=tmp_path)
    assert uncached.returncode == 1
    assert "Traceback" not in uncached.stderr
    assert "OpenGVLab/InternVL2-2B" in uncached.stderr and "HF_HUB_OFFLINE" in uncached.stderr
    missing = _internvl("generate", "no/such/folder", "--prompt", "hi", cache=hub_cache, cwd=tmp_path)
    assert missing.returncode == 1 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr
