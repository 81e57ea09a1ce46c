"""What scaling out on Ray Serve buys and costs on this machine: 1 against 2 engine replicas.

Starts a local Ray cluster (``num_cpus=2``) inside a loopback-only network namespace (the
script re-executes itself under ``unshare --net`` when ``AUTOGLM_BENCH_NETNS`` is unset,
because Ray binds some ports to every interface), deploys the demo model with
:func:`auto_glm.cluster.app.build_app` with 1 and then 2 engine replicas and runs the same
seeded workloads through the Serve HTTP proxy, each after a warm-up:

- ``distinct``: ``--requests`` streaming ``/v1/completions`` calls, ``--concurrency`` at
  once, ``--max-tokens`` each with EOS ignored, every prompt different (so prefix affinity
  has nothing to gather);
- ``shared``: the same, but every prompt starts with one 300-token "system prompt" of
  repeated words and ends with a short suffix (what prefix affinity is for);
- ``short`` (1 replica and the single server): other distinct prompts, 8 tokens each, to
  split the front end's CPU cost into a part per request and a part per streamed token.

The machine is shared: each workload waits until processes outside this benchmark use
under 0.2 cores, and the report shows what they used during it ("other load").

Fairness on 2 cores: Ray's CPUs are bookkeeping, not pinning. 1 replica reserves 1.0 CPU,
2 replicas 0.5 each: the same 1.0 of Ray's 2 CPUs for engines either way (the ingress holds
its default, ``ingress_cpus``). Ray gives each replica ``max(1, floor(cpus))`` = 1 torch
thread (measured below), so 2 replicas may compute on both cores, sharing them with the
proxy, the ingress and this
load client; the 2/1 ratio is what a second replica buys on the same 2 cores, not on a new
machine.

The per-request costs of the Ray path are measured against one process serving the same
engine settings (:class:`GLMService`, 1 torch thread, in a child process like the Ray
replicas): CPU time per request of every process by role, and time to first token one
request at a time. The single server also counts its SQL statements (the tenant store:
one key lookup per request, usage upserts batched per second) while every call carries a
tenant's API key, as in production. Last, the affinity router's ranking is timed for larger
replica counts.

    python benchmarks/bench_ray.py --requests 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import random
import sys
import tempfile
import time
import timeit
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import ray
from ray import serve

# Runs from a source checkout too, where auto_glm is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hashing import _cpu  # noqa: E402
from local_server import free_port, wait_ready  # noqa: E402
from netns import in_namespace, reexec_in_namespace  # noqa: E402

from auto_glm.checkpoints import demo_model_path  # noqa: E402
from auto_glm.cluster.app import build_app  # noqa: E402
from auto_glm.cluster.router import rank  # noqa: E402
from auto_glm.loader.tokenizer import load_tokenizer  # noqa: E402
from auto_glm.serving import GLMService, ServerConfig  # noqa: E402
from auto_glm.serving.table_setup import build_table  # noqa: E402
from auto_glm.tenants import TenantStore  # noqa: E402

__all__ = ["main"]

APP = "autoglm"
SYSTEM_TOKENS = 300
SHORT_TOKENS = 8  # the "short" workload: distinct prompts, fewer tokens (per-token costs)
WARMUP = 16  # requests of 16 tokens, all at once, before each configuration is measured
REPLICA_CPUS = {1: 1.0, 2: 0.5}
Prompts = dict[str, list[str]]  # by workload
_WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing "
    "matches in the old town square near river bridge under grey autumn skies"
).split()
_ROLES = (
    ("ServeReplica:autoglm:engine", "engine replicas"),
    ("ServeReplica:autoglm:ingress", "ingress"),
    ("ProxyActor", "HTTP proxy"),
    ("ServeController", "Serve controller"),
)
ROLE_ORDER = (
    "single server",
    "engine replicas",
    "ingress",
    "HTTP proxy",
    "Serve controller",
    "other Ray processes",
    "load client",
)


# ---- the load client ---------------------------------------------------------------------
@dataclass
class Record:
    """One streamed request as the client saw it; times in seconds from sending it."""

    error: str | None = None
    done: bool = False
    ttft: float | None = None
    last_at: float | None = None
    gaps: list[float] = field(default_factory=list)
    chunks: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.done and self.error is None and self.completion_tokens > 0


@dataclass
class Run:
    """One workload against one deployment: what the clients saw and what it cost."""

    label: str
    records: list[Record]
    wall_s: float
    cpu_s: dict[str, float]
    per_replica: dict[str, float]
    other_load: float  # cores busy with processes outside this benchmark, on average


def _event(record: Record, event: str, at: float) -> None:
    if event == "data: [DONE]":
        record.done = True
        return
    if not event.startswith("data: "):
        return
    chunk = json.loads(event[6:])
    if "error" in chunk:
        record.error = chunk["error"].get("message", "error")
    elif chunk.get("usage"):
        usage = chunk["usage"]
        record.prompt_tokens = usage["prompt_tokens"]
        record.completion_tokens = usage["completion_tokens"]
        record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    elif chunk["choices"] and chunk["choices"][0]["text"]:
        record.chunks += 1
        if record.last_at is None:
            record.ttft = at
        else:
            record.gaps.append(at - record.last_at)
        record.last_at = at


async def _stream(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> Record:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    record = Record()
    start = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                record.error = f"http {response.status_code}"
                return record
            buffer = ""
            async for part in response.aiter_text():
                buffer += part
                *events, buffer = buffer.split("\n\n")
                for event in events:
                    _event(record, event.strip(), time.perf_counter() - start)
    except httpx.HTTPError as exc:
        record.error = type(exc).__name__
    return record


async def _load(
    base_url: str, key: str, prompts: list[str], concurrency: int, max_tokens: int
) -> tuple[list[Record], float]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(
        base_url=base_url,
        timeout=600,
        headers={"Authorization": f"Bearer {key}"},
        limits=httpx.Limits(max_connections=concurrency),
    ) as client:

        async def one(prompt: str) -> Record:
            async with limit:
                return await _stream(client, prompt, max_tokens)

        start = time.perf_counter()
        records = await asyncio.gather(*(one(p) for p in prompts))
    return list(records), time.perf_counter() - start


# ---- prompts -----------------------------------------------------------------------------
def distinct_prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Request {i}: {' '.join(rng.choices(_WORDS, k=24))}" for i in range(count)]


def system_prompt(encode: Callable[[str], list[int]], tokens: int) -> str:
    """Repeated words, as few as make at least ``tokens`` tokens."""
    words: list[str] = []
    while len(encode(" ".join(words))) < tokens:
        words.append(_WORDS[len(words) % len(_WORDS)])
    return " ".join(words)


def shared_prompts(count: int, seed: int, system: str) -> list[str]:
    rng = random.Random(seed)
    return [f"{system} Question {i}: {' '.join(rng.choices(_WORDS, k=6))}" for i in range(count)]


# ---- what the processes spend ------------------------------------------------------------
def _role(process: psutil.Process, me: int, server: int | None) -> str:
    if process.pid == me:
        return "load client"
    if process.pid == server:
        return "single server"
    title = " ".join(process.cmdline())
    return next((role for mark, role in _ROLES if mark in title), "other Ray processes")


def cpu_snapshot(server: int | None = None) -> dict[int, tuple[str, float]]:
    """CPU seconds so far of this process and every descendant (Ray's and the server's)."""
    me = psutil.Process()
    found = {}
    for process in [me, *me.children(recursive=True)]:
        try:
            with process.oneshot():
                times = process.cpu_times()
                found[process.pid] = (_role(process, me.pid, server), times.user + times.system)
        except psutil.Error:
            continue
    return found


def machine_busy() -> float:
    """CPU seconds the whole machine has spent busy (every process, all cores)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


