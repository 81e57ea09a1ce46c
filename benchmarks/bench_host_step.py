"""The host's work per decode step on the GPU's path, measured without a GPU.

On a GPU the engine plans and launches each decode step while the one before runs, so a
batch-256 step takes its device time only where the host's work for it (the loop's
scheduling, input filling, sampling launch and output bookkeeping, and the output
thread's detokenizing, under the same GIL) fits in that time. This measures that work on
the CPU: the engine runs the padded decode path that the GPU replays from CUDA graphs (eagerly
here, under triton's interpreter), with the model's forward replaced by precomputed logits,
as if the device took no time. It prints, per step at each batch, the engine loop's CPU time,
the output thread's, and the garbage collections' pauses.

    python benchmarks/bench_host_step.py --batches 64 256 --steps 200

``--device-ms D`` also runs the engine as on a GPU, with a simulated device: steps are
planned ahead and deltas held until the next launch, as on CUDA, and each launched step
keeps the device busy for D ms after the step before (its tokens are read back once that
time has passed; the wait releases the GIL, as a CUDA event's does). The wall time per step
then shows whether the host's work, both threads under one GIL, hides behind D ms of device
time (wall close to D) or sets the pace (wall above it):

    python benchmarks/bench_host_step.py --batches 256 --device-ms 6.3

The model is a tiny random Qwen3 built under ``--work-dir`` (its tokenizer is the built-in
corpus's, so the greedy tokens decode to text), with room for 4,096 tokens: the block tables
grow with ``--steps``. Its 1,024 ids have a token each; ``--tokenizer-size 300`` gives it a
smaller tokenizer, so that, as on the nano model (151,936 ids, 11,038 tokens), most sampled
ids decode to nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # the triton backend on CPU tensors; before triton loads
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from auto_glm import GLMModel, SamplingParams  # noqa: E402
from auto_glm.bench.machine import cpu_line  # noqa: E402
from auto_glm.checkpoints import build_random_checkpoint, build_tokenizer  # noqa: E402
from auto_glm.engine.heap import gc_pause_seconds  # noqa: E402

_TABLE_STEPS = 8  # distinct logits, cycled


def instant_forward(model, batch: int) -> None:
    """Replace the model's forward with precomputed logits ``[_TABLE_STEPS, batch, V]``,
    a new page each call, so that greedy decoding samples varied tokens at no cost."""
    vocab = model.spec.vocab_size
    table = torch.randn(_TABLE_STEPS, batch, vocab, generator=torch.Generator().manual_seed(0))
    calls = [0]

    def forward(input_ids: torch.Tensor, positions: torch.Tensor, *rest) -> torch.Tensor:
        return torch.zeros(len(input_ids), 1)  # [N, 1]: only its row count is read

    def compute_logits(hidden: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        rows = hidden.shape[0]
        page = table[calls[0] % _TABLE_STEPS]
        return page[:rows] if rows <= batch else torch.zeros(rows, vocab)  # [N, V]

    model.forward = forward
    model.compute_logits = compute_logits


class SimulatedDevice:
    """A device that runs each launched step for ``seconds`` after the one before."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._free_at = 0.0  # perf_counter time at which the last launched step is done

    def attach(self, core) -> None:
        """Run the engine ``core`` as on CUDA (steps planned ahead, deltas held until the
        next launch), its device-to-host copies (one per step) ready only when the device
        has run the step they end."""
        core.overlap_steps = core.defer_outputs = True
        platform = core.runner.platform
        copy_to_host = platform.copy_to_host

        def timed_copy(tensor: torch.Tensor) -> _DeviceCopy:
            self._free_at = max(self._free_at, time.perf_counter()) + self.seconds
            return _DeviceCopy(copy_to_host(tensor), self._free_at)

        platform.copy_to_host = timed_copy


class _DeviceCopy:
    def __init__(self, copy, ready_at: float) -> None:
        self._copy, self._ready_at = copy, ready_at

    def wait(self) -> torch.Tensor:
        left = self._ready_at - time.perf_counter()
        if left > 0:
            time.sleep(left)  # releases the GIL, as waiting on a CUDA event does
        return self._copy.wait()


def _why(item) -> str:
    if isinstance(item, BaseException):
        return repr(item)
    return f"{item.request_id} finished ({item.outputs.finish_reason})"


