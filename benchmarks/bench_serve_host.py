"""The server's CPU time per streamed token, and its engine step, with the forward taken out.

On a GPU the engine's batch-256 step takes a few ms of device time, so what bounds a served
stream is the host: the engine loop, the output thread and the HTTP server's event loop,
all under one GIL. This starts a real server (uvicorn on 127.0.0.1, in a child process) on
the engine's GPU path run eagerly on the CPU, with the forward replaced by fixed logits as in
``bench_host_step.py`` (and torch on one thread: a GPU samples on the device), streams
``--concurrency`` completions at once with the load client, and reads each of the server's
threads' CPU time from ``/proc`` and its engine steps from ``/metrics``. It prints, per
streamed token, the CPU microseconds of the event loop, the engine loop, the output thread,
the rest and each process, the ceiling the named threads set (a million over their sum:
they run one at a time), and the engine's wall time per step. ``--device-ms`` runs the engine on
``bench_host_step.py``'s simulated device, as on CUDA, so the step shows whether the served
host keeps up with that device time:

    python benchmarks/bench_serve_host.py --concurrency 256 --max-tokens 200 --device-ms 6.3

``--engine-process`` serves as ``autoglm serve --engine-process`` does: the engine loop and
the output thread in a child process of the server, which keeps the event loop (and each
process a thread for the pipe between them). Each process's threads take turns under its
own GIL, and with torch on one thread a process's CPU time is its GIL's, so the ceiling is
then a million over the busier process's time.

The client runs on the same machine and takes CPU time from the server on a small one, so
the wall-clock tokens/s is a floor; the CPU time per token is the figure to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

_THREADS = ("event loop", "engine loop", "output thread")


def build_engine(checkpoint: str, batch: int, device_ms: float):
    """The engine, its forward taken out (and on a simulated device with ``device_ms``);
    prints its threads' ids. Runs in the server's process, or in the engine process (a
    module-level function: ``--engine-process`` sends it there)."""
    os.environ["TRITON_INTERPRET"] = "1"  # the triton backend on CPU tensors
    import torch
    from bench_host_step import SimulatedDevice, instant_forward

    from auto_glm import GLMModel

    model = GLMModel(
        checkpoint,
        device="cpu",
        dtype="float32",
        max_num_seqs=batch,
        max_num_batched_tokens=max(8192, batch * 64),
        kv_cache_memory=512 << 20,
        attention_backend="triton",
        cuda_graphs=True,
    )
    instant_forward(model.engine.loaded.model, batch)
    torch.set_num_threads(1)  # no CPU thread team: on a GPU the sampling is the device's
    if device_ms:
        SimulatedDevice(device_ms / 1e3).attach(model.engine.core)
    ids = {t.name: t.native_id for t in threading.enumerate()}
    names = {"engine loop": "autoglm-engine", "output thread": "autoglm-output"}
    print(json.dumps({k: [os.getpid(), ids[v]] for k, v in names.items()}), flush=True)
    return model.engine


def serve(
    checkpoint: str, port: int, batch: int, device_ms: float, interval: int, split: bool
) -> None:
    """The child: a server whose forward costs nothing, its engine in this process or (with
    ``split``) in an engine process of its own; prints its threads' ids first."""
    from functools import partial

    import uvicorn

    from auto_glm.cluster.process import ProcessEngineClient
    from auto_glm.fleet import ModelTable
    from auto_glm.serving import ServerConfig
    from auto_glm.serving.app import create_app

    if split:
        import bench_serve_host  # by its name: the engine process imports it so, not __main__

        build = partial(bench_serve_host.build_engine, checkpoint, batch, device_ms)
        engine = ProcessEngineClient.start(build, "tiny")
    else:
        engine = build_engine(checkpoint, batch, device_ms)
    config = ServerConfig(served_model_name="tiny", log_level="warning", stream_interval=interval)
    app = create_app(ModelTable.single("tiny", engine), config)
    tids = {"event loop": [os.getpid(), threading.main_thread().native_id]}
    print(json.dumps(tids), flush=True)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _cpu(pid: int, tid: int | None = None) -> float:
    """CPU seconds of process ``pid``'s thread ``tid`` (or of its main thread), to the ns."""
    with open(f"/proc/{pid}/task/{tid or pid}/schedstat") as stat:
        return int(stat.read().split()[0]) / 1e9  # time on a CPU


def _process_cpu(pid: int) -> float:
    """CPU seconds of the living threads of process ``pid``."""
    total = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # the thread ended after the listing
            total += _cpu(pid, int(tid))
    return total


