"""The engine on the GPT-OSS tiny variant (tiny-3_5-20B-A4B: window 8, sinks, experts) on the "triton"
attention backend (the paged kernel with sinks and windows, under TRITON_INTERPRET on CPU tensors):
greedy answers equal the torch backend's and the official code's, with chunked prefill whose chunks cross
the window beside other requests' decode steps, a second round from the prefix cache, and the padded
batch-bucket path of CUDA graphs in its emulation mode (no capture without a GPU)."""

from __future__ import annotations

import pytest
from test_engine import _engine
from test_engine_gpt_oss import GREEDY, VARIANT, _requests

from internvl_runtime.engine.engine import LLMEngine
from internvl_runtime.kernels.triton_attention import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def _run(engine: LLMEngine) -> list[list[int]]:
    """Three first rounds at once (text; an image; six tiles), then a two-round chat whose second round
    reuses the first's cached blocks."""
    requests = [r for case in ("text_chat", "img_800x600_max1", "img_300x1200_max6_autoprefix")
                for r in _requests(engine, case)[:1]]
    outputs = [out.token_ids for out in engine.generate([r for r, _ in requests], GREEDY)]
    (first, _), (second, _) = _requests(engine, "text_two_round")
    outputs.append(engine.generate([first], GREEDY)[0].token_ids)
    again = engine.generate([second], GREEDY)[0]
    assert again.num_cached_tokens > 8, "the second round should start past the window from the prefix cache"
    return [*outputs, again.token_ids]


def _official() -> list[list[int]]:
    engine = _engine(VARIANT)
    requests = [r for case in ("text_chat", "img_800x600_max1", "img_300x1200_max6_autoprefix", "text_two_round")
                for r in _requests(engine, case)[:2 if case == "text_two_round" else 1]]
    return [ids for _, ids in requests]


def test_triton_backend_greedy_equals_torch_backend_and_official() -> None:
    torch_tokens = _run(_engine(VARIANT, attention_backend="torch", max_num_batched_tokens=24, block_size=4))
    engine = _engine(VARIANT, attention_backend="triton", enforce_eager=True, max_num_batched_tokens=24,
                     block_size=4)
    assert engine.runner.attention_backend == "triton" and engine.runner.graphs is None
    triton_tokens = _run(engine)
    assert triton_tokens == torch_tokens
    assert triton_tokens == _official()


def test_padded_bucket_path_equals_eager() -> None:
    # three text chats at once: their decode steps run through the buckets of 4 and 2 (padded) and 1
    def run(engine: LLMEngine) -> list[list[int]]:
        requests = [r for _, r in zip(range(3), (r for case in ("text_chat", "text_two_round")
                                                 for r, _ in _requests(engine, case)), strict=False)]
        return [out.token_ids for out in engine.generate(requests, GREEDY)]

    expected = run(_engine(VARIANT, attention_backend="triton", enforce_eager=True))
    engine = _engine(VARIANT, attention_backend="triton", max_num_seqs=4)
    graphs = engine.runner.graphs
    assert graphs is not None and not graphs.capture     # emulation: no GPU here
    assert run(engine) == expected
    assert {n for n, bucket in graphs.runs if n < bucket}, graphs.runs   # some decode steps ran padded
