"""Seeded sampling's counter-based RNG: a pure hash, uniform in (0, 1), and a seeded sampler
whose draws over many seeds follow the softmax on every sampling path."""

from __future__ import annotations

import warnings

import pytest
import torch

from auto_glm.engine.request import Request
from auto_glm.engine.sampler import Sampler, SamplingBatch
from auto_glm.engine.sampling_rng import (
    exponential_noise,
    hash32,
    mix32,
    seed_halves,
    uniforms,
)
from auto_glm.sampling_params import SamplingParams

MASK = 0xFFFFFFFF


def reference_hash(seed: int, position: int, token: int) -> int:
    """The hash in plain Python integers, which never overflow: the tensor version must
    agree bit for bit."""

    def mix(h: int) -> int:
        h ^= h >> 16
        h = (h * 0x21F0AAAD) & MASK
        h ^= h >> 15
        h = (h * 0x735A2D97) & MASK
        return h ^ (h >> 16)

    lo, hi = seed & MASK, (seed >> 32) & MASK
    key = mix(mix(mix(lo ^ 0x9E3779B9) ^ hi) ^ position)
    return mix(mix(token) ^ key)


def one_hash(seed: int, position: int, token: int) -> int:
    lo, hi = seed_halves(seed)
    rows = [torch.tensor([v]) for v in (lo, hi, position)]
    return int(hash32(*rows, torch.tensor([[token]])))


# seeds as the server passes them: any int64, negative ones included
KNOWN = [2743868399, 182801168, 1486851895]  # hashes of the first three cases
CASES = [(0, 0, 0), (1234, 5, 42), (-1, 7, 151935), (2**63 - 1, 100000, 3), (-(2**63), 1, 1)]


@pytest.mark.parametrize(("seed", "position", "token"), CASES)
def test_the_hash_matches_plain_integer_arithmetic(seed: int, position: int, token: int) -> None:
    assert one_hash(seed, position, token) == reference_hash(seed, position, token)


def test_known_answers_pin_the_stream() -> None:
    # changing these changes every seeded request's tokens: a deliberate, visible break
    assert [one_hash(*case) for case in CASES[:3]] == KNOWN


def test_mix32_is_a_bijection_on_32_bits() -> None:
    x = torch.arange(1 << 20, dtype=torch.long) * 4093 + (MASK - (1 << 32) // 3)
    x &= MASK
    h = mix32(x)
    assert int(h.min()) >= 0 and int(h.max()) <= MASK
    assert h.unique().numel() == x.unique().numel()


def grid_uniforms(seeds: int = 1000, tokens: int = 1000) -> torch.Tensor:
    """[seeds, tokens] uniforms of seeds 0.., each at a different position."""
    seed = torch.arange(seeds, dtype=torch.long)
    ids = torch.arange(tokens, dtype=torch.long)[None]
    return uniforms(seed, torch.zeros_like(seed), seed * 7 % 13, ids)


def test_uniforms_lie_strictly_inside_the_unit_interval_and_look_uniform() -> None:
    u = grid_uniforms()  # 10**6 draws
    assert u.dtype == torch.float32 and bool((u > 0).all()) and bool((u < 1).all())
    u = u.double()
    n = u.numel()
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12 / n) ** 0.5
    assert (
        abs(u.var().item() - 1 / 12) < 5 * (1 / 180 / n) ** 0.5
    )  # sd of a sample variance: sqrt((mu4 - sigma**4) / n)
    counts = torch.histc(u, bins=100, min=0, max=1)
    expected = n / 100
    assert ((counts - expected) ** 2 / expected).sum().item() < 148.2  # chi2(99), p = 0.001
    # neighbouring tokens and neighbouring seeds are uncorrelated
    centred = u - 0.5
    for a, b in ((centred[:, 1:], centred[:, :-1]), (centred[1:], centred[:-1])):
        assert abs((a * b).mean().item()) < 5 * (1 / 144 / a.numel()) ** 0.5


def test_positions_of_one_seed_look_uniform() -> None:
    positions = torch.arange(100000, dtype=torch.long)
    seed = torch.full_like(positions, 42)
    token = torch.tensor([[17]])
    u = uniforms(seed, seed, positions, token)[:, 0].double()
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12 / u.numel()) ** 0.5
    centred = u - 0.5
    assert abs((centred[1:] * centred[:-1]).mean().item()) < 5 * (1 / 144 / u.numel()) ** 0.5
    # 32-bit hashes of 10**5 distinct inputs: about one collision expected
    assert hash32(seed, seed, positions, token).unique().numel() > 99990


