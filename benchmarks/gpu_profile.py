"""Where a GPU decode step and a prefill step spend their time: the nano model's engine under
torch's profiler, kernels ranked by device time (issue 13's diagnosis, run by gpu_check.sh).

Three windows, each printed as a table of the top kernels and with its wall time:
decode at ``--batch`` rows replayed from CUDA graphs, the same eagerly, and the prefill of
``--prefill-requests`` prompts of ``--prompt-len`` tokens. The decode windows also print
the engine's own split of a step (wall time, the engine's step counter, the model runner's
part and the forward's) and where the engine thread's Python time goes: its stack, sampled
every millisecond (torch's profiler sees only the thread that started it).

    python benchmarks/gpu_profile.py [--batch 256] [--steps 16] [--out DIR]

``--out`` also saves each window's chrome trace, gzipped (open in https://ui.perfetto.dev).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import logging
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from auto_glm.bench.decode import copy_bandwidth, measure_decode  # noqa: E402
from auto_glm.bench.model import count_parameters  # noqa: E402
from auto_glm.bench.nano import NANO_MAX_MODEL_LEN, NANO_TOKEN_ID_MAX, nano_model_path  # noqa: E402
from auto_glm.bench.ours import OurEngine  # noqa: E402
from auto_glm.engine.threads import on_own_thread  # noqa: E402
from auto_glm.sampling_params import SamplingParams  # noqa: E402


def _table(prof: profile, rows: int) -> str:
    averages = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            return averages.table(sort_by=key, row_limit=rows, max_name_column_width=70)
        except (AttributeError, KeyError, ValueError):
            continue
    return averages.table(row_limit=rows)


def _save(prof: profile, out: Path | None, name: str) -> None:
    if out is None:
        return
    raw = out / f"{name}.json"
    prof.export_chrome_trace(str(raw))
    with raw.open("rb") as src, gzip.open(out / f"{name}.json.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()


class _StackSampler(threading.Thread):
    """Samples the engine thread's Python stack every ``interval`` seconds."""

    def __init__(self, interval: float = 0.001) -> None:
        super().__init__(daemon=True)
        self.interval, self.samples = interval, 0
        self.leaf: collections.Counter[str] = collections.Counter()
        self.inclusive: collections.Counter[str] = collections.Counter()
        self._stop_event = threading.Event()
        (self._target_id,) = [t.ident for t in threading.enumerate() if t.name == "autoglm-engine"]

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            frame = sys._current_frames().get(self._target_id)
            names = []
            while frame is not None:
                code = frame.f_code
                names.append(f"{Path(code.co_filename).name}:{code.co_name}")
                frame = frame.f_back
            if names:
                self.samples += 1
                self.leaf[names[0]] += 1
                self.inclusive.update(set(names))

    def report(self, rows: int) -> str:
        self._stop_event.set()
        self.join()
        n = max(self.samples, 1)
        lines = [f"engine thread: {self.samples} stack samples"]
        for title, counter in (("self", self.leaf), ("inclusive", self.inclusive)):
            lines.append(f"  top {title}:")
            lines += [f"    {100 * c / n:5.1f}%  {name}" for name, c in counter.most_common(rows)]
        return "\n".join(lines)


def _prefill(engine, requests: int, prompt_len: int, token_id_max: int) -> float:
    done = []

    def sink(item) -> None:
        if isinstance(item, BaseException) or item.finished:
            done.append(item)

    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    for index in range(requests):
        prompt = [(index * 7919 + i * 104729) % token_id_max for i in range(prompt_len)]
        engine.submit(prompt, params, sink, cache_salt="profile-prefill")
    while len(done) < requests:
        time.sleep(0.001)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=562)
    parser.add_argument("--prefill-requests", type=int, default=29)
    parser.add_argument("--rows", type=int, default=25, help="kernels per table")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu to try it")
    parser.add_argument("--model-dir", default=None, help="default: the nano benchmark's model")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_profile: no CUDA GPU; nothing to profile", file=sys.stderr)
        return 2
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model_dir = nano_model_path(args.model_dir)
    weight_bytes = count_parameters(model_dir) * 2
    bandwidth = copy_bandwidth(torch.device(args.device))
    start = time.perf_counter()
    ours = on_own_thread(
        lambda: OurEngine(model_dir, args.batch, 16384, None, device=args.device,
                          max_model_len=NANO_MAX_MODEL_LEN)
    )  # fmt: skip
    print(f"== engine start: {time.perf_counter() - start:.2f} s")
    try:
        engine = ours.model.engine
        runner = engine.core.runner
        # nano's ids, or fewer where the model's vocabulary is smaller (--model-dir)
        token_id_max = min(NANO_TOKEN_ID_MAX, engine.loaded.model.spec.vocab_size - 1)
        first = _prefill(engine, 1, 64, token_id_max)
        print(f"== first request (64-token prompt, 1 token): {first:.3f} s")
        _prefill(engine, 2, 64, token_id_max)  # warm-up: kernels compiled outside the windows
        activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
        for label, graphs in (("decode-graphs", True), ("decode-eager", False)):
            if graphs and runner.decode_graphs is None:
                print(f"== {label}: the engine captured no CUDA graphs; skipped")
                continue
            runner.use_decode_graphs = graphs
            sampler = _StackSampler()
            sampler.start()
            with profile(activities=activities) as prof:
                step = measure_decode(
                    engine, args.batch, args.prompt_len, args.steps, token_id_max,
                    weight_bytes, bandwidth,
                )  # fmt: skip
            print(
                f"== {label}: batch {step.batch}, {step.steps} steps: wall "
                f"{step.step_s * 1e3:.2f} ms/step, engine step {step.engine_step_s * 1e3:.2f} ms, "
                f"model runner {step.model_s * 1e3:.2f} ms, forward {step.forward_s * 1e3:.2f} ms, "
                f"token wait {step.wait_s * 1e3:.2f} ms, "
                f"output thread {step.output_s * 1e3:.2f} ms, gc {step.gc_s * 1e3:.2f} ms, "
                f"floor at {bandwidth / 1e12:.2f} TB/s {step.floor_s * 1e3:.2f} ms "
                "(the kernel table below also holds the batch's prefill)"
            )
            print(sampler.report(args.rows))
            print(_table(prof, args.rows))
            _save(prof, args.out, label)
        runner.use_decode_graphs = runner.decode_graphs is not None
        with profile(activities=activities) as prof:
            seconds = _prefill(engine, args.prefill_requests, args.prompt_len * 2, token_id_max)
        tokens = args.prefill_requests * args.prompt_len * 2
        print(
            f"== prefill: {tokens} prompt tokens in {seconds:.3f} s ({tokens / seconds:.0f} tok/s)"
        )
        print(_table(prof, args.rows))
        _save(prof, args.out, "prefill")
    finally:
        on_own_thread(ours.close)
    return 0


if __name__ == "__main__":
    sys.exit(main())
