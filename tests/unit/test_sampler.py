"""Sampler: against a plain per-row reference, seeds, greedy, logprobs, the greedy fast path."""

from __future__ import annotations

import pytest
import torch

from internvl_runtime.engine.sampler import Sampler, SamplingRow, draw_uniform, make_generator
from internvl_runtime.engine.sampling_params import SamplingParams

V = 32


def reference_logits(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """One row, step by step, written the obvious way (transformers' processors and warpers)."""
    x = logits.clone().float()
    p = row.params
    seen = list(row.token_ids)
    if p.repetition_penalty_scope == "generated":
        seen = p.repetition_penalty_prefix_ids + seen[len(seen) - row.num_output_tokens :]
    if p.repetition_penalty != 1.0 and seen:
        for t in set(seen):
            x[t] = x[t] * p.repetition_penalty if x[t] < 0 else x[t] / p.repetition_penalty
    if row.num_output_tokens < p.min_new_tokens:
        for t in list(p.stop_token_ids) + ([] if p.ignore_eos else list(row.eos_token_ids)):
            x[t] = float("-inf")
    if p.is_greedy:
        return x
    x = x / p.temperature
    if p.top_k > 0:
        kth = torch.topk(x, min(p.top_k, x.numel())).values[-1]
        x[x < kth] = float("-inf")
    if p.top_p < 1.0:
        order = torch.argsort(x)  # ascending
        cumulative = torch.softmax(x[order], dim=-1).cumsum(dim=-1)
        for rank, token in enumerate(order.tolist()[:-1]):
            if cumulative[rank] <= 1 - p.top_p:
                x[token] = float("-inf")
    return x


def rows_for(
    params: list[SamplingParams], histories: list[list[int]] | None = None, outputs: int = 0
) -> list[SamplingRow]:
    histories = histories or [[] for _ in params]
    return [
        SamplingRow(p, h, outputs, make_generator(p), eos_token_ids=[1]) for p, h in zip(params, histories, strict=True)
    ]


MIXED = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(top_p=0.6),
    SamplingParams(temperature=0.5, top_k=8, top_p=0.9, repetition_penalty=1.5),
    SamplingParams(temperature=0.8, do_sample=False, repetition_penalty=0.7),
    SamplingParams(top_k=-1, top_p=0.05),
    SamplingParams(top_k=V + 10, min_new_tokens=3, stop_token_ids=[4, 5]),
]


def test_processed_logits_match_the_reference() -> None:
    torch.manual_seed(0)
    logits = torch.randn(len(MIXED), V) * 3
    histories = [[3, 3, 7, 9, 0], [1], [2, 2], [], [0, 1, 2, 3, 31], [5, 6], [], [8]]
    rows = rows_for(MIXED, histories)
    penalized = Sampler.penalize(logits, rows)
    sampling = [i for i, r in enumerate(rows) if not r.params.is_greedy]
    warped = Sampler.warp(penalized[sampling], [rows[i] for i in sampling])
    for j, i in enumerate(sampling):
        torch.testing.assert_close(
            torch.softmax(warped[j], -1), torch.softmax(reference_logits(logits[i], rows[i]), -1)
        )
    for i, row in enumerate(rows):
        if row.params.is_greedy:
            assert penalized[i].argmax() == reference_logits(logits[i], row).argmax()
    assert torch.equal(logits, logits.clone())  # the input is not modified


def test_sampled_tokens_follow_the_reference_distribution() -> None:
    torch.manual_seed(1)
    base = torch.randn(V) * 2
    for params in MIXED[1:5] + MIXED[6:]:
        n = 4000
        rows = [SamplingRow(params, [3, 4], 0) for _ in range(n)]
        tokens = Sampler()(base.expand(n, V).contiguous(), rows).token_ids
        empirical = torch.bincount(torch.tensor(tokens), minlength=V).float() / n
        expected = torch.softmax(reference_logits(base, rows[0]), -1)
        assert (empirical - expected).abs().max() < 0.035, params
        assert all(expected[t] > 0 for t in set(tokens)), "a token outside top-k / top-p was sampled"


def test_greedy_equals_argmax_and_top_k_1_equals_greedy() -> None:
    torch.manual_seed(2)
    logits = torch.randn(6, V)
    argmax = logits.argmax(-1).tolist()
    assert Sampler()(logits, rows_for([SamplingParams(temperature=0)] * 6)).token_ids == argmax
    assert Sampler()(logits, rows_for([SamplingParams(top_k=1, seed=i) for i in range(6)])).token_ids == argmax
    assert Sampler()(logits, rows_for([SamplingParams(temperature=5.0, do_sample=False)] * 6)).token_ids == argmax


