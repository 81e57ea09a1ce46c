"""SamplingBatch packs its per-row columns into three host tensors moved at once (the
parameters, float32 and int64, and what changes every step), and takes the step before's
parameter columns where the requests are the same; logprobs come back in one read."""

from __future__ import annotations

import random

import pytest
import torch

from auto_glm.engine.request import Request
from auto_glm.engine.sampler import Sampler, SamplingBatch, apply_penalties
from auto_glm.sampling_params import SamplingParams


def _requests(params: list[SamplingParams], outputs: list[list[int]]) -> list[Request]:
    requests = []
    for i, (p, out) in enumerate(zip(params, outputs, strict=True)):
        request = Request(f"r{i}", [7, 8, i], p)
        for token in out:
            request.append_output_token(token)
        requests.append(request)
    return requests


def build(params: list[SamplingParams], outputs: list[list[int]]) -> SamplingBatch:
    return SamplingBatch.from_requests(_requests(params, outputs), "cpu")


def as_float32(value: float) -> float:
    return torch.tensor(value, dtype=torch.float32).item()


def test_columns_hold_each_row_and_share_three_buffers() -> None:
    params = [
        SamplingParams(seed=-1, top_k=3, repetition_penalty=1.5, temperature=0.5),
        SamplingParams(temperature=0, seed=9, top_p=0.5),
        SamplingParams(seed=2**32 + 5, min_p=0.2, frequency_penalty=0.25),
    ]
    batch = build(params, [[4, 4], [], [6]])
    assert batch.seeds == [-1, None, 2**32 + 5]  # greedy rows never draw
    assert batch.seed_lo.tolist() == [2**32 - 1, 0, 5]
    assert batch.seed_hi.tolist() == [2**32 - 1, 0, 1]
    assert batch.seeded_rows is not None and batch.seeded_rows.tolist() == [0, 2]
    assert batch.output_lens.tolist() == [2, 0, 1]
    assert batch.greedy.tolist() == [False, True, False]
    assert batch.top_k.tolist() == [3, 0, 0]
    assert batch.temperature.tolist() == [0.5, 1.0, 1.0]
    assert batch.top_p.tolist() == [1.0, 0.5, 1.0]
    assert batch.min_p.tolist() == [0.0, 0.0, as_float32(0.2)]
    assert batch.frequency_penalty.tolist() == [0.0, 0.0, 0.25]
    assert batch.output_ids is not None and batch.output_ids.tolist() == [4, 4, 6]
    assert batch.output_rows is not None and batch.output_rows.tolist() == [0, 0, 2]
    assert batch.prompt_ids is not None and batch.prompt_ids.tolist() == [7, 8, 0, 7, 8, 1, 7, 8, 2]
    assert (
        batch.prompt_rows is not None and batch.prompt_rows.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    )
    assert batch.all_seeded and batch.any_greedy and not batch.all_greedy

    def storage(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    ints = [batch.top_k, batch.seed_lo, batch.seeded_rows, batch.prompt_ids, batch.prompt_rows]
    floats = [batch.temperature, batch.top_p, batch.repetition_penalty, batch.frequency_penalty]
    step = [batch.output_lens, batch.output_ids, batch.output_rows]
    assert [len({storage(t) for t in group}) for group in (ints, floats, step)] == [1, 1, 1]
    assert len({storage(group[0]) for group in (ints, floats, step)}) == 3


def test_the_same_requests_take_the_last_batchs_parameters_and_new_outputs() -> None:
    params = [
        SamplingParams(seed=3, top_k=4, presence_penalty=0.5),
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, seed=5, frequency_penalty=0.3, repetition_penalty=1.2),
    ]
    requests = _requests(params, [[4], [], [6, 6]])
    first = SamplingBatch.from_requests(requests, "cpu")
    requests[0].append_output_token(9)
    requests[2].append_output_token(1)
    pending = torch.tensor([5, 8, 2])
    again = SamplingBatch.from_requests(requests, "cpu", pending, last=first)
    fresh = SamplingBatch.from_requests(requests, "cpu", pending)
    assert again.temperature is first.temperature and again.top_k is first.top_k
    assert again.prompt_ids is first.prompt_ids and again.requests == requests
    for name in ("output_lens", "temperature", "seed_lo"):
        assert getattr(again, name).tolist() == getattr(fresh, name).tolist(), name
    assert seen(again) == seen(fresh)  # the same (row, id) pairs, in another order
    assert again.output_lens.tolist() == [3, 1, 4]  # the tokens in flight counted
    logits = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    assert Sampler()(logits, again).token_ids == Sampler()(logits, fresh).token_ids

    # another order, one request fewer, or another request under a known id: built anew
    swapped = [requests[1], requests[0], requests[2]]
    stranger = Request("r1", [7, 8, 1], SamplingParams(temperature=0.9))
    for other in (swapped, requests[:2], [requests[0], stranger, requests[2]]):
        batch = SamplingBatch.from_requests(other, "cpu", last=first)
        assert batch.temperature is not first.temperature
        assert batch.temperature.tolist() == [
            1.0 if r.sampling_params.greedy else as_float32(r.sampling_params.temperature)
            for r in other
        ]


