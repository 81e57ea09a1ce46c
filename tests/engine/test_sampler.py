"""Sampler: greedy, filters, penalties, seeds and logprobs on small hand-made logits."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from auto_glm.engine.request import Request
from auto_glm.engine.sampler import Sampler, SamplingBatch, apply_penalties
from auto_glm.sampling_params import SamplingParams


def make_batch(
    params: list[SamplingParams],
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
) -> SamplingBatch:
    requests = []
    for i, p in enumerate(params):
        req = Request(f"r{i}", prompts[i] if prompts else [0], p)
        for t in outputs[i] if outputs else []:
            req.append_output_token(t)
        requests.append(req)
    return SamplingBatch.from_requests(requests, "cpu")


def probs_logits(probs: list[float], rows: int) -> torch.Tensor:
    """[rows, V] logits whose softmax is ``probs``."""
    return torch.tensor(probs).log().expand(rows, -1).contiguous()


def sample_many(
    probs: list[float], n: int = 2000, sampler: Sampler | None = None, **kw: float
) -> torch.Tensor:
    batch = make_batch([SamplingParams(**kw) for _ in range(n)])
    out = (sampler or Sampler())(probs_logits(probs, n), batch)
    return torch.bincount(torch.tensor(out.token_ids), minlength=len(probs)) / n


def test_greedy_equals_argmax() -> None:
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(0))
    out = Sampler()(logits, make_batch([SamplingParams(temperature=0)] * 6))
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6


def test_plain_sampling_follows_the_distribution() -> None:
    freq = sample_many([0.6, 0.3, 0.1], n=6000)
    assert torch.allclose(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.03)


def test_temperature_sharpens() -> None:
    freq = sample_many([0.6, 0.3, 0.1], n=4000, temperature=0.25)
    # p ** 4 renormalized: 0.9407, 0.0588, 0.0005
    assert freq[0] > 0.9 and freq[2] < 0.01


def test_top_k_keeps_only_the_top_k_and_renormalizes() -> None:
    probs = [0.05, 0.3, 0.1, 0.4, 0.15]
    freq = sample_many(probs, n=6000, top_k=2)
    assert freq[0] == freq[2] == freq[4] == 0
    assert torch.allclose(freq[[3, 1]], torch.tensor([4 / 7, 3 / 7]), atol=0.03)


@pytest.mark.parametrize("candidates", [256, 3, 1])  # full vocab, fits in K, falls back to sort
def test_top_p_keeps_the_nucleus(candidates: int) -> None:
    probs = [0.05, 0.3, 0.15, 0.5]
    sampler = Sampler(nucleus_candidates=candidates)
    freq = sample_many(probs, n=4000, sampler=sampler, top_p=0.75)  # 0.5 + 0.3 reach it
    assert freq[0] == freq[2] == 0 and freq[1] > 0.3 and freq[3] > 0.5
    freq = sample_many(probs, n=4000, sampler=sampler, top_p=0.85)
    assert freq[0] == 0 and (freq[[1, 2, 3]] > 0).all()


def test_top_k_then_top_p_works_on_the_renormalized_top_k() -> None:
    # top-2 renormalized is 0.625 / 0.375, so top_p=0.6 keeps the first token only
    freq = sample_many([0.05, 0.3, 0.15, 0.5], n=500, top_k=2, top_p=0.6)
    assert freq[3] == 1


def test_min_p_drops_tokens_below_the_scaled_maximum() -> None:
    probs = [0.05, 0.3, 0.15, 0.5]
    freq = sample_many(probs, n=4000, min_p=0.2)  # threshold 0.1
    assert freq[0] == 0 and (freq[[1, 2, 3]] > 0).all()
    freq = sample_many(probs, n=4000, sampler=Sampler(nucleus_candidates=3), min_p=0.5)
    assert freq[0] == freq[2] == 0 and (freq[[1, 3]] > 0).all()


def test_penalties_exact_values() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]] * 2)
    batch = make_batch(
        [
            SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
            SamplingParams(),
        ],
        prompts=[[0, 1, 99], [0, 1]],  # 99 is outside the vocabulary: ignored
        outputs=[[3, 3, 4], [3]],
    )
    out = apply_penalties(logits, batch)
    # repetition over prompt+output {0, 1, 3, 4}: positive / 2, negative * 2; then output
    # counts {3: 2, 4: 1} subtract 0.5 presence + 0.25 per occurrence
    assert out[0].tolist() == [1.0, -2.0, 0.5, 1.5 - 0.5 - 0.5, -4.0 - 0.5 - 0.25]
    assert torch.equal(out[1], logits[1])
    assert logits[0, 0] == 2.0  # the caller's logits are left alone


def test_presence_and_frequency_ignore_prompt_tokens() -> None:
    logits = torch.zeros(1, 4)
    batch = make_batch(
        [SamplingParams(presence_penalty=1.0, frequency_penalty=1.0)],
        prompts=[[0, 0, 1]],
        outputs=[[2, 2, 2]],
    )
    assert apply_penalties(logits, batch)[0].tolist() == [0.0, 0.0, -4.0, 0.0]


def test_greedy_takes_argmax_of_penalized_logits() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.9]])
    batch = make_batch([SamplingParams(temperature=0, repetition_penalty=1.5)], outputs=[[1]])
    assert Sampler()(logits, batch).token_ids == [2]


def run_steps(
    sampler: Sampler,
    steps: list[torch.Tensor],
    params: list[SamplingParams],
    row: int,
) -> list[int]:
    """Tokens of row ``row`` over several steps with the given per-step logits; like the
    engine, every row's token is appended to its request before the next step."""
    requests = [Request(f"r{i}", [0], p) for i, p in enumerate(params)]
    tokens = []
    for logits in steps:
        out = sampler(logits, SamplingBatch.from_requests(requests, "cpu"))
        for request, token in zip(requests, out.token_ids, strict=True):
            request.append_output_token(token)
        tokens.append(out.token_ids[row])
    return tokens