def test_greedy_only_batch_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise AssertionError("slow path used")

    monkeypatch.setattr(Sampler, "penalize", staticmethod(boom))
    logits = torch.randn(4, V)
    out = Sampler()(logits, rows_for([SamplingParams(temperature=0)] * 4))
    assert out.token_ids == logits.argmax(-1).tolist() and out.logprobs == [None] * 4


def test_seeded_rows_are_reproducible_and_batch_independent() -> None:
    torch.manual_seed(3)
    steps = [torch.randn(5, V) for _ in range(10)]
    seeded = SamplingParams(temperature=1.0, seed=1234)

    def run(row_index: int, others: list[SamplingParams]) -> list[int]:
        params = [*others[:row_index], seeded, *others[row_index:]]
        rows = rows_for(params)
        out = []
        for logits in steps:
            batch = logits[: len(params)].clone()
            batch[row_index] = logits[4]
            out.append(Sampler()(batch, rows).token_ids[row_index])
        return out

    alone = run(0, [])
    assert run(0, []) == alone
    assert run(2, [SamplingParams(), SamplingParams(temperature=0), SamplingParams(seed=9, top_p=0.5)]) == alone
    assert run(1, [SamplingParams(seed=7)]) == alone
    assert len(set(alone)) > 1  # it really samples
    other_seed = rows_for([SamplingParams(seed=4321)])
    assert [Sampler()(logits[4:5], other_seed).token_ids[0] for logits in steps] != alone


def test_repetition_penalty_matches_transformers_rule() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.5, -1.0, 0.5]])
    rows = [SamplingRow(SamplingParams(temperature=0, repetition_penalty=2.0), [0, 1, 1], 0)]
    torch.testing.assert_close(Sampler.penalize(logits, rows), torch.tensor([[1.0, -4.0, 1.5, -1.0, 0.5]]))
    # Greedy choice flips once the leader is penalised.
    assert Sampler()(logits, rows).token_ids == [2]


def test_repetition_penalty_scope_generated_skips_the_prompt() -> None:
    """transformers' generate given inputs_embeds penalises the ids it tracks: its start (bos) id and the
    generated ids, never the prompt; scope "all" (vLLM) penalises the prompt too."""
    logits = torch.tensor([[2.0, -2.0, 1.7, -1.0, 0.5, 3.0]])
    prompt, generated = [2, 3, 4], [0, 0]
    official = SamplingParams(
        temperature=0, repetition_penalty=2.0, repetition_penalty_scope="generated", repetition_penalty_prefix_ids=[5]
    )
    rows = [SamplingRow(official, prompt + generated, len(generated))]
    expected = torch.tensor([[1.0, -2.0, 1.7, -1.0, 0.5, 1.5]])  # 0 (generated) and 5 (prefix) only, once each
    torch.testing.assert_close(Sampler.penalize(logits, rows), expected)
    everything = [SamplingRow(SamplingParams(temperature=0, repetition_penalty=2.0), prompt + generated, 2)]
    torch.testing.assert_close(
        Sampler.penalize(logits, everything), torch.tensor([[1.0, -2.0, 0.85, -2.0, 0.25, 3.0]])
    )
    # nothing generated yet: the prefix alone; no prefix either: no penalty at all
    torch.testing.assert_close(
        Sampler.penalize(logits, [SamplingRow(official, prompt, 0)]), torch.tensor([[2.0, -2.0, 1.7, -1.0, 0.5, 1.5]])
    )
    bare = SamplingParams(temperature=0, repetition_penalty=2.0, repetition_penalty_scope="generated")
    torch.testing.assert_close(Sampler.penalize(logits, [SamplingRow(bare, prompt, 0)]), logits)
    # the greedy choice follows: the prompt's 2 wins once only the generated ids (and the prefix) count
    assert Sampler()(logits, everything).token_ids == [5]
    assert Sampler()(logits, rows).token_ids == [2]


def test_repetition_penalty_scopes_mixed_in_one_batch_match_the_reference() -> None:
    torch.manual_seed(5)
    logits = torch.randn(4, V) * 3
    scoped = SamplingParams(
        temperature=0, repetition_penalty=1.8, repetition_penalty_scope="generated", repetition_penalty_prefix_ids=[9]
    )
    params = [scoped, SamplingParams(temperature=0, repetition_penalty=1.8), scoped, SamplingParams(temperature=0)]
    histories = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [6, 7], [8]]
    rows = [SamplingRow(p, h, n) for p, h, n in zip(params, histories, [2, 2, 0, 1], strict=True)]
    penalized = Sampler.penalize(logits, rows)
    for i, row in enumerate(rows):  # greedy rows: the reference stops after the penalty and the masks
        torch.testing.assert_close(penalized[i], reference_logits(logits[i], row))
    assert not torch.equal(penalized[0], penalized[1])  # the scopes differ on the same history