def cpu_spent(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    spent: Counter[str] = Counter()
    for pid, (role, seconds) in after.items():
        spent[role] += seconds - before.get(pid, (role, 0.0))[1]
    return dict(spent)


def foreign_load(server: int | None, seconds: float) -> float:
    """Cores busy over the next ``seconds`` with processes outside this benchmark."""
    tree, busy = cpu_snapshot(server), machine_busy()
    time.sleep(seconds)
    ours = sum(cpu_spent(tree, cpu_snapshot(server)).values())
    return max(0.0, machine_busy() - busy - ours) / seconds


def wait_quiet(server: int | None, limit: float = 0.2, timeout: float = 120.0) -> None:
    """Until the rest of the machine (it is shared) has used under ``limit`` cores for 1 s."""
    deadline = time.monotonic() + timeout
    while foreign_load(server, 1.0) >= limit:
        if time.monotonic() > deadline:
            return


def requests_by_replica(base_url: str) -> dict[str, float]:
    """Requests finished so far per engine replica, from the ingress's /metrics."""
    text = httpx.get(f"{base_url}/metrics", timeout=30).text
    found: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("autoglm:request_success_total{") and 'replica="' in line:
            found[line.split('replica="')[1].split('"')[0]] += float(line.rsplit(" ", 1)[1])
    return dict(found)


def measure(
    label: str,
    base_url: str,
    key: str,
    prompts: list[str],
    concurrency: int,
    max_tokens: int,
    server: int | None = None,
) -> Run:
    served_before = requests_by_replica(base_url)
    wait_quiet(server)
    before, busy = cpu_snapshot(server), machine_busy()
    records, wall = asyncio.run(_load(base_url, key, prompts, concurrency, max_tokens))
    spent = cpu_spent(before, cpu_snapshot(server))
    other = max(0.0, machine_busy() - busy - sum(spent.values())) / wall
    served = requests_by_replica(base_url)
    per_replica = {r: n - served_before.get(r, 0.0) for r, n in served.items() if r}
    return Run(label, records, wall, spent, {r: n for r, n in per_replica.items() if n}, other)


def warm_up(base_url: str, key: str, seed: int) -> None:
    asyncio.run(_load(base_url, key, distinct_prompts(WARMUP, seed + 1000), WARMUP, 16))


# ---- the servers -------------------------------------------------------------------------
def server_config(database_url: str, **settings) -> ServerConfig:
    """The engine and tenancy settings every configuration shares."""
    return ServerConfig(
        model_name_or_path=str(demo_model_path()),
        device="cpu",
        kv_cache_memory="128MiB",
        max_num_seqs=32,
        log_level="warning",
        database_url=database_url,
        auth="required",
        **settings,
    )


def _statement_kind(statement: str) -> str:
    text = " ".join(statement.split()).lower()
    if text.startswith("insert into daily_usage"):
        return "usage upsert (write)"
    if "api_keys.digest" in text:
        return "key lookup (read)"
    if "daily_usage" in text and "sum(" in text:
        return "daily token total (read)"
    if "api_keys.revoked_at is null" in text:
        return "any active key (read)"
    return "other (schema check at start)"


def _serve_single(config: ServerConfig, counts_path: str) -> None:
    """The child process: one GLMService with 1 torch thread, counting its SQL statements."""
    import torch
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    torch.set_num_threads(1)
    counts: Counter[str] = Counter()

    def count(conn: object, cursor: object, statement: str, *rest: object) -> None:
        counts[_statement_kind(statement)] += 1

    event.listen(Engine, "before_cursor_execute", count)
    try:
        GLMService(table=build_table(config), config=config).run()
    finally:
        Path(counts_path).write_text(json.dumps(counts))


def bench_single(
    args: argparse.Namespace, database_url: str, key: str, scratch: Path, prompts: Prompts
) -> dict:
    port = free_port()
    config = server_config(database_url, host="127.0.0.1", port=port)
    counts_path = scratch / "sql-counts.json"
    child = multiprocessing.get_context("spawn").Process(
        target=_serve_single, args=(config, str(counts_path))
    )
    child.start()
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, child.is_alive)
        started = time.monotonic()
        warm_up(base_url, key, args.seed)
        runs = {
            "distinct": measure(
                "single server",
                base_url,
                key,
                prompts["distinct"],
                args.concurrency,
                args.max_tokens,
                child.pid,
            ),
            "short": measure(
                "single server",
                base_url,
                key,
                prompts["short"],
                args.concurrency,
                SHORT_TOKENS,
                child.pid,
            ),
            "sequential": measure(
                "single server", base_url, key, prompts["sequential"], 1, args.max_tokens, child.pid
            ),
        }
        traffic_s = time.monotonic() - started
    finally:
        child.terminate()  # SIGTERM: the server drains, flushes usage and exits
        child.join(120)
    served = WARMUP + sum(len(prompts[w]) for w in ("distinct", "short", "sequential"))
    sql = json.loads(counts_path.read_text()) if counts_path.exists() else {}
    return {"runs": runs, "sql": sql, "requests": served, "traffic_s": traffic_s}


