"""One step's per-row sampling parameters as tensors, built on the host and moved at once.

What a batch's requests fix (their sampling parameters, and the prompt ids that the
repetition penalty reads) is packed into one float32 and one int64 host tensor, each moved
with a single copy that does not wait for the device (:func:`~auto_glm.platforms.to_device`);
what changes every step (each row's count of output tokens, and the output ids that the
penalties see) goes in a third, int64. The fields are views into those device tensors.

A batch of the same requests in the same order as the step before's (a decode run's steady
state) takes that one's parameter columns as they are (``last``): only the third tensor is
built again, and with a penalty on, the output ids that the penalties see are that batch's
with only the tokens since appended (the penalties do not depend on their order), not every
output id again: that cost grew with the outputs, 22 ms a step at batch 256 and 1,000
output tokens each on a 2-vCPU machine.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from auto_glm.engine.logit_constraints import LogitConstraints
from auto_glm.engine.request import Request
from auto_glm.engine.sampling_rng import seed_halves
from auto_glm.platforms import tensor_on, to_device
from auto_glm.sampling_params import SamplingParams

__all__ = ["SamplingBatch"]


def _flat_ids(id_lists: list[list[int]]) -> list[torch.Tensor]:
    """All rows' ids in one flat host tensor [N], then the row of each [N]."""
    ids = torch.tensor(list(itertools.chain.from_iterable(id_lists)), dtype=torch.long)
    lens = torch.tensor([len(x) for x in id_lists], dtype=torch.long)
    return [ids, torch.repeat_interleave(torch.arange(len(id_lists)), lens)]


