"""The GPU defaults as pure decisions: dtype "auto" by compute capability, device "auto" by CUDA's presence,
``max_num_seqs`` by device type; and every entry point's default device going through the one function.

Without a GPU the entry points are checked for their CPU result; the CUDA answers are checked on the
functions, given the facts (a capability, ``cuda_available=True``) as arguments.
"""

from __future__ import annotations

import pytest
import torch

from internvl_runtime.cli import build_parser
from internvl_runtime.errors import InvalidRequest
from internvl_runtime.hardware import (
    auto_dtype,
    cuda_auto_dtype,
    cuda_supports_bf16,
    default_device,
    default_max_num_seqs,
)
from internvl_runtime.loading import check_dtype_runs
from internvl_runtime.serving.config import ServerConfig, resolve_device
from paths import FIXTURES

CKPT = FIXTURES / "ckpt" / "tiny-1B"
CAPABILITIES = [(6, 0), (6, 1), (7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]
CUDA0 = torch.device("cuda", 0)   # a device object only: nothing is allocated on it


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_auto_dtype_on_cuda_is_bf16_from_sm80_and_fp16_below(capability: tuple[int, int]) -> None:
    ampere = capability >= (8, 0)
    assert cuda_supports_bf16(capability) is ampere
    assert cuda_auto_dtype("bfloat16", capability) == (torch.bfloat16 if ampere else torch.float16)
    assert auto_dtype("bfloat16", CUDA0, capability) == cuda_auto_dtype("bfloat16", capability)
    # a checkpoint in another dtype keeps it: "auto" is the checkpoint's unless the GPU cannot compute it
    assert cuda_auto_dtype("float16", capability) == torch.float16
    assert cuda_auto_dtype("float32", capability) == torch.float32
    assert cuda_auto_dtype(None, capability) == torch.float32


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("checkpoint_dtype", ["bfloat16", "float16", "float32"])
def test_check_dtype_runs_accepts_what_auto_picks(capability: tuple[int, int], checkpoint_dtype: str) -> None:
    check_dtype_runs(cuda_auto_dtype(checkpoint_dtype, capability), CUDA0, capability)   # never raises
    if capability < (8, 0):
        with pytest.raises(InvalidRequest, match=r"compute capability 8\.0"):
            check_dtype_runs(torch.bfloat16, CUDA0, capability)
    else:
        check_dtype_runs(torch.bfloat16, CUDA0, capability)


def test_default_device_and_max_num_seqs() -> None:
    assert default_device(True) == "cuda" and default_device(False) == "cpu"
    assert default_max_num_seqs("cuda") == 256 and default_max_num_seqs("cpu") == 16
    assert default_max_num_seqs("mps") == 16


def test_serve_resolves_auto_through_default_device() -> None:
    here = default_device(torch.cuda.is_available())
    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("auto") == here
    assert resolve_device("cuda:1", cuda_available=False) == "cuda:1"      # an explicit device as given
    assert ServerConfig(model=str(CKPT)).device == here


@pytest.mark.parametrize("command", [["serve", str(CKPT)], ["chat", str(CKPT)],
                                     ["generate", str(CKPT), "--prompt", "hi"]])
def test_cli_commands_default_to_auto(command: list[str]) -> None:
    args = build_parser().parse_args(command)
    assert args.device == "auto" and args.dtype == "auto"
    assert resolve_device(args.device) == default_device(torch.cuda.is_available())


def test_pipeline_default_device_is_default_device() -> None:
    from internvl_runtime import pipeline

    with pipeline(CKPT, num_blocks=64) as pipe:
        model = pipe.engine.model
        expected = torch.device(default_device(torch.cuda.is_available()))
        assert model.language_model.get_input_embeddings().weight.device.type == expected.type
        assert pipe.engine.logits_device.type == expected.type
