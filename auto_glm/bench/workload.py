"""The benchmark's seeded workload: random prompts and per-request output lengths."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["BenchRequest", "Workload", "make_workload"]


@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int]
    output_len: int  # generated exactly (EOS ignored)


@dataclass(frozen=True)
class Workload:
    requests: tuple[BenchRequest, ...]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.requests)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_len for r in self.requests)

    def head(self, count: int) -> Workload:
        """The first ``count`` requests (arrival order)."""
        return Workload(self.requests[:count])


def make_workload(
    num_requests: int,
    seed: int,
    vocab: Sequence[int],
    prompt_lens: tuple[int, int] = (64, 512),
    output_lens: tuple[int, int] = (64, 256),
) -> Workload:
    """``num_requests`` requests with lengths uniform in the inclusive ranges.

    Prompt tokens are drawn from ``vocab`` (the tokenizer's non-special ids), so no prompt
    contains an EOS or a chat-role token. The same arguments give the same workload.
    """
    if num_requests < 1:
        raise ValueError(f"num_requests={num_requests} is invalid: it must be >= 1")
    for name, (lo, hi) in (("prompt_lens", prompt_lens), ("output_lens", output_lens)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name}={(lo, hi)} is invalid: it must satisfy 1 <= low <= high")
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        prompt = rng.choices(vocab, k=rng.randint(*prompt_lens))
        requests.append(BenchRequest(prompt, rng.randint(*output_lens)))
    return Workload(tuple(requests))
