"""gRPC against REST streaming: the same completions through both transports of one server.

Starts one :class:`GLMService` on the demo model (``--model`` for another) with HTTP and gRPC
on free ports, in a background thread of this process, and sends ``--requests`` seeded
prompts, ``--concurrency`` at a time, each generating exactly ``--max-tokens`` tokens
(``ignore_eos``, greedy): REST as streamed ``POST /v1/completions`` (httpx, server-sent
events), gRPC as ``Inference/Generate`` (:class:`auto_glm.client.AsyncGrpcClient`, one
channel). The transports alternate for ``--rounds`` rounds after a short warm-up of both,
which also puts every prompt in the prefix cache for either transport.

Per transport: output tokens/s (median over the rounds), inter-token latency (ITL: the gaps
between consecutive streamed responses that carry tokens, per request) p50/p99, time to
first token (TTFT) p50, and the gRPC/REST ratio of each. A request that does not produce
exactly ``--max-tokens`` tokens stops the run. Client and server share this process (and
its GIL), so each transport's client-side work (httpx and a JSON parse per event, or
protobuf) is paid for in server time as well, as it is on a server that also runs its
callers.

    python benchmarks/bench_grpc.py --requests 128 --concurrency 64 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# Runs from a source checkout too, where auto_glm is not installed; and from anywhere, with
# bench_hashing (the CPU description every benchmark prints) next to this file.
_HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE.parent), str(_HERE)]

from bench_hashing import _cpu  # noqa: E402
from local_server import free_port, serving  # noqa: E402
from sse import chunks  # noqa: E402

from auto_glm.api import GLMModel  # noqa: E402
from auto_glm.checkpoints import demo_model_path  # noqa: E402
from auto_glm.client import AsyncGrpcClient  # noqa: E402
from auto_glm.serving import GLMService, ServerConfig  # noqa: E402

__all__ = ["main"]

_WORDS = "river stone quiet lantern orbit maple copper signal harbor velvet ember tide".split()


@dataclass
class Record:
    """One request: seconds to its first tokens, the gaps after them, tokens received."""

    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0


class Clock:
    """Stamps the streamed responses of one request that carry tokens."""

    def __init__(self) -> None:
        self.record = Record()
        self.start = self.last = time.perf_counter()

    def tick(self) -> None:
        now = time.perf_counter()
        if self.record.ttft is None:
            self.record.ttft = now - self.start
        else:
            self.record.gaps.append(now - self.last)
        self.last = now


async def _rest(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> Record:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    clock = Clock()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        async for chunk in chunks(response):
            if any(c["text"] or c["finish_reason"] for c in chunk["choices"]):
                clock.tick()
            if chunk.get("usage"):
                clock.record.tokens = chunk["usage"]["completion_tokens"]
    return clock.record


async def _grpc(client: AsyncGrpcClient, prompt: str, max_tokens: int) -> Record:
    clock = Clock()
    stream = client.generate(prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True)
    async for response in stream:
        if response.token_ids:
            clock.tick()
            clock.record.tokens += len(response.token_ids)
    return clock.record


async def _run(
    call: Callable[[str], Awaitable[Record]], prompts: list[str], concurrency: int
) -> tuple[float, list[Record]]:
    gate = asyncio.Semaphore(concurrency)

    async def gated(prompt: str) -> Record:
        async with gate:
            return await call(prompt)

    start = time.perf_counter()
    records = await asyncio.gather(*(gated(p) for p in prompts))
    return time.perf_counter() - start, records


def _ms(values: list[float], percent: int) -> float:
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[percent - 1] * 1e3


async def _bench(args: argparse.Namespace, base_url: str, grpc_target: str) -> tuple[dict, dict]:
    rng = random.Random(args.seed)
    prompts = [" ".join(rng.choices(_WORDS, k=args.prompt_words)) for _ in range(args.requests)]
    limits = httpx.Limits(max_connections=args.concurrency)
    async with (
        httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as rest,
        AsyncGrpcClient(grpc_target, timeout=600) as grpc,
    ):
        calls: dict[str, Callable[[str, int], Awaitable[Record]]] = {
            "REST": lambda prompt, tokens: _rest(rest, prompt, tokens),
            "gRPC": lambda prompt, tokens: _grpc(grpc, prompt, tokens),
        }
        for call in calls.values():  # warm-up: connections, code paths, the prefix cache
            await _run(lambda p, call=call: call(p, 2), prompts, args.concurrency)
        runs: dict[str, list[tuple[float, list[Record]]]] = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                wall, records = await _run(
                    lambda p, call=call: call(p, args.max_tokens), prompts, args.concurrency
                )
                wrong = [r.tokens for r in records if r.tokens != args.max_tokens]
                if wrong:
                    raise RuntimeError(f"{name}: {len(wrong)} request(s) got {wrong[:5]} tokens")
                runs[name].append((wall, records))
    report, rounds = {}, {}
    for name, done in runs.items():
        records = [r for _, rs in done for r in rs]
        gaps = [g for r in records for g in r.gaps]
        per_round = [sum(r.tokens for r in rs) / wall for wall, rs in done]
        rounds[name] = [round(rate, 1) for rate in per_round]
        report[name] = {
            "output_tokens_per_s": statistics.median(per_round),
            "itl_p50_ms": _ms(gaps, 50),
            "itl_p99_ms": _ms(gaps, 99),
            "ttft_p50_ms": _ms([r.ttft for r in records if r.ttft is not None], 50),
        }
    report["gRPC/REST"] = {k: report["gRPC"][k] / report["REST"][k] for k in report["REST"]}
    return report, rounds


@contextmanager
def _service(args: argparse.Namespace) -> Iterator[tuple[str, str]]:
    """One server, HTTP and gRPC, on its own event loop; yields (base URL, gRPC target)."""
    config = ServerConfig(
        host="127.0.0.1",
        port=free_port(),
        grpc_port=free_port(),
        log_level="warning",
        max_num_seqs=args.concurrency,
        max_queued_requests=max(256, args.requests),
    )
    model = GLMModel(args.model or str(demo_model_path()), device="cpu", **config.engine_options())
    service = GLMService(model, config=config)
    try:
        with serving(service) as base_url:
            yield base_url, f"127.0.0.1:{config.grpc_port}"
    finally:
        model.close()


_COLUMNS = (
    ("output_tokens_per_s", "tok/s"),
    ("itl_p50_ms", "ITL p50 ms"),
    ("itl_p99_ms", "ITL p99 ms"),
    ("ttft_p50_ms", "TTFT p50 ms"),
)


def _table(report: dict) -> str:
    lines = ["".join([f"{'':<10}", *(f"{title:>13}" for _, title in _COLUMNS)])]
    for name, row in report.items():
        digits = 3 if name == "gRPC/REST" else 1
        cells = (f"{row[key]:>13.{digits}f}" for key, _ in _COLUMNS)
        lines.append("".join([f"{name:<10}", *cells]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model directory (default: the demo)")
    parser.add_argument("--requests", type=int, default=128, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=64, help="in flight at once")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--prompt-words", type=int, default=16, help="words per prompt")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each transport")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.max_tokens < 2:
        parser.error("--max-tokens must be 2 or more: inter-token latency needs two tokens")
    print(f"CPU: {_cpu()}")
    print(
        f"{args.requests} requests, {args.concurrency} concurrent, {args.max_tokens} tokens "
        f"each, {args.rounds} rounds per transport"
    )
    with _service(args) as (base_url, grpc_target):
        report, rounds = asyncio.run(_bench(args, base_url, grpc_target))
    print(_table(report))
    print("tok/s per round: " + "; ".join(f"{k} {v}" for k, v in rounds.items()))
    if args.json:
        summary = {"cpu": _cpu(), "report": report, "tokens_per_s_per_round": rounds}
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
