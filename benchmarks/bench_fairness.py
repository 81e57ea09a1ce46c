"""Fairness between tenants: does one tenant's flood delay another's short requests?

Tenant A keeps ``--flood`` long streaming requests in flight; tenant B sends ``--probes``
short requests one after another. B's time to first token (TTFT) is measured under
``queue_policy=fcfs``, under ``fair``, and for B alone on an idle server, each on a fresh
``autoglm serve`` process (demo model unless ``--model``) with its own tenant store.

    python benchmarks/bench_fairness.py --json fairness.json

Target: under ``fair``, B's p95 TTFT within 3x of B alone. Exit status 1 if it is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from auto_glm.bench.machine import cpu_line
from auto_glm.tenants import TenantStore

__all__ = ["main"]


def _cpu() -> str:
    return cpu_line()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``autoglm serve`` in a subprocess with tenants ``a`` and ``b`` in a fresh store."""

    def __init__(self, policy: str, args: argparse.Namespace, directory: Path) -> None:
        database = f"sqlite:///{directory / 'tenants.db'}"
        with TenantStore(database) as store:
            self.keys = {}
            for name in ("a", "b"):
                store.create_tenant(name)
                self.keys[name] = store.create_key(name)[1]
        self.url = f"http://127.0.0.1:{_free_port()}"
        command = [
            sys.executable, "-m", "auto_glm.serving",
            "--port", self.url.rsplit(":", 1)[1],
            "--database-url", database,
            "--queue-policy", policy,
            "--max-num-seqs", str(args.max_num_seqs),
            "--max-queued-requests", "1024",
            "--log-level", "warning",
        ]  # fmt: skip
        if args.model:
            command += ["--model", args.model]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert self.process.poll() is None, "the server exited during start-up"
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the server did not start in 300 s")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


async def _stream(client: httpx.AsyncClient, key: str, prompt: str, max_tokens: int) -> float:
    """Seconds to the first generated text of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    start = time.perf_counter()
    ttft = None
    headers = {"authorization": f"Bearer {key}"}
    async with client.stream("POST", "/v1/completions", json=body, headers=headers) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if ttft is None and line.startswith("data: {") and '"text":"' in line:
                ttft = time.perf_counter() - start
    if ttft is None:
        raise RuntimeError("the stream ended without text")
    return ttft


async def _scenario(server: Server, args: argparse.Namespace, flood: bool) -> list[float]:
    limits = httpx.Limits(max_connections=args.flood + 8)
    async with httpx.AsyncClient(base_url=server.url, timeout=600, limits=limits) as client:
        stop = asyncio.Event()

        async def keep_one_in_flight(i: int) -> None:
            # Not streamed: the flood must load the server, not this client's event loop.
            # Lengths spread over 0.5-1.5x, so that A's requests do not all end together.
            tokens = args.flood_tokens * (50 + (i * 37) % 101) // 100
            body = {"prompt": f"flood {i} " * 8, "max_tokens": tokens, "ignore_eos": True}
            headers = {"authorization": f"Bearer {server.keys['a']}"}
            while not stop.is_set():
                reply = await client.post("/v1/completions", json=body, headers=headers)
                reply.raise_for_status()

        flooders = [
            asyncio.create_task(keep_one_in_flight(i)) for i in range(args.flood if flood else 0)
        ]
        if flood:
            await asyncio.sleep(args.warmup)  # the flood fills every batch slot
        ttfts = []
        for i in range(args.probes):
            ttfts.append(await _stream(client, server.keys["b"], f"probe {i} short", 8))
            await asyncio.sleep(args.gap)
        stop.set()
        for task in flooders:
            task.cancel()
        await asyncio.gather(*flooders, return_exceptions=True)
        return ttfts


def _p(values: list[float], q: float) -> float:
    return (
        statistics.quantiles(values, n=100, method="inclusive")[q - 1]
        if len(values) > 1
        else values[0]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model directory (default: the demo model)")
    parser.add_argument("--flood", type=int, default=64, help="tenant A's requests in flight")
    parser.add_argument("--flood-tokens", type=int, default=400, help="tokens of each A request")
    parser.add_argument("--probes", type=int, default=20, help="tenant B's requests, in turn")
    parser.add_argument("--gap", type=float, default=0.2, help="seconds between B's requests")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of flood before B")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="server batch slots")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    print(f"CPU: {_cpu()}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as home:
        for label, policy, flood in [
            ("alone", "fair", False),
            ("fcfs", "fcfs", True),
            ("fair", "fair", True),
        ]:
            (Path(home) / label).mkdir()
            server = Server(policy, args, Path(home) / label)
            try:
                ttfts = asyncio.run(_scenario(server, args, flood))
            finally:
                server.stop()
            results[label] = {"p50_s": _p(ttfts, 50), "p95_s": _p(ttfts, 95), "ttfts_s": ttfts}
            print(f"B's TTFT {label:>5}: p50 {results[label]['p50_s'] * 1000:8.1f} ms   "
                  f"p95 {results[label]['p95_s'] * 1000:8.1f} ms")  # fmt: skip
    ratio = results["fair"]["p95_s"] / results["alone"]["p95_s"]
    fcfs = results["fcfs"]["p95_s"] / results["alone"]["p95_s"]
    print(f"fair p95 / alone p95 = {ratio:.2f}x (target <= 3x); fcfs p95 / alone = {fcfs:.2f}x")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"cpu": _cpu(), "args": vars(args), **results}, indent=2)
        )
    return 0 if ratio <= 3 else 1


if __name__ == "__main__":
    sys.exit(main())
