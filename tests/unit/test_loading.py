"""The one loader (``internvl_runtime.loading``) and its callers: per-tensor progress over the checkpoint's
bytes, ``AutoModel`` and ``LLMEngine.from_pretrained`` as callers of it, a builder of one's own (tensor
parallelism), the terminal chat's imports (no web stack), and the layer order of ARCHITECTURE.md."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import internvl_runtime
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
                            "device_map", "load_in_8bit", "load_in_4bit", "quantization", "allow_pickle", "kwargs"]
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
    assert not hasattr(model, "compute_plan")        # sliced layers keep torch (see loading's docstring)
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


# ---------------------------------------------------------------------------------------------------
# layer order (ARCHITECTURE.md): each box imports only from boxes below it
# ---------------------------------------------------------------------------------------------------

LAYERS = [{"errors", "config", "hardware", "testing"}, {"weights", "processing", "kernels"},
          {"models", "quantization"}, {"compute_plan", "placement", "decode_stack"}, {"loading"}, {"engine"},
          {"distributed"}, {"api"}, {"serving"}, {"cli", "__main__", "__init__"}]
# Upward imports still there (known debts, to be removed, not added to): any other one fails the test.
KNOWN_UPWARD = {
    ("kernels.decode_step", "models.layers.linear"),     # the native decode stack inspects our Linear layers
    ("kernels.decode_step", "quantization.linear"),      # ... and the int8/int4 ones
    ("processing.inputs", "engine.sequence"),           # MultiModalSpan is defined with the engine's Sequence
    ("serving.app", "__version__"),                     # the package root's version string
    ("cli", "__version__"),
}


def _imports(path: Path, module: str) -> list[str]:
    """Package-relative names of the internvl_runtime modules (or root attributes) ``path`` imports."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names = [f"{name}.{a.name}" for a in node.names] if name == "internvl_runtime" else [name]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [n.removeprefix("internvl_runtime.") for n in names if n.startswith("internvl_runtime.")]
    return found


def test_layers_import_downward_only() -> None:
    rank = {box: i for i, boxes in enumerate(LAYERS) for box in boxes}
    root = Path(internvl_runtime.__file__).parent
    upward = set()
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"
        box = module.split(".")[0]
        assert box in rank, f"{module}: add its box to LAYERS (and to ARCHITECTURE.md's layer order)"
        for name in _imports(path, f"internvl_runtime.{module}".removesuffix(".__init__")):
            other = name.split(".")[0]
            if other != box and rank.get(other, len(LAYERS)) > rank[box]:
                upward.add((module, name))
    assert upward - KNOWN_UPWARD == set(), "imports from a layer above (see ARCHITECTURE.md)"