def start_ray(scratch: Path) -> str:
    ray.init(
        num_cpus=2, include_dashboard=False, _temp_dir=str(scratch / "ray"), log_to_driver=False
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


class _ThreadProbe:
    def threads(self) -> int:
        import torch

        return torch.get_num_threads()


def torch_threads_in_ray(cpus: float) -> int:
    """Torch threads of a Ray actor reserving ``cpus`` CPUs (as an engine replica does)."""
    actor = ray.remote(num_cpus=cpus)(_ThreadProbe).remote()
    try:
        return ray.get(actor.threads.remote())
    finally:
        ray.kill(actor)


def bench_ray(
    args: argparse.Namespace,
    base_url: str,
    database_url: str,
    key: str,
    replicas: int,
    prompts: Prompts,
) -> dict[str, Run]:
    config = server_config(
        database_url, ray=True, num_replicas=replicas, replica_cpus=REPLICA_CPUS[replicas]
    )
    serve.run(build_app(config), name=APP, route_prefix="/")
    wait_ready(base_url, lambda: True)
    warm_up(base_url, key, args.seed)
    label = f"Ray, {replicas} replica{'s' if replicas > 1 else ''}"
    runs = {
        workload: measure(
            label, base_url, key, prompts[workload], args.concurrency, args.max_tokens
        )
        for workload in ("distinct", "shared")
    }
    if replicas == 1:
        runs["short"] = measure(
            label, base_url, key, prompts["short"], args.concurrency, SHORT_TOKENS
        )
        runs["sequential"] = measure(
            label, base_url, key, prompts["sequential"], 1, args.max_tokens
        )
    serve.delete(APP)
    return runs


def make_tenant(database_url: str) -> str:
    """A tenant with no limits and its API key (every call carries it)."""
    with TenantStore(database_url) as store:
        store.create_tenant("bench")
        _, key = store.create_key("bench")
    return key


def time_rank(replicas: int) -> float:
    """Microseconds :func:`rank` takes to order ``replicas`` replicas for one request."""
    ids = [uuid.uuid4().hex[:8] for _ in range(replicas)]
    queues = dict.fromkeys(ids, 0)
    calls = max(20, 20_000 // replicas)
    seconds = timeit.timeit(lambda: rank(uuid.uuid4().hex[:16], ids, queues, 4), number=calls)
    return seconds / calls * 1e6


# ---- the report --------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summary(run: Run) -> dict[str, float]:
    ok = [r for r in run.records if r.ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    prompt = sum(r.prompt_tokens for r in ok)
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "ok": len(ok),
        "tok_s": tokens / run.wall_s,
        "ttft50": _pct(ttft, 0.5) * 1e3,
        "ttft99": _pct(ttft, 0.99) * 1e3,
        "itl50": _pct(gaps, 0.5) * 1e3,
        "itl99": _pct(gaps, 0.99) * 1e3,
        "e2e50": _pct([r.ttft + sum(r.gaps) for r in ok if r.ttft is not None], 0.5) * 1e3,
        "cached": sum(r.cached_tokens for r in ok) / prompt if prompt else 0.0,
        "tokens_per_chunk": tokens / max(1, sum(r.chunks for r in ok)),
        "prompt_tokens": prompt / max(1, len(ok)),
    }


def print_throughput(rows: list[tuple[str, Run]]) -> None:
    print("| configuration | workload | ok | wall s | output tok/s | TTFT p50 / p99 ms |", end="")
    print(
        " ITL p50 / p99 ms | tokens per chunk | cached prompt tokens | requests per replica |"
        " other load (cores) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for workload, run in rows:
        s = summary(run)
        spread = " / ".join(f"{n:.0f}" for n in sorted(run.per_replica.values(), reverse=True))
        print(
            f"| {run.label} | {workload} | {s['ok']}/{len(run.records)} | {run.wall_s:.1f} | "
            f"{s['tok_s']:.0f} | {s['ttft50']:.0f} / {s['ttft99']:.0f} | "
            f"{s['itl50']:.1f} / {s['itl99']:.1f} | {s['tokens_per_chunk']:.2f} | "
            f"{s['cached']:.1%} of {s['prompt_tokens']:.0f} | {spread or '-'} | "
            f"{run.other_load:.2f} |"
        )


def print_ratios(one: dict[str, Run], two: dict[str, Run]) -> None:
    print("2 replicas / 1 replica:")
    for workload in ("distinct", "shared"):
        a, b = summary(one[workload]), summary(two[workload])
        print(
            f"- {workload}: output tok/s {b['tok_s'] / a['tok_s']:.2f}x, "
            f"TTFT p50 {b['ttft50'] / a['ttft50']:.2f}x, p99 {b['ttft99'] / a['ttft99']:.2f}x, "
            f"ITL p50 {b['itl50'] / a['itl50']:.2f}x, "
            f"cached share {a['cached']:.1%} -> {b['cached']:.1%}"
        )


def _cpu_ms(run: Run, roles: tuple[str, ...] = ()) -> float:
    """CPU ms per request of ``roles`` (none given: every process but the load client)."""
    chosen = [v for r, v in run.cpu_s.items() if (r in roles if roles else r != "load client")]
    return sum(chosen) / len(run.records) * 1e3


def print_cpu(rows: list[tuple[str, Run]]) -> None:
    roles = [r for r in ROLE_ORDER if any(r in run.cpu_s for _, run in rows)]
    print("| configuration | workload | wall s | " + " | ".join(roles) + " | all but client |")
    print("|---|---|---:|" + "---:|" * (len(roles) + 1))
    for workload, run in rows:
        cells = " | ".join(f"{_cpu_ms(run, (role,)):.1f}" for role in roles)
        print(f"| {run.label} | {workload} | {run.wall_s:.1f} | {cells} | {_cpu_ms(run):.1f} |")


def _split(long: Run, short: Run, cost: Callable[[Run], float]) -> tuple[float, float]:
    """``cost`` per request as a fixed part plus a part per output token: (ms, ms/token)."""
    tokens_long = sum(r.completion_tokens for r in long.records) / len(long.records)
    tokens_short = sum(r.completion_tokens for r in short.records) / len(short.records)
    per_token = (cost(long) - cost(short)) / (tokens_long - tokens_short)
    return cost(short) - per_token * tokens_short, per_token


def print_ingress(single: dict[str, Run], ray_one: dict[str, Run]) -> None:
    front = ("ingress", "HTTP proxy")
    for workload in ("sequential", "short", "distinct"):
        a, b = summary(single[workload]), summary(ray_one[workload])
        extra = _cpu_ms(ray_one[workload]) - _cpu_ms(single[workload])
        print(
            f"- {workload} ({len(single[workload].records)} requests): TTFT p50 "
            f"{a['ttft50']:.1f} -> {b['ttft50']:.1f} ms (+{b['ttft50'] - a['ttft50']:.1f}), "
            f"ITL p50 {a['itl50']:.2f} -> {b['itl50']:.2f} ms, E2E p50 {a['e2e50']:.0f} -> "
            f"{b['e2e50']:.0f} ms; CPU per request, all processes but the client: "
            f"{extra:+.1f} ms; proxy + ingress alone: {_cpu_ms(ray_one[workload], front):.1f} ms"
        )
    long, short = ray_one["distinct"], ray_one["short"]
    fixed, per_token = _split(long, short, lambda run: _cpu_ms(run, front))
    print(
        f"- proxy + ingress CPU (short against distinct): {fixed:.1f} ms per request + "
        f"{per_token:.2f} ms per output token"
    )
    twins = {id(long): single["distinct"], id(short): single["short"]}
    fixed, per_token = _split(long, short, lambda run: _cpu_ms(run) - _cpu_ms(twins[id(run)]))
    print(
        f"- Ray path minus single server, every process but the client: {fixed:.1f} ms per "
        f"request + {per_token:.2f} ms per output token"
    )


def print_sql(single: dict) -> None:
    sql, requests = single["sql"], single["requests"]
    print(
        f"{requests} requests in {single['traffic_s']:.1f} s of traffic (warm-up included), "
        "each with the tenant's API key; usage flush interval 1.0 s (UsageRecorder default):"
    )
    for kind, count in sorted(sql.items()):
        share = "" if kind.startswith("other") else f" ({count / requests:.3f} per request)"
        print(f"- {kind}: {count}{share}")


def report(
    args: argparse.Namespace,
    threads: dict[float, int],
    single: dict,
    one: dict[str, Run],
    two: dict[str, Run],
) -> None:
    print(f"CPU: {_cpu()}")
    print(
        f"Python {sys.version.split()[0]}, Ray {ray.__version__}; load average now "
        f"{os.getloadavg()[0]:.2f}; seed {args.seed}"
    )
    print(
        f"workloads: {args.requests} streaming /v1/completions, {args.concurrency} at once, "
        f"max_tokens {args.max_tokens}, ignore_eos; shared prefix {SYSTEM_TOKENS}+ tokens; "
        f"sequential: {args.sequential} requests one at a time. Engine: demo model, cpu, "
        "max_num_seqs 32, kv_cache_memory 128MiB. Ray: num_cpus 2, ingress "
        f"{ServerConfig().ingress_cpus} CPU, "
        + ", ".join(f"{n} replica(s) x {c} CPU" for n, c in REPLICA_CPUS.items())
        + "; torch threads per actor: "
        + ", ".join(f"{c} CPU -> {t}" for c, t in threads.items())
        + "; single server: 1 torch thread."
    )
    print("\n## Throughput and latency\n")
    print_throughput(
        [(w, single["runs"][w]) for w in ("short", "distinct")]
        + [(w, one[w]) for w in ("short", "distinct", "shared")]
        + [(w, two[w]) for w in ("distinct", "shared")]
    )
    print()
    print_ratios(one, two)
    print("\n## Ingress overhead: Ray 1 replica against the single server\n")
    print_ingress(single["runs"], one)
    print("\nCPU ms per request by process (all processes on the 2 cores):\n")
    print_cpu(
        [(w, single["runs"][w]) for w in ("sequential", "short", "distinct")]
        + [(w, one[w]) for w in ("sequential", "short", "distinct", "shared")]
        + [(w, two[w]) for w in ("distinct", "shared")]
    )
    print("\n## Tenant store statements (single server, same front end as the ingress)\n")
    print_sql(single)
    print("\n## Affinity routing: rank() per request\n")
    for replicas in (2, 10, 100, 1000):
        print(f"- {replicas} replicas: {time_rank(replicas):.1f} us")


# ---- the run -----------------------------------------------------------------------------
def build_prompts(args: argparse.Namespace) -> Prompts:
    tokenizer = load_tokenizer(demo_model_path())
    system = system_prompt(
        lambda text: tokenizer.encode(text, add_special_tokens=False), SYSTEM_TOKENS
    )
    return {
        "distinct": distinct_prompts(args.requests, args.seed),
        "short": distinct_prompts(args.requests, args.seed + 2),
        "shared": shared_prompts(args.requests, args.seed, system),
        "sequential": distinct_prompts(args.sequential, args.seed + 1),
    }


def run_all(args: argparse.Namespace, scratch: Path) -> None:
    database_url = f"sqlite:///{scratch / 'tenants.db'}"
    key = make_tenant(database_url)
    prompts = build_prompts(args)
    single = bench_single(args, database_url, key, scratch, prompts)  # before Ray starts
    base_url = start_ray(scratch)
    try:
        threads = {cpus: torch_threads_in_ray(cpus) for cpus in sorted(set(REPLICA_CPUS.values()))}
        one = bench_ray(args, base_url, database_url, key, 1, prompts)
        two = bench_ray(args, base_url, database_url, key, 2, prompts)
    finally:
        serve.shutdown()
        ray.shutdown()
    report(args, threads, single, one, two)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=128, help="per workload (default: 128)")
    parser.add_argument("--concurrency", type=int, default=64, help="default: 64")
    parser.add_argument("--max-tokens", type=int, default=64, help="default: 64")
    parser.add_argument("--sequential", type=int, default=20, help="one-at-a-time requests")
    parser.add_argument("--seed", type=int, default=0)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if args.max_tokens <= SHORT_TOKENS:  # the per-token cost is the difference of the two
        parser.error(
            f"--max-tokens must be above the short workload's {SHORT_TOKENS} tokens, "
            f"got {args.max_tokens}"
        )
    if not in_namespace():
        return reexec_in_namespace(__file__, argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory(
        prefix="bench-ray-", dir="/tmp", ignore_cleanup_errors=True
    ) as scratch:
        run_all(args, Path(scratch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