def _snapshot(tids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds of each named thread ``[pid, tid]``, of the server's process and of the
    engine's (0 when they are one)."""
    out = {name: _cpu(pid, tid) for name, (pid, tid) in tids.items()}
    server, engine = tids["event loop"][0], tids["engine loop"][0]
    out["server process"] = _process_cpu(server)
    out["engine process"] = _process_cpu(engine) if engine != server else 0.0
    return out


def _engine_steps(url: str) -> float:
    """The server's engine steps so far, from its Prometheus metrics."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    (line,) = [x for x in text.splitlines() if x.startswith("autoglm:engine_steps_total")]
    return float(line.rsplit(" ", 1)[1])


def measure(checkpoint: Path, args: argparse.Namespace) -> dict[str, float]:
    from load_client import parse_args, run_load
    from local_server import free_port, wait_ready

    port = free_port()
    child = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            str(checkpoint),
            str(port),
            str(args.concurrency),
            str(args.device_ms),
            str(args.stream_interval),
            str(int(args.engine_process)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        tids: dict[str, list[int]] = {}
        while "event loop" not in tids:  # the engine's line, then the server's
            tids.update(json.loads(child.stdout.readline()))
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, alive=lambda: child.poll() is None)
        load = parse_args(
            [
                f"--url={url}",
                f"--concurrency={args.concurrency}",
                f"--max-tokens={args.max_tokens}",
                f"--endpoint={args.endpoint}",
                "--temperature=0",
            ]
        )
        asyncio.run(run_load(parse_args([f"--url={url}", "--concurrency=8", "--max-tokens=8"])))
        before, steps, start = _snapshot(tids), _engine_steps(url), time.perf_counter()
        result = asyncio.run(run_load(load))
        after, wall = _snapshot(tids), time.perf_counter() - start
        steps = _engine_steps(url) - steps
    finally:
        child.terminate()
        child.wait(timeout=30)
    if result.completed != result.requests:
        raise RuntimeError(f"requests failed: {result.errors}")
    tokens = result.output_tokens
    used = {name: (after[name] - before[name]) / tokens * 1e6 for name in before}
    used["process"] = used["server process"] + used["engine process"]
    used["rest"] = used["process"] - sum(used[name] for name in _THREADS)
    used["tok_s"] = result.output_tokens_per_s
    used["step_ms"] = wall / steps * 1e3
    used["batch"] = tokens / steps
    return used


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=256, help="streams at once")
    parser.add_argument("--max-tokens", type=int, default=200, help="tokens per stream")
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    parser.add_argument("--repeats", type=int, default=3, help="servers started; medians")
    parser.add_argument(
        "--device-ms",
        type=float,
        default=0.0,
        help="simulate a device that takes this long per step, with steps planned ahead",
    )
    parser.add_argument(
        "--stream-interval", type=int, default=1, help="the server's stream_interval setting"
    )
    parser.add_argument(
        "--engine-process",
        action="store_true",
        help="the server's engine_process setting: the engine in a child process of its own",
    )
    parser.add_argument("--serve", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        path, port, batch, device_ms, interval, split = args.serve
        serve(path, int(port), int(batch), float(device_ms), int(interval), split == "1")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from auto_glm.bench.machine import cpu_line
    from auto_glm.checkpoints import build_random_checkpoint

    print(f"machine: {cpu_line()}")
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = build_random_checkpoint(
            Path(scratch) / "qwen3-tiny", "Qwen3ForCausalLM", {"max_position_embeddings": 4096}
        )
        runs = [measure(checkpoint, args) for _ in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    # the threads of one process take turns; with the engine in a process of its own (torch
    # on one thread there: its CPU time is the GIL's), the busier process sets the ceiling
    if args.engine_process:
        gil = max(med["server process"], med["engine process"])
    else:
        gil = sum(med[name] for name in _THREADS)
    device = f", simulated device {args.device_ms:g} ms a step" if args.device_ms else ""
    if args.stream_interval > 1:
        device += f", stream_interval {args.stream_interval}"
    if args.engine_process:
        device += ", engine process"
    print(
        f"{args.concurrency} streams x {args.max_tokens} tokens, /v1/{args.endpoint}{device}; "
        "server CPU us per streamed token, medians:"
    )
    columns = (*_THREADS, "rest", "server process", "engine process", "whole server")
    print(f"| {' | '.join(columns)} | ceiling (tok/s) ", end="")
    print("| engine step (ms) | tokens a step | client's tok/s |")
    print("|---:" * (len(columns) + 4) + "|")
    med["whole server"] = med["process"]
    print(
        "".join(f"| {med[name]:.1f} " for name in columns)
        + f"| {1e6 / gil:,.0f} | {med['step_ms']:.2f} | {med['batch']:.0f} | {med['tok_s']:,.0f} |"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
