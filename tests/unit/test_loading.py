"""The one loader (``internvl_runtime.loading``) and its callers: per-tensor progress over the checkpoint's
bytes, ``AutoModel`` and ``LLMEngine.from_pretrained`` as callers of it, a builder of one's own (tensor
parallelism), the terminal chat's imports (no web stack), and the layer order of ARCHITECTURE.md."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from internvl_runtime import AutoModel, InternVLChatModel, UnsupportedFeature, loading
from internvl_runtime.config import InternVLConfig
from internvl_runtime.engine.engine import LLMEngine
from internvl_runtime.engine.model_runner import ModelRunner
from internvl_runtime.models.internvl import InternVLModel, meta_model
from internvl_runtime.testing.checkpoints import write_checkpoint
from internvl_runtime.weights.loader import checkpoint_files, checkpoint_nbytes
from paths import FIXTURES

CKPT = FIXTURES / "ckpt" / "tiny-1B"


# ---------------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------------


def test_progress_counts_every_tensor_and_byte(tmp_path: Path) -> None:
    folder = write_checkpoint(tmp_path / "sharded", "1B", num_shards=2)
    files = checkpoint_files(folder)
    assert len(files) == 2
    num_tensors = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            num_tensors += len(list(f.keys()))
    model = meta_model(InternVLConfig.from_pretrained(folder), torch.float32)
    model.to_empty(device="cpu")
    seen: list[int] = []
    loading.read_checkpoint(model, folder, progress=seen.append)
    assert len(seen) == num_tensors
    assert sum(seen) == checkpoint_nbytes(files) > 0


def test_progress_bar_on_stderr_only_when_asked(capsys) -> None:
    loading.load_model(CKPT)
    assert capsys.readouterr().err == ""
    loading.load_model(CKPT, progress=True)
    err = capsys.readouterr().err
    assert "loading tiny-1B" in err and "100%" in err


# ---------------------------------------------------------------------------------------------------
# callers
# ---------------------------------------------------------------------------------------------------


def test_automodel_is_the_loader_with_the_chat_class() -> None:
    official = AutoModel.from_pretrained(CKPT, torch_dtype=torch.float32)
    plain = loading.load_model(CKPT, dtype=torch.float32)
    assert type(official) is InternVLChatModel and type(plain) is InternVLModel
    assert official.compute_plan == plain.compute_plan
    ours, theirs = official.state_dict(), plain.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_automodel_keeps_the_official_signature() -> None:
    params = inspect.signature(AutoModel.from_pretrained).parameters
    assert list(params) == ["path", "torch_dtype", "low_cpu_mem_usage", "use_flash_attn", "trust_remote_code",
                            "device_map", "load_in_8bit", "load_in_4bit", "quantization", "allow_pickle",
                            "revision", "cache_dir", "token", "local_files_only", "dtype", "attn_implementation",
                            "use_safetensors", "quantization_config", "kwargs"]
    with pytest.raises(TypeError, match="progress"):
        AutoModel.from_pretrained(CKPT, progress=True)


def test_engine_from_pretrained_loads_through_the_loader(capsys) -> None:
    built = []

    def runner_factory(model, **kwargs):
        built.append(ModelRunner(model, **kwargs))
        return built[-1]

    engine = LLMEngine.from_pretrained(CKPT, dtype="float32", num_blocks=16, progress=True,
                                       runner_factory=runner_factory)
    assert type(engine.model) is InternVLModel            # the engine needs no chat mixin (api/)
    assert engine.model.compute_plan.dtype == torch.float32
    assert built == [engine.runner]
    assert engine.runner.image_token_id == engine.processor.img_context_id
    assert "loading tiny-1B" in capsys.readouterr().err


def test_a_builder_of_its_own(monkeypatch) -> None:
    calls = []

    def build(plan: loading.LoadPlan, progress):
        calls.append((plan.dtype, plan.device, progress))
        model = meta_model(plan.config, plan.dtype)
        model.to_empty(device=plan.device)
        loading.read_checkpoint(model, plan.folder, progress=progress)
        return model

    model = loading.load_model(CKPT, dtype="bfloat16", build=build)
    assert calls == [(torch.bfloat16, torch.device("cpu"), None)]
    assert model.compute_plan is None                # sliced layers keep torch (see loading's docstring)
    monkeypatch.setattr(loading, "load_weights", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(UnsupportedFeature, match="tensor parallelism"):
        loading.load_model(CKPT, quantization="int8", build=build)
    assert len(calls) == 1


def test_plan_reads_no_weights(monkeypatch) -> None:
    monkeypatch.setattr(loading, "load_weights", lambda *a, **k: pytest.fail("weights were read"))
    plan = loading.plan_load(CKPT, dtype=None, device_map="cpu")
    assert (plan.dtype, plan.device, plan.unit_devices, plan.quantization) == (
        torch.float32, torch.device("cpu"), None, None)
    assert set(plan.units) >= {"vision_model", "mlp1"}


# ---------------------------------------------------------------------------------------------------
# the terminal chat without the web stack
# ---------------------------------------------------------------------------------------------------

_CHAT_PATH = """
import sys
from internvl_runtime import cli
assert cli.main(["generate", sys.argv[1], "--prompt", "hi", "--max-tokens", "2", "--dtype", "float32"]) == 0
assert cli.main(["chat", sys.argv[1], "--max-tokens", "2", "--dtype", "float32"]) == 0   # stdin: one turn, /exit
web = sorted(m for m in sys.modules if m.split(".")[0] in ("fastapi", "uvicorn", "starlette"))
print("web stack:", web)
"""


def test_chat_and_generate_run_without_the_web_stack() -> None:
    result = subprocess.run([sys.executable, "-c", _CHAT_PATH, str(CKPT)], input="hello\n/exit\n",
                            check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "you> " in result.stdout
    assert "web stack: []" in result.stdout