def test_min_new_tokens_masks_eos_and_stop_ids() -> None:
    logits = torch.zeros(3, 8)
    logits[:, 1] = 10.0  # EOS is by far the most likely
    logits[:, 5] = 9.0  # then a stop token id
    greedy_min = SamplingParams(temperature=0, min_new_tokens=2, stop_token_ids=[5])
    rows = [
        SamplingRow(greedy_min, [], 1, eos_token_ids=[1]),  # still masked
        SamplingRow(greedy_min, [], 2, eos_token_ids=[1]),  # min reached
        SamplingRow(
            SamplingParams(temperature=0, min_new_tokens=2, ignore_eos=True, stop_token_ids=[5]),
            [],
            0,
            eos_token_ids=[1],
        ),
    ]
    assert Sampler()(logits, rows).token_ids == [0, 1, 1]


def test_logprobs() -> None:
    torch.manual_seed(4)
    logits = torch.randn(4, V)
    params = [
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(temperature=0.5, logprobs=0, seed=1),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, repetition_penalty=1.7, logprobs=20),
    ]
    rows = rows_for(params, [[], [], [], [int(logits[3].argmax())]])
    out = Sampler()(logits, rows)
    reference = torch.log_softmax(Sampler.penalize(logits, rows), -1)
    first, second, third, fourth = out.logprobs
    assert third is None
    assert first is not None and second is not None and fourth is not None
    assert first.token_id == out.token_ids[0] and first.top[0][0] == first.token_id
    assert [t for t, _ in first.top] == reference[0].topk(3).indices.tolist()
    assert first.logprob == pytest.approx(reference[0, out.token_ids[0]].item())
    assert second.top == [] and second.logprob == pytest.approx(reference[1, out.token_ids[1]].item())
    assert len(fourth.top) == 20 and fourth.top[0][0] == out.token_ids[3]
    assert all(a[1] >= b[1] for a, b in zip(fourth.top, fourth.top[1:], strict=False))


def test_extreme_top_p_keeps_the_most_likely_token() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).expand(50, 4).contiguous()
    rows = [SamplingRow(SamplingParams(top_p=1e-6), [], 0) for _ in range(50)]
    assert set(Sampler()(logits, rows).token_ids) == {1}


def test_make_generator() -> None:
    assert make_generator(SamplingParams()) is None
    g = make_generator(SamplingParams(seed=5))
    assert g is not None and g.initial_seed() == 5 and g.device == torch.device("cpu")
    on = make_generator(SamplingParams(seed=5), torch.device("cpu"))
    assert on is not None and on.device == torch.device("cpu")


def test_draw_uniform_draws_on_the_generators_device_and_moves_the_number() -> None:
    """A generator on another device than the logits (a CPU generator with CUDA logits) draws on its own
    device and the number is moved: the draw is the generator's, whatever the target. (The CUDA case itself
    needs a GPU; the meta device stands in for "another device" here.)"""
    g, reference = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    expected = torch.rand(1, generator=reference)
    same = draw_uniform(g, torch.device("cpu"))
    assert same.device == torch.device("cpu") and torch.equal(same, expected)
    moved = draw_uniform(g, torch.device("meta"))
    assert moved.device.type == "meta" and moved.shape == (1,)
    torch.rand(1, generator=reference)                     # the moved draw took one number of the generator
    assert torch.equal(draw_uniform(g, torch.device("cpu")), torch.rand(1, generator=reference))


def test_stop_ids_outside_the_vocabulary_are_ignored() -> None:
    rows = [SamplingRow(SamplingParams(temperature=0, min_new_tokens=1, stop_token_ids=[3, 10**6]), [], 0)]
    logits = torch.zeros(1, 8)
    logits[0, 3] = 1.0
    assert Sampler()(logits, rows).token_ids == [0]


def test_logit_bias_is_added_before_everything_and_ignores_ids_past_the_vocabulary() -> None:
    logits = torch.zeros(2, V)
    logits[:, 3] = 5.0
    rows = rows_for([SamplingParams(temperature=0, logit_bias={7: 10.0, 3: -2.5, V + 4: 50.0}),
                     SamplingParams(temperature=0)])
    out = Sampler.penalize(logits, rows)
    expected = torch.zeros(V)
    expected[3], expected[7] = 2.5, 10.0
    torch.testing.assert_close(out[0], expected)
    torch.testing.assert_close(out[1], logits[1])
    assert Sampler()(logits, rows).token_ids == [7, 3]
    # -100 makes a token practically impossible, even the argmax of a sampling row
    sampled = Sampler()(logits[:1].expand(20, V).contiguous(),
                        rows_for([SamplingParams(logit_bias={3: -100.0}, seed=s) for s in range(20)]))
    assert 3 not in sampled.token_ids