def seen(batch: SamplingBatch) -> list[tuple[int, int]]:
    """The (row, id) pairs the penalties count, in order."""
    return sorted(zip(batch.output_rows.tolist(), batch.output_ids.tolist(), strict=True))


@pytest.mark.parametrize("ahead", [False, True], ids=["in turn", "planned ahead"])
def test_a_decode_run_extends_the_last_batchs_output_ids(ahead: bool) -> None:
    """Step after step of the same requests, the output ids are the last batch's with the
    tokens appended since (and those in flight): the same pairs as a batch built anew,
    without building the rows' whole outputs again. A token counted in flight that was never
    appended makes the ids be built anew."""
    params = [SamplingParams(presence_penalty=0.5), SamplingParams(temperature=0)]
    requests = _requests(params, [[4, 4], []])
    last, rng = None, random.Random(3)
    for _ in range(12):
        pending = torch.tensor([rng.randrange(16) for _ in requests]) if ahead else None
        batch = SamplingBatch.from_requests(requests, "cpu", pending, last=last)
        assert seen(batch) == seen(SamplingBatch.from_requests(requests, "cpu", pending))
        assert last is None or len(batch.output_ids) == len(last.output_ids) + 2
        for request, token in zip(requests, pending.tolist() if ahead else [1, 2], strict=True):
            request.append_output_token(token)
        last = batch
    if ahead:  # in flight in ``last``, but never appended: built anew, not extended
        extended = SamplingBatch.from_requests(requests, "cpu", last=last)
        requests[0].output_token_ids.pop()
        rebuilt = SamplingBatch.from_requests(requests, "cpu", last=last)
        assert seen(rebuilt) == seen(SamplingBatch.from_requests(requests, "cpu"))
        assert len(rebuilt.output_ids) < len(extended.output_ids)


def test_an_unseeded_batch_without_penalties_has_no_optional_columns() -> None:
    batch = build([SamplingParams(), SamplingParams(temperature=0)], [[1], [2]])
    assert batch.seeded_rows is None and not batch.all_seeded
    assert batch.output_ids is None and batch.prompt_ids is None


@pytest.mark.parametrize("rows", [None, [0, 2], [1]], ids=["every row", "rows 0 and 2", "row 1"])
def test_tokens_in_flight_count_as_the_last_output_of_their_row(rows) -> None:
    """A step planned ahead samples before the step before's tokens are appended: the
    penalties and the seeded draws see them as if they were. In a step with prompt chunks
    only some rows have one in flight (``pending_rows``)."""
    params = [
        SamplingParams(seed=3, repetition_penalty=1.5, presence_penalty=0.5),
        SamplingParams(temperature=0, frequency_penalty=1.0),
        SamplingParams(seed=4, frequency_penalty=0.7),
    ]
    outputs = [[4, 5], [6], [5]]
    tokens = [5, 9, 2]  # each row's token in flight
    in_flight = [0, 1, 2] if rows is None else rows
    pending = torch.tensor([tokens[r] for r in in_flight], dtype=torch.int32)
    ahead = SamplingBatch.from_requests(_requests(params, outputs), "cpu", pending, rows)
    known = [out + [tokens[r]] * (r in in_flight) for r, out in enumerate(outputs)]
    appended = SamplingBatch.from_requests(_requests(params, known), "cpu")
    assert ahead.output_lens.tolist() == appended.output_lens.tolist() == [len(k) for k in known]
    assert ahead.output_ids is not None and ahead.output_rows is not None
    assert appended.output_ids is not None and appended.output_rows is not None
    got = sorted(zip(ahead.output_rows.tolist(), ahead.output_ids.tolist(), strict=True))
    want = sorted(zip(appended.output_rows.tolist(), appended.output_ids.tolist(), strict=True))
    assert got == want
    logits = torch.randn(3, 12, generator=torch.Generator().manual_seed(1))
    sampler = Sampler()
    assert sampler(logits, ahead).token_ids == sampler(logits, appended).token_ids
    assert torch.equal(
        apply_penalties(logits.clone(), ahead), apply_penalties(logits.clone(), appended)
    )


def test_tokens_in_flight_must_match_their_rows() -> None:
    requests = _requests([SamplingParams(), SamplingParams()], [[1], [2]])
    pending = torch.tensor([5, 9, 2])
    with pytest.raises(ValueError, match=r"pending has shape \(3,\): give one token per row"):
        SamplingBatch.from_requests(requests, "cpu", pending)
    with pytest.raises(ValueError, match=r"pending has shape \(3,\).*\[1\]"):
        SamplingBatch.from_requests(requests, "cpu", pending, [1])
    with pytest.raises(ValueError, match="pending_rows needs pending"):
        SamplingBatch.from_requests(requests, "cpu", None, [1])


def test_logprobs_beyond_the_vocabulary_return_every_token() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 1.0, 0.0]])
    params = [SamplingParams(logprobs=10, temperature=0), SamplingParams(logprobs=1, seed=4)]
    out = Sampler()(logits, build(params, [[], []]))
    assert out.token_ids[0] == 2
    chosen, top = out.logprobs[0]
    assert [i for i, _ in top] == [2, 1, 0] and chosen == top[0][1]
    assert len(out.logprobs[1][1]) == 1 and out.logprobs[1][1][0][0] == 0