def test_exponential_noise_is_finite_positive_with_mean_one() -> None:
    seed = torch.arange(1000, dtype=torch.long)
    q = exponential_noise(seed, seed, seed, torch.arange(1000)[None])
    assert q.dtype == torch.float32 and bool((q > 0).all()) and bool(q.isfinite().all())
    assert abs(q.double().mean().item() - 1) < 5 * (1 / q.numel()) ** 0.5


def test_a_row_draws_the_same_alone_or_in_a_batch() -> None:
    seeds, positions = torch.tensor([3, 9, 3]), torch.tensor([0, 4, 1])
    ids = torch.randint(0, 50000, (3, 64), generator=torch.Generator().manual_seed(0))
    together = uniforms(seeds, seeds * 0, positions, ids)
    for row in range(3):
        alone = uniforms(seeds[row : row + 1], seeds[:1] * 0, positions[row : row + 1], ids[row])
        assert torch.equal(alone[0], together[row])


PROBS = torch.tensor([0.35, 0.25, 0.15, 0.1, 0.08, 0.07])
# chi-square critical values at p = 0.001 by degrees of freedom
CRITICAL = {2: 13.82, 3: 16.27, 5: 20.52}


def seeded_counts(n: int, sampler: Sampler, **params: float) -> torch.Tensor:
    """Token counts of ``n`` rows seeded 0..n-1 sampling PROBS once: fixed on every run."""
    requests = [Request(f"r{i}", [0], SamplingParams(seed=i, **params)) for i in range(n)]
    logits = PROBS.log().expand(n, -1).contiguous()
    out = sampler(logits, SamplingBatch.from_requests(requests, "cpu"))
    return torch.bincount(torch.tensor(out.token_ids), minlength=len(PROBS)).double()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = counts.sum() * probs
    return ((counts - expected) ** 2 / expected).sum().item()


def shifted(probs: torch.Tensor) -> torch.Tensor:
    """A wrong answer close to ``probs``: 0.03 of mass moved from the first to the second."""
    return probs + torch.tensor([-0.03, 0.03] + [0.0] * (len(probs) - 2), dtype=probs.dtype)


def renormalized(kept: int, power: float = 1.0) -> torch.Tensor:
    p = PROBS[:kept].double() ** power
    return p / p.sum()


@pytest.mark.parametrize(
    ("sampler", "params", "expected"),
    [
        (Sampler(), {}, renormalized(6)),  # the whole vocabulary, no candidates
        (Sampler(), {"temperature": 0.5}, renormalized(6, power=2.0)),
        (Sampler(), {"top_k": 4}, renormalized(4)),  # top-4 candidates
        (Sampler(nucleus_candidates=4), {"top_p": 0.7}, renormalized(3)),  # nucleus fits
        (Sampler(nucleus_candidates=2), {"top_p": 0.7}, renormalized(3)),  # falls back to sort
        (Sampler(sync_free=True), {"top_p": 0.7}, renormalized(3)),  # sorts at once
        (Sampler(nucleus_candidates=4), {"min_p": 0.3}, renormalized(3)),
    ],
)
def test_seeded_draws_over_many_seeds_follow_the_softmax(
    sampler: Sampler, params: dict[str, float], expected: torch.Tensor
) -> None:
    counts = seeded_counts(20000, sampler, **params)
    kept = len(expected)
    assert counts[kept:].sum() == 0  # filtered tokens never come up
    critical = CRITICAL[kept - 1]
    assert chi_square(counts[:kept], expected) < critical
    # the bound is tight enough to reject a slightly wrong distribution
    assert chi_square(counts[:kept], shifted(expected)) > critical


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_step_syncs_once() -> None:
    params = [
        SamplingParams(seed=1, top_p=0.9, repetition_penalty=1.2, frequency_penalty=0.5),
        SamplingParams(top_k=5, min_p=0.1, logprobs=3),
        SamplingParams(temperature=0),
        SamplingParams(presence_penalty=0.3),
    ]
    requests = [Request(f"r{i}", [1, 2, 3], p) for i, p in enumerate(params)]
    for request in requests:
        request.append_output_token(2)
    logits = torch.randn(4, 32000, device="cuda")
    sampler = Sampler()
    sampler(logits, SamplingBatch.from_requests(requests, "cuda"))  # creates the generator
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = sampler(logits, SamplingBatch.from_requests(requests, "cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]  # the one read-back at the end
    assert out.token_ids[2] == logits[2].argmax().item() and out.logprobs[1] is not None