def test_frequency_and_presence_penalties_count_generated_tokens_only() -> None:
    # prompt [9, 9, 4], generated [4, 4, 6, 4]: token 4 generated 3 times, 6 once; 9 is prompt only
    history = [9, 9, 4, 4, 4, 6, 4]
    logits = torch.randn(3, V)
    params = [SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=1.5),
              SamplingParams(temperature=0, frequency_penalty=-1.0),
              SamplingParams(temperature=0)]
    rows = [SamplingRow(p, history, 4) for p in params]
    out = Sampler.penalize(logits, rows)
    expected = logits.clone()
    expected[0, 4] -= 0.5 * 3 + 1.5
    expected[0, 6] -= 0.5 * 1 + 1.5
    expected[1, 4] += 3.0
    expected[1, 6] += 1.0
    torch.testing.assert_close(out, expected)
    # nothing generated yet: no penalty at all
    torch.testing.assert_close(Sampler.penalize(logits, [SamplingRow(params[0], [9, 4], 0)] * 3), logits)


def test_penalties_follow_logit_bias_then_repetition_penalty_in_vllm_order() -> None:
    logits = torch.tensor([[2.0, 1.0, -1.0] + [0.0] * (V - 3)])
    params = SamplingParams(temperature=0, logit_bias={0: 2.0, 2: 1.0}, repetition_penalty=2.0,
                            presence_penalty=0.5)
    out = Sampler.penalize(logits, [SamplingRow(params, [5, 0, 2], 2)])   # generated: [0, 2]
    # token 0: (2 + 2) / 2 - 0.5 = 1.5; token 2: (-1 + 1) * 2 - 0.5 = -0.5; token 5 (prompt): 0 / 2
    assert out[0, :3].tolist() == [1.5, 1.0, -0.5] and out[0, 5].item() == 0.0


def test_min_p_drops_tokens_below_min_p_times_the_top_probability_after_temperature() -> None:
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08] + [0.0] * (V - 4))
    logits = probs.clamp_min(1e-12).log().unsqueeze(0)
    # temperature 1: threshold 0.2 * 0.5 = 0.1 -> tokens 0, 1, 2 kept
    kept = Sampler.warp(logits.clone(), rows_for([SamplingParams(min_p=0.2)]))
    assert torch.isfinite(kept[0]).nonzero().flatten().tolist() == [0, 1, 2]
    # temperature 0.5 sharpens first (probs ~ p^2): 0.25, 0.09, 0.0144, 0.0064 -> threshold 0.05 keeps 0, 1
    sharp = Sampler.warp(logits.clone(), rows_for([SamplingParams(min_p=0.2, temperature=0.5)]))
    assert torch.isfinite(sharp[0]).nonzero().flatten().tolist() == [0, 1]
    # min_p = 1 keeps only the top; 0 keeps all
    assert torch.isfinite(Sampler.warp(logits.clone(), rows_for([SamplingParams(min_p=1.0)]))[0]).sum() == 1
    off = Sampler.warp(logits.clone(), rows_for([SamplingParams(min_p=0.0)]))
    assert torch.isfinite(off[0]).sum() == V
    tokens = Sampler()(logits.expand(300, V).contiguous(),
                       rows_for([SamplingParams(min_p=0.2, seed=s) for s in range(300)])).token_ids
    assert set(tokens) == {0, 1, 2}


def test_greedy_fast_path_is_left_only_for_bias_and_penalties(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = Sampler.penalize

    def spy(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        calls.append(len(rows))
        return original(logits, rows)

    monkeypatch.setattr(Sampler, "penalize", staticmethod(spy))
    logits = torch.randn(2, V)
    Sampler()(logits, rows_for([SamplingParams(temperature=0, min_p=0.5)] * 2, [[1], [2]], outputs=1))
    assert calls == []    # min_p does not change a greedy choice: still the fast path
    for extra in ({"presence_penalty": 0.1}, {"frequency_penalty": 0.1}, {"logit_bias": {1: 1.0}}):
        Sampler()(logits, rows_for([SamplingParams(temperature=0, **extra)] * 2, [[1], [2]], outputs=1))
    assert calls == [2, 2, 2]