@pytest.mark.parametrize("sync_free", [False, True])
def test_seed_is_reproducible_and_independent_of_the_batch(sync_free: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    steps = [torch.randn(4, 1000, generator=gen) for _ in range(8)]
    seeded = SamplingParams(temperature=1.0, top_k=50, seed=1234)
    alone = run_steps(Sampler(), [s[:1] for s in steps], [seeded], 0)
    # other rows force other paths: no top-k (nucleus candidates), a full sort, greedy
    others = [SamplingParams(top_p=0.9), SamplingParams(temperature=0), SamplingParams()]
    for position in (0, 2, 3):
        params = others[:position] + [seeded] + others[position:]
        logits = [torch.cat([s[1 : 1 + position], s[:1], s[1 + position :]]) for s in steps]
        sampler = Sampler(sync_free=sync_free)
        assert run_steps(sampler, logits, params, position) == alone
    assert len(set(alone)) > 1  # it really sampled


@pytest.mark.parametrize(
    "params",
    [SamplingParams(top_p=0.95), SamplingParams(min_p=0.01), SamplingParams(top_k=900)],
)
def test_a_seeded_draw_does_not_depend_on_the_candidates(params: SamplingParams) -> None:
    # the nucleus fits in 256 candidates but not in 8, and sync_free sorts everything
    steps = [torch.randn(3, 1000, generator=torch.Generator().manual_seed(s)) * 3 for s in range(6)]
    rows = [replace(params, seed=s) for s in (5, 6, 7)]
    samplers = [Sampler(), Sampler(nucleus_candidates=8), Sampler(sync_free=True)]
    runs = [[run_steps(sampler, steps, rows, row) for row in range(3)] for sampler in samplers]
    assert runs[0] == runs[1] == runs[2]


def test_same_seed_same_tokens_and_different_seeds_differ() -> None:
    steps = [torch.zeros(1, 1000)] * 10  # uniform: every step is a fresh draw
    first = run_steps(Sampler(), steps, [SamplingParams(seed=7)], 0)
    assert run_steps(Sampler(), steps, [SamplingParams(seed=7)], 0) == first
    assert run_steps(Sampler(), steps, [SamplingParams(seed=8)], 0) != first
    assert run_steps(Sampler(), steps, [SamplingParams(seed=7 + 2**32)], 0) != first
    assert run_steps(Sampler(), steps, [SamplingParams(seed=-7)], 0) != first


def test_a_seeded_draw_depends_on_the_tokens_generated_so_far() -> None:
    logits = torch.zeros(1, 1000)
    requests = [
        Request("a", [0], SamplingParams(seed=3)),
        Request("b", [0], SamplingParams(seed=3)),
    ]
    for t in (10, 11):
        requests[1].append_output_token(t)
    out = Sampler()(logits.expand(2, -1), SamplingBatch.from_requests(requests, "cpu"))
    assert out.token_ids[0] != out.token_ids[1]
    requests[0].append_output_token(99)
    requests[0].append_output_token(98)  # other tokens, the same count: the same draw
    assert Sampler()(logits, SamplingBatch.from_requests(requests[:1], "cpu")).token_ids == [
        out.token_ids[1]
    ]


def test_logprobs_are_raw_log_softmax_with_sorted_top_n() -> None:
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    batch = make_batch(
        [
            SamplingParams(logprobs=5, temperature=0.5, repetition_penalty=1.3),
            SamplingParams(),
            SamplingParams(logprobs=0, temperature=0),
        ],
        outputs=[[1, 2], [], []],
    )
    out = Sampler()(logits, batch)
    raw = logits.log_softmax(-1)
    chosen, top = out.logprobs[0]
    assert math.isclose(chosen, raw[0, out.token_ids[0]].item(), rel_tol=1e-6)
    values, ids = raw[0].topk(5)
    assert [i for i, _ in top] == ids.tolist()
    assert [v for _, v in top] == pytest.approx(values.tolist())
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert out.logprobs[1] is None
    assert out.logprobs[2] == (pytest.approx(raw[2].max().item()), [])


def test_mixed_greedy_and_sampled_batch() -> None:
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(5))
    params = [SamplingParams(temperature=0) if i % 2 else SamplingParams(top_k=3) for i in range(8)]
    for _ in range(20):
        out = Sampler()(logits, make_batch(params))
        for row, token in enumerate(out.token_ids):
            if row % 2:
                assert token == logits[row].argmax().item()
            else:
                assert token in logits[row].topk(3).indices.tolist()


