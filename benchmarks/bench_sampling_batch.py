"""The host's cost per decode step of building the sampling batch when requests carry a
penalty: every step, the penalties see each request's output ids.

``SamplingBatch.from_requests`` runs as the engine calls it in a decode run: the same
requests step after step, each with one new token, the batch before passed as ``last``.
Run it in two trees (a git worktree of the older one) to compare them, alternately:

    python benchmarks/bench_sampling_batch.py --batch 256 --outputs 100 1000 4000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

# Runs from a source checkout too, where auto_glm is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from auto_glm.bench.machine import cpu_line  # noqa: E402
from auto_glm.engine.request import Request  # noqa: E402
from auto_glm.engine.sampling_batch import SamplingBatch  # noqa: E402
from auto_glm.sampling_params import SamplingParams  # noqa: E402


def per_step_ms(batch: int, outputs: int, steps: int, ahead: bool) -> float:
    """Median milliseconds of one ``from_requests`` call over ``steps`` decode steps of
    ``batch`` requests that already have ``outputs`` output tokens each; ``ahead``: each
    step planned ahead, with its tokens in flight."""
    params = SamplingParams(max_tokens=outputs + steps + 1, temperature=0.8, seed=1,
                            presence_penalty=0.5, frequency_penalty=0.2)  # fmt: skip
    requests = [Request(f"r{i}", [1, 2, 3], params) for i in range(batch)]
    for request in requests:
        for token in range(outputs):
            request.append_output_token(token % 997)
    pending = torch.zeros(batch, dtype=torch.long) if ahead else None
    last, times = None, []
    for step in range(steps + 1):
        start = time.perf_counter()
        last = SamplingBatch.from_requests(requests, "cpu", pending, last=last)
        if step:  # the first builds every column: not a step of the run
            times.append(time.perf_counter() - start)
        for request in requests:
            request.append_output_token(step % 997)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="requests per step")
    parser.add_argument("--outputs", type=int, nargs="+", default=[100, 1000, 4000],
                        help="output tokens each request has when the run starts")  # fmt: skip
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    args = parser.parse_args(argv)
    print(f"machine: {cpu_line()}")
    print("| batch | output tokens | in turn (ms per step) | planned ahead (ms per step) |")
    print("|---:|---:|---:|---:|")
    for outputs in args.outputs:
        turn, ahead = (per_step_ms(args.batch, outputs, args.steps, a) for a in (False, True))
        print(f"| {args.batch} | {outputs} | {turn:.3f} | {ahead:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