def _thread_cpu(thread: threading.Thread) -> float:
    """CPU seconds ``thread`` has used, read from another thread."""
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def measure(
    checkpoint: Path, batch: int, steps: int, prompt_len: int, device_ms: float = 0.0
) -> dict[str, float]:
    """Per step, over ``steps`` steps in which all ``batch`` requests decode; with
    ``device_ms``, on a simulated device that takes that long per step."""
    model = GLMModel(
        str(checkpoint),
        device="cpu",
        dtype="float32",
        max_num_seqs=batch,
        max_num_batched_tokens=max(8192, batch * prompt_len),
        kv_cache_memory=512 << 20,
        attention_backend="triton",
        cuda_graphs=True,
    )
    try:
        engine = model.engine
        instant_forward(engine.loaded.model, batch)
        if device_ms:
            SimulatedDevice(device_ms / 1e3).attach(engine.core)
        (loop,) = [t for t in threading.enumerate() if t.name == "autoglm-engine"]
        params = SamplingParams(max_tokens=2 * steps + 200, temperature=0, ignore_eos=True)
        started = threading.Event()
        seen: set[str] = set()
        ended: list = []  # errors, and requests that finished

        def sink(item) -> None:
            if isinstance(item, BaseException) or item.finished:
                ended.append(item)
                return
            seen.add(item.request_id)
            if len(seen) == batch:
                started.set()

        ids = [
            engine.submit([5 + (i * 7 + j) % 200 for j in range(prompt_len)], params, sink)
            for i in range(batch)
        ]

        def run_steps(count: int) -> None:
            """Wait until the engine has run ``count`` more steps, all requests decoding."""
            target = engine.stats().num_steps + count
            while engine.stats().num_steps < target or not started.is_set():
                if ended:
                    raise RuntimeError(f"a request ended before its window did: {_why(ended[0])}")
                time.sleep(0.0005)

        run_steps(8)  # past the prefill
        stats = engine.stats()
        marks = (stats.num_steps, _thread_cpu(loop), engine.output_time, gc_pause_seconds())
        start = time.perf_counter()
        run_steps(steps)
        wall = time.perf_counter() - start
        done = engine.stats().num_steps - marks[0]
        for request in ids:
            engine.abort(request.request_id)
        return {
            "batch": batch,
            "steps": done,
            "loop_cpu_ms": (_thread_cpu(loop) - marks[1]) / done * 1e3,
            "output_cpu_ms": (engine.output_time - marks[2]) / done * 1e3,
            "gc_ms": (gc_pause_seconds() - marks[3]) / done * 1e3,
            "wall_ms": wall / done * 1e3,
        }
    finally:
        model.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=200, help="timed decode steps per batch")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs per batch; medians")
    parser.add_argument("--work-dir", type=Path, default=None, help="where the model is built")
    parser.add_argument(
        "--tokenizer-size",
        type=int,
        default=None,
        help="train the model's tokenizer to this many tokens (at least 256 + its special "
        "tokens) instead of one per id",
    )
    parser.add_argument(
        "--device-ms",
        type=float,
        default=0.0,
        help="simulate a device that takes this long per step, with steps planned ahead",
    )
    args = parser.parse_args(argv)
    print(f"machine: {cpu_line()}")
    with tempfile.TemporaryDirectory() as scratch:
        where = args.work_dir or Path(scratch)
        checkpoint = build_random_checkpoint(
            where / "qwen3-tiny",
            "Qwen3ForCausalLM",
            {"max_position_embeddings": 4096},
            tokenizer=args.tokenizer_size is None,
        )
        if args.tokenizer_size is not None:
            build_tokenizer(checkpoint, vocab_size=args.tokenizer_size)
        device = f" | wall / {args.device_ms:g} ms" if args.device_ms else ""
        print(
            "| batch | steps | loop CPU (ms) | output thread CPU (ms) | gc (ms) | wall (ms)"
            f"{device} |"
        )
        print("|---:|---:|---:|---:|---:|---:|" + ("---:|" if device else ""))
        for batch in args.batches:
            runs = [
                measure(checkpoint, batch, args.steps, args.prompt_len, args.device_ms)
                for _ in range(args.repeats)
            ]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            ratio = f" | {med['wall_ms'] / args.device_ms:.2f}" if device else ""
            print(
                f"| {batch} | {med['steps']:.0f} | {med['loop_cpu_ms']:.3f} "
                f"| {med['output_cpu_ms']:.3f} | {med['gc_ms']:.3f} | {med['wall_ms']:.3f}"
                f"{ratio} |"
            )
    print(
        "per decode step, medians of the runs; the model's forward is replaced by fixed "
        "logits, so the loop's CPU time is the host's work on the GPU's path (scheduling, "
        "input filling, sampling, outputs) plus the CPU's argmax over the logits"
        + (
            f"; steps planned ahead on a simulated device of {args.device_ms:g} ms a step"
            if device
            else ""
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