def test_wrong_logits_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="rows"):
        Sampler()(torch.zeros(3, 10), make_batch([SamplingParams()] * 2))


def sample_seeded(probs: list[float], n: int = 4000, **kw: float) -> torch.Tensor:
    """Token frequencies of ``n`` rows seeded 0..n-1: the same on every run."""
    batch = make_batch([SamplingParams(seed=i, **kw) for i in range(n)])
    out = Sampler()(probs_logits(probs, n), batch)
    return torch.bincount(torch.tensor(out.token_ids), minlength=len(probs)) / n


def test_empty_batch_is_refused() -> None:
    with pytest.raises(ValueError) as caught:
        SamplingBatch.from_requests([], "cpu")
    assert str(caught.value) == "no requests to sample for: build a SamplingBatch only when B >= 1"


def test_each_penalty_alone_and_before_any_output() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0, 3.0]])

    def penalized(outputs: list[int], **params: float) -> list[float]:
        batch = make_batch([SamplingParams(**params)], prompts=[[0, 1]], outputs=[outputs])
        return apply_penalties(logits, batch)[0].tolist()

    # the first step has no output yet: only the repetition penalty (on the prompt) acts
    assert penalized([], presence_penalty=1.0) == [2.0, 0.5, -1.0, 3.0]
    assert penalized([], frequency_penalty=1.0) == [2.0, 0.5, -1.0, 3.0]
    assert penalized([], repetition_penalty=2.0) == [1.0, 0.25, -1.0, 3.0]
    assert penalized([2, 2], presence_penalty=1.0) == [2.0, 0.5, -2.0, 3.0]
    assert penalized([2, 2], frequency_penalty=1.0) == [2.0, 0.5, -3.0, 3.0]
    assert penalized([2, 2], repetition_penalty=2.0) == [1.0, 0.25, -2.0, 3.0]


def test_ids_just_outside_the_vocabulary_touch_nothing() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    params = [SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0)] * 2
    batch = make_batch(params, prompts=[[3], [3]], outputs=[[3], [3]])  # id == vocab size
    assert torch.equal(apply_penalties(logits, batch), logits)


def test_sampling_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    sample_many([0.5, 0.5], n=10)
    Sampler()(torch.zeros(2, 8), make_batch([SamplingParams(top_k=4), SamplingParams(seed=1)]))
    assert torch.equal(torch.rand(3), expected)


def test_a_seeded_request_draws_fresh_noise_every_step() -> None:
    steps = [torch.zeros(1, 1000)] * 10  # uniform: only the noise decides
    tokens = run_steps(Sampler(), steps, [SamplingParams(seed=7)], 0)
    assert len(set(tokens)) > 1  # the same noise every step would repeat one token


@pytest.mark.parametrize("others", [[], [SamplingParams(top_p=0.5)]])
def test_top_k_of_one_is_greedy(others: list[SamplingParams]) -> None:
    logits = torch.randn(1 + len(others), 50, generator=torch.Generator().manual_seed(8))
    sampler = Sampler()
    params = [SamplingParams(top_k=1), *others]
    for _ in range(30):
        assert sampler(logits, make_batch(params)).token_ids[0] == logits[0].argmax().item()


