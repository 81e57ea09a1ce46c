"""Load client for ``autoglm serve``: N concurrent streaming requests, latency and throughput.

Reports time to first token (TTFT), inter-token latency (ITL: gaps between streamed
chunks), end-to-end latency (E2E) as p50/p95/p99, and output tokens/s over the run. It
also checks that nothing was lost: every request must end with a ``finish_reason``, a
usage chunk and ``data: [DONE]``; anything else is counted as an error, by kind.

    python benchmarks/load_client.py --url http://127.0.0.1:8080 --concurrency 256 \\
        --max-tokens 64 --json results.json

Exit status: 0 when every request completed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx

__all__ = ["LoadResult", "RequestRecord", "main", "run_load"]

_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge "
    "boxing matches in the old town square"
).split()


@dataclass
class RequestRecord:
    ok: bool = False
    error: str | None = None  # "http 429", "no [DONE]", "ReadTimeout", ...
    ttft: float | None = None  # seconds from sending to the first generated text
    e2e: float | None = None
    gaps: list[float] = field(default_factory=list)  # between consecutive text chunks
    output_tokens: int = 0
    finish_reason: str | None = None


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    completed: int
    errors: dict[str, int]
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]


def _prompt(index: int, words: int) -> str:
    # distinct per request, so the prefix cache cannot turn the run into a cache benchmark
    body = " ".join(_WORDS[(index + i) % len(_WORDS)] for i in range(words))
    return f"Request {index}: {body}"


def _body(args: argparse.Namespace, index: int) -> dict:
    body = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": args.ignore_eos,
    }
    if args.model:
        body["model"] = args.model
    prompt = _prompt(index, args.prompt_words)
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _text_of(choice: dict) -> str:
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def _one(client: httpx.AsyncClient, path: str, body: dict) -> RequestRecord:
    record = RequestRecord()
    start = last = time.perf_counter()
    done = False
    try:
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                record.error = f"http {response.status_code}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    record.error = f"stream error {chunk['error'].get('code')}"
                    return record
                now = time.perf_counter()
                for choice in chunk.get("choices", []):
                    if _text_of(choice):
                        if record.ttft is None:
                            record.ttft = now - start
                        else:
                            record.gaps.append(now - last)
                        last = now
                    record.finish_reason = choice.get("finish_reason") or record.finish_reason
                if chunk.get("usage"):
                    record.output_tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as exc:
        record.error = type(exc).__name__
        return record
    record.e2e = time.perf_counter() - start
    if not done:
        record.error = "no [DONE]"
    elif record.finish_reason is None:
        record.error = "no finish_reason"
    elif not record.output_tokens:
        record.error = "no usage"
    record.ok = record.error is None
    return record


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p95": float("nan"), "p99": float("nan")}
    if len(values) == 1:
        return {k: values[0] * 1e3 for k in ("p50", "p95", "p99")}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49] * 1e3, "p95": cuts[94] * 1e3, "p99": cuts[98] * 1e3}


async def run_load(args: argparse.Namespace) -> LoadResult:
    path = "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    limits = httpx.Limits(
        max_connections=args.concurrency, max_keepalive_connections=args.concurrency
    )
    gate = asyncio.Semaphore(args.concurrency)

    async def gated(client: httpx.AsyncClient, index: int) -> RequestRecord:
        async with gate:
            return await _one(client, path, _body(args, index))

    async with httpx.AsyncClient(base_url=args.url, timeout=args.timeout, limits=limits) as client:
        start = time.perf_counter()
        records = await asyncio.gather(*(gated(client, i) for i in range(args.requests)))
        wall = time.perf_counter() - start
    done = [r for r in records if r.ok]
    tokens = sum(r.output_tokens for r in done)
    return LoadResult(
        requests=len(records),
        concurrency=args.concurrency,
        completed=len(done),
        errors=dict(Counter(r.error for r in records if not r.ok)),
        wall_s=wall,
        output_tokens=tokens,
        output_tokens_per_s=tokens / wall,
        requests_per_s=len(done) / wall,
        ttft_ms=_percentiles([r.ttft for r in done if r.ttft is not None]),
        itl_ms=_percentiles([g for r in done for g in r.gaps]),
        e2e_ms=_percentiles([r.e2e for r in done if r.e2e is not None]),
    )


def format_table(result: LoadResult) -> str:
    lines = [
        f"requests {result.requests} (concurrency {result.concurrency}): "
        f"{result.completed} completed, errors {result.errors or 'none'}",
        f"wall {result.wall_s:.1f} s, {result.output_tokens} output tokens, "
        f"{result.output_tokens_per_s:.1f} output tokens/s, {result.requests_per_s:.2f} requests/s",
        f"{'metric':<10}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}",
    ]
    for name, values in (("TTFT", result.ttft_ms), ("ITL", result.itl_ms), ("E2E", result.e2e_ms)):
        lines.append(
            f"{name:<10}{values['p50']:>10.1f}{values['p95']:>10.1f}{values['p99']:>10.1f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL")
    parser.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    parser.add_argument("--model", default=None, help="model name (default: the served one)")
    parser.add_argument("--concurrency", type=int, default=256, help="requests in flight at once")
    parser.add_argument(
        "--requests", type=int, default=None, help="total requests (default: the concurrency)"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="generate exactly --max-tokens per request (default: on)",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--json", metavar="FILE", help="also write the results here as JSON")
    args = parser.parse_args(argv)
    args.requests = args.requests or args.concurrency
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run_load(args))
    print(format_table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"settings": vars(args), "result": asdict(result)}, out, indent=2)
    return 0 if result.completed == result.requests else 1


if __name__ == "__main__":
    sys.exit(main())
