"""The steps a model runner runs at start, before any request, so that the kernels that only
steps with prefill chunks launch are compiled (Triton) or loaded (FlashInfer) then, and not
in the time of the first requests.

Decode-only steps are warmed by the capture of their CUDA graphs
(:mod:`auto_glm.engine.cuda_graphs`), whose warm-up run builds every kernel they launch.
Steps with prefill chunks run eagerly, and Triton builds a kernel once per specialization:
its constexprs, and whether each integer argument is 1, a multiple of 16 or neither. Of the
prefill launcher's integer arguments only the number of chunks changes from step to step,
so the warm-up runs steps of 1, 2 and 16 chunks. Its second step also decodes one request
beside its chunks, with a context of one block: the decode kernel unsplit at a small batch,
which no graph builds (their small batches split their keys over the graphs' wide tables).

The warm-up's requests are greedy, with prompts of two to four tokens. Their K/V go to
blocks of the pool before any request holds one; a request that later holds such a block
writes each slot before it reads it, and non-finite values are scrubbed after the warm-up
(:meth:`ModelRunner.scrub_blocks`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from auto_glm.engine.plan import SchedulerOutput
from auto_glm.engine.request import Request
from auto_glm.sampling_params import SamplingParams

__all__ = ["MIN_MODEL_LEN", "warm_up_plans"]

_CHUNK = 2  # tokens of a warm-up prefill chunk (a chunk of one token counts as a decode)
_DECODE_PROMPT = 3  # the decoding request's prompt: it decodes its third token
MIN_MODEL_LEN = 2 * _CHUNK  # the warm-up's positions are below it
_GREEDY = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)


class _Builder:
    """Requests and their parts of one plan, each request given pool blocks in turn."""

    def __init__(self, blocks: Iterator[int], block_size: int, vocab_size: int) -> None:
        self._blocks, self._block_size, self._vocab = blocks, block_size, vocab_size
        self._count = itertools.count()

    def plan(self, parts: list[tuple[int, int, int]]) -> SchedulerOutput:
        """A plan of one request per ``(prompt length, start position, tokens fed)``."""
        plan = SchedulerOutput([], [], [], [], [])
        for prompt_len, start, fed in parts:
            prompt = [i % self._vocab for i in range(prompt_len)]
            request = Request(f"warm-up-{next(self._count)}", prompt, _GREEDY)
            table = [next(self._blocks) for _ in range(-(-prompt_len // self._block_size))]
            plan.requests.append(request)
            plan.num_scheduled_tokens.append(fed)
            plan.start_positions.append(start)
            plan.block_tables.append(table)
            plan.slot_mapping.extend(
                table[pos // self._block_size] * self._block_size + pos % self._block_size
                for pos in range(start, start + fed)
            )
        return plan


def warm_up_plans(num_blocks: int, block_size: int, vocab_size: int) -> list[SchedulerOutput]:
    """The warm-up's steps, on blocks ``0 .. num_blocks - 1`` of the pool: 1 prefill chunk;
    1 decode and 2 chunks, one after a cached prefix; 16 chunks. Positions stay below
    :data:`MIN_MODEL_LEN`."""
    build = _Builder(itertools.cycle(range(num_blocks)), block_size, vocab_size)
    chunk = (_CHUNK, 0, _CHUNK)  # (prompt length, start position, tokens fed)
    decode = (_DECODE_PROMPT, _DECODE_PROMPT - 1, 1)
    after_prefix = (2 * _CHUNK, _CHUNK, _CHUNK)
    return [
        build.plan([chunk]),
        build.plan([decode, chunk, after_prefix]),
        build.plan([chunk] * 16),
    ]