def test_each_row_keeps_its_own_top_k() -> None:
    # one row keeps 2 tokens, the other 4: the first must never draw its 3rd or 4th
    probs = [0.3, 0.25, 0.2, 0.15, 0.1]
    params = [
        SamplingParams(top_k=2, seed=i) if i % 2 else SamplingParams(top_k=4, seed=i)
        for i in range(2000)
    ]
    out = Sampler()(probs_logits(probs, 2000), make_batch(params))
    assert set(out.token_ids[1::2]) == {0, 1} and set(out.token_ids[0::2]) == {0, 1, 2, 3}


def test_top_k_renormalizes_exactly() -> None:
    # three kept tokens (with two, sampling p / q and p * q happen to agree)
    freq = sample_seeded([0.5, 0.3, 0.15, 0.05], n=8000, top_k=3)
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    assert torch.allclose(freq, expected, atol=0.015), freq


def test_top_p_stops_at_exactly_the_mass() -> None:
    # four tied tokens of exactly 0.25: two of them already reach top_p = 0.5
    freq = sample_seeded([0.25] * 4, n=2000, top_p=0.5)
    assert int((freq > 0).sum()) == 2


def test_min_p_keeps_every_token_tied_with_the_top() -> None:
    freq = sample_seeded([0.4, 0.4, 0.2], n=2000, min_p=1.0)
    assert freq[2] == 0 and freq[0] > 0.4 and freq[1] > 0.4


def test_nucleus_counts_the_mass_of_the_whole_vocabulary() -> None:
    # the top 3 of 4 candidates hold 0.9: renormalized over them alone, the nucleus of 0.75
    # would end after two tokens, but over the vocabulary it takes the third one too
    freq = sample_seeded([0.4, 0.3, 0.2, 0.1], n=4000, top_p=0.75)
    expected = torch.tensor([0.4, 0.3, 0.2, 0.0]) / 0.9
    assert torch.allclose(freq, expected, atol=0.02), freq
    sampler = Sampler(nucleus_candidates=3)
    batch = make_batch([SamplingParams(seed=i, top_p=0.75) for i in range(4000)])
    out = sampler(probs_logits([0.4, 0.3, 0.2, 0.1], 4000), batch)
    assert torch.equal(torch.bincount(torch.tensor(out.token_ids), minlength=4) / 4000, freq)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "params",
    [
        [SamplingParams(temperature=0)] * 3,  # argmax only: read in the model's dtype
        [SamplingParams(temperature=0), SamplingParams(seed=4, top_p=0.9), SamplingParams()],
        [SamplingParams(temperature=0, logprobs=3)] * 3,
        [SamplingParams(temperature=0, repetition_penalty=1.5)] * 3,
    ],
    ids=["greedy", "seeded-and-greedy", "logprobs", "penalty"],
)
@pytest.mark.parametrize("native_argmax", [True, False])
def test_model_dtype_logits_sample_as_their_float32_copy(dtype, params, native_argmax) -> None:
    """The model's bfloat16 or float16 logits (a tie among the top ones included) give
    what their exact float32 copy gives, whichever path the batch takes, with the argmax
    read from them (the GPU's default) or from a float32 copy (the CPU's)."""
    gen = torch.Generator().manual_seed(9)
    logits = (torch.randn(3, 400, generator=gen) * 4).to(dtype)
    logits[1, 7] = logits[1, 300] = logits[1].max() + 1  # a tie: the first index wins
    seeded = [p for p in params if p.seed is not None or p.temperature == 0]

    def run(values: torch.Tensor) -> tuple:
        sampler = Sampler(native_argmax=native_argmax)
        out = sampler(values, make_batch(params, outputs=[[7, 8], [9], []]))
        drawn = [t for t, p in zip(out.token_ids, params, strict=True) if p in seeded]
        return drawn, out.logprobs, out.finite

    assert run(logits) == run(logits.float())
    if all(p.temperature == 0 and not p.has_penalties for p in params):
        sampler = Sampler(native_argmax=native_argmax)
        assert sampler(logits, make_batch(params)).token_ids[1] == 7


def test_the_finiteness_check_of_float16_logits_does_not_overflow() -> None:
    """Large finite float16 logits sum past float16's range: the row stays finite."""
    logits = torch.full((2, 64), 60_000.0, dtype=torch.float16)
    logits[1, 3] = float("nan")
    for native_argmax in (True, False):
        sampler = Sampler(native_argmax=native_argmax)
        out = sampler(logits, make_batch([SamplingParams(temperature=0)] * 2))
        assert out.finite == [True, False]