def _packed(head: list[int], flat: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """``head`` then the ``flat`` tensors, in one int64 tensor copied to ``device``."""
    host = torch.tensor(head, dtype=torch.long)
    return to_device(torch.cat([host, *flat]) if flat else host, device)


def _same_requests(a: list[Request], b: list[Request]) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


@dataclass
class SamplingBatch:
    """Per-row sampling parameters of the requests that sample this step, in logits order."""

    request_ids: list[str]
    seeds: list[int | None]  # [B] None for unseeded and for greedy rows
    num_logprobs: list[int | None]  # [B] top alternatives wanted per row
    greedy: torch.Tensor  # [B] bool
    temperature: torch.Tensor  # [B] float32; 1.0 on greedy rows, whose argmax comes first
    top_k: torch.Tensor  # [B] int64; 0 = off
    top_p: torch.Tensor  # [B] float32; 1 = off
    min_p: torch.Tensor  # [B] float32; 0 = off
    repetition_penalty: torch.Tensor  # [B] float32; 1 = off
    presence_penalty: torch.Tensor  # [B] float32; 0 = off
    frequency_penalty: torch.Tensor  # [B] float32; 0 = off
    seed_lo: torch.Tensor  # [B] int64 low 32 bits of the seed; 0 where unseeded
    seed_hi: torch.Tensor  # [B] int64 high 32 bits of the seed; 0 where unseeded
    output_lens: torch.Tensor  # [B] int64 tokens generated so far: the seeded draw's position
    seeded_rows: torch.Tensor | None  # [S] int64 rows with a seed; None when S == 0
    # [N_out] flat output ids, the tokens in flight included; only when a penalty is on
    output_ids: torch.Tensor | None
    output_rows: torch.Tensor | None  # [N_out] row of each output id
    prompt_ids: torch.Tensor | None  # [N_prompt] flat prompt ids, only for repetition penalty
    prompt_rows: torch.Tensor | None  # [N_prompt]
    all_greedy: bool
    any_greedy: bool
    all_seeded: bool  # every sampled row has a seed (True when none samples)
    any_penalty: bool
    any_repetition_penalty: bool
    # filter flags and top-k bounds look at sampled (non-greedy) rows only
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    max_top_k: int  # largest top_k among sampled rows, 0 if none
    all_sampled_top_k: bool  # every sampled row has a top-k
    max_num_logprobs: int | None  # None when no row wants logprobs
    constraints: LogitConstraints | None  # logit_bias and grammars; None when no row has any
    # the requests, to tell whether the next step's batch is the same (``last``)
    requests: list[Request] = field(default_factory=list, repr=False, compare=False)
    # [B] host copy of output_lens: each row's output tokens counted, in flight included
    drawn: list[int] = field(default_factory=list, repr=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.request_ids)

    @classmethod
    def from_requests(
        cls,
        requests: list[Request],
        device: torch.device | str,
        pending: torch.Tensor | None = None,
        pending_rows: Sequence[int] | None = None,
        last: SamplingBatch | None = None,
    ) -> SamplingBatch:
        """The batch of ``requests``. ``pending`` [P] (integer ids on ``device``) holds the
        tokens sampled but not yet appended of the rows ``pending_rows`` (ascending; None:
        every row, P = B), for a step planned before the previous one's tokens were read
        back: each counts in the position of its row's seeded draw, and among the output
        tokens that the penalties see. ``last``, the batch built for the step before on the
        same device: where it holds the same requests in the same order, its parameter
        columns are taken as they are."""
        if not requests:
            raise ValueError("no requests to sample for: build a SamplingBatch only when B >= 1")
        size = len(requests)
        if pending is None and pending_rows is not None:
            raise ValueError("pending_rows needs pending: give the tokens of those rows")
        in_flight = 0 if pending is None else size if pending_rows is None else len(pending_rows)
        if pending is not None and pending.shape != (in_flight,):
            raise ValueError(
                f"pending has shape {tuple(pending.shape)}: give one token per row in flight, "
                f"[{in_flight}]"
            )
        device = torch.device(device)
        if last is not None and _same_requests(last.requests, requests):
            step = _step_columns(requests, device, last.any_penalty, pending, pending_rows, last)
            return replace(last, **step)
        params = [r.sampling_params for r in requests]
        any_penalty = any(p.has_penalties for p in params)
        return cls(
            **_parameter_columns(requests, params, device, any_penalty),
            **_step_columns(requests, device, any_penalty, pending, pending_rows),
        )


def _parameter_columns(
    requests: list[Request], params: list[SamplingParams], device: torch.device, any_penalty: bool
) -> dict[str, Any]:
    """The fields that ``requests`` fix: one float32 [6, B] and one int64 copy to
    ``device``."""
    size = len(requests)
    sampled = [p for p in params if not p.greedy]
    seeds = [None if p.greedy else p.seed for p in params]
    seeded = [row for row, seed in enumerate(seeds) if seed is not None]
    halves = [seed_halves(seed or 0) for seed in seeds]
    any_rep = any(p.repetition_penalty != 1.0 for p in params)
    floats = to_device(
        torch.tensor(
            [
                [1.0 if p.greedy else p.temperature for p in params],
                [p.top_p for p in params],
                [p.min_p for p in params],
                [p.repetition_penalty for p in params],
                [p.presence_penalty for p in params],
                [p.frequency_penalty for p in params],
            ],
            dtype=torch.float32,
        ),
        device,
    )  # [6, B]
    head = [
        *(p.top_k for p in params),
        *(lo for lo, _ in halves),
        *(hi for _, hi in halves),
        *(int(p.greedy) for p in params),
        *seeded,
    ]  # [4 * B + S]
    prompt = _flat_ids([r.prompt_token_ids for r in requests]) if any_rep else []
    ints = _packed(head, prompt, device)  # [4 * B + S + 2 * N_prompt]
    columns = ints[: 4 * size].view(4, size)
    prompt_ids = prompt_rows = None
    if prompt:
        prompt_ids, prompt_rows = ints[4 * size + len(seeded) :].view(2, -1).unbind()
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    return {
        "request_ids": [r.request_id for r in requests],
        "seeds": seeds,
        "num_logprobs": [p.logprobs for p in params],
        "greedy": columns[3] != 0,
        "temperature": floats[0],
        "top_k": columns[0],
        "top_p": floats[1],
        "min_p": floats[2],
        "repetition_penalty": floats[3],
        "presence_penalty": floats[4],
        "frequency_penalty": floats[5],
        "seed_lo": columns[1],
        "seed_hi": columns[2],
        "seeded_rows": ints[4 * size : 4 * size + len(seeded)] if seeded else None,
        "prompt_ids": prompt_ids,
        "prompt_rows": prompt_rows,
        "all_greedy": not sampled,
        "any_greedy": len(sampled) < size,
        "all_seeded": len(seeded) == len(sampled),
        "any_penalty": any_penalty,
        "any_repetition_penalty": any_rep,
        "any_top_k": any(p.top_k > 0 for p in sampled),
        "any_top_p": any(p.top_p < 1.0 for p in sampled),
        "any_min_p": any(p.min_p > 0.0 for p in sampled),
        "max_top_k": max((p.top_k for p in sampled), default=0),
        "all_sampled_top_k": all(p.top_k > 0 for p in sampled),
        "max_num_logprobs": max(wanted) if wanted else None,
        "constraints": LogitConstraints.from_requests(requests, device),
        "requests": list(requests),
    }


def _step_columns(
    requests: list[Request],
    device: torch.device,
    any_penalty: bool,
    pending: torch.Tensor | None,
    pending_rows: Sequence[int] | None,
    last: SamplingBatch | None = None,
) -> dict[str, Any]:
    """The fields that change every step, in one int64 copy to ``device``: each row's output
    count and, with a penalty on, the output ids, the tokens in flight (``pending``) last.
    ``last``: the step before's batch of the same requests, whose output ids are extended."""
    size = len(requests)
    drawn = [r.num_output_tokens for r in requests]  # [B] tokens before each row's draw
    if pending is not None:
        for row in range(size) if pending_rows is None else pending_rows:
            drawn[row] += 1
    before = _extendable(requests, last) if any_penalty else None
    if not any_penalty:
        out = []
    elif before is None:
        out = _flat_ids([r.output_token_ids for r in requests])
    else:  # only the tokens appended since ``last`` counted its rows' outputs
        out = _flat_ids([r.output_token_ids[n:] for r, n in zip(requests, before, strict=True)])
    ints = _packed(drawn, out, device)  # [B + 2 * N_new]
    out_ids = out_rows = None
    if any_penalty:
        out_ids, out_rows = ints[size:].view(2, -1).unbind()
        if before is not None:  # [N_last + N_new]: the order of the ids does not matter
            out_ids = torch.cat((last.output_ids, out_ids))
            out_rows = torch.cat((last.output_rows, out_rows))
        if pending is not None:  # [N_out + P]: each row's token in flight last
            if pending_rows is None:
                rows = torch.arange(size, device=device)
            else:
                rows = tensor_on(pending_rows, torch.long, device)
            out_ids = torch.cat((out_ids, pending.long()))
            out_rows = torch.cat((out_rows, rows))
    return {
        "output_lens": ints[:size],
        "output_ids": out_ids,
        "output_rows": out_rows,
        "drawn": drawn,
    }


def _extendable(requests: list[Request], last: SamplingBatch | None) -> list[int] | None:
    """Per row, how many of its output ids ``last`` (the same requests) counted, where
    those are all still its first ones; else None (the ids are built again)."""
    if last is None or last.output_ids is None or len(last.drawn) != len(requests):
        return None
    if any(len(r.output_token_ids) < n for r, n in zip(requests, last.drawn, strict=True)):
        return None  # a token counted in flight that was never appended
    return last.drawn
