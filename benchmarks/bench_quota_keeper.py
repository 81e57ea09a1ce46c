"""What keeping tenants' budgets in one Ray Serve deployment costs per admitted call.

With more than one ingress replica, every tenant call is checked and reserved by the one
``quotas`` deployment (:class:`~auto_glm.cluster.quotas.QuotaKeeper`) and settled there
afterwards. This deploys the keeper alone on a local Ray cluster (``num_cpus=2``, in a
loopback-only network namespace) over a SQLite tenant store, and admits calls through a
:class:`~auto_glm.cluster.quotas.KeptBook` as an ingress does: ``check_requests`` and
``reserve`` awaited, ``settle`` sent without waiting. ``--concurrency`` callers at once,
spread over ``--tenants`` tenants whose limits are never reached. The peer is the same
admission against this process's own budgets (:class:`~auto_glm.tenants.quotas.LocalBook`),
as a single server does it.

    python benchmarks/bench_quota_keeper.py
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
from ray import serve

# Runs from a source checkout too, where auto_glm is not installed.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from netns import in_namespace, reexec_in_namespace  # noqa: E402

from auto_glm.bench.machine import cpu_line  # noqa: E402
from auto_glm.cluster.quotas import KeptBook, QuotaKeeper  # noqa: E402
from auto_glm.tenants import Tenant, TenantLimits, TenantStore  # noqa: E402
from auto_glm.tenants.loads import Load  # noqa: E402
from auto_glm.tenants.quotas import LocalBook, QuotaBook, Quotas  # noqa: E402

__all__ = ["main"]

LIMITS = TenantLimits(rpm=10**9, tpm=10**12, daily_tokens=10**15)


async def admit(book: QuotaBook, tenant: Tenant) -> float:
    """One call as admission makes it; the seconds until it may run."""
    start = time.perf_counter()
    await book.check_requests(tenant)
    reservation = await book.reserve(tenant, 200, Load(), 1)
    took = time.perf_counter() - start
    book.settle(reservation, 150)
    return took


async def run(book: QuotaBook, tenants: list[Tenant], calls: int, concurrency: int) -> dict:
    waits: list[float] = []
    queue = iter(range(calls))

    async def caller() -> None:
        for i in queue:
            waits.append(await admit(book, tenants[i % len(tenants)]))

    start = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    waits.sort()
    return {
        "per_s": calls / wall,
        "p50_ms": 1e3 * statistics.median(waits),
        "p99_ms": 1e3 * waits[int(0.99 * (len(waits) - 1))],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--tenants", type=int, default=8)
    args = parser.parse_args(argv)
    if not in_namespace():
        return reexec_in_namespace(__file__, argv)

    print(cpu_line(("avx512f", "avx512_bf16", "amx_bf16")))
    print(f"Python {sys.version.split()[0]}, Ray {ray.__version__}")
    work = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    url = f"sqlite:///{work / 'tenants.db'}"
    store = TenantStore(url)
    tenants = [store.create_tenant(f"t{i}", LIMITS) for i in range(args.tenants)]
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=str(work), log_to_driver=False)
    try:
        keeper = serve.run(
            serve.deployment(QuotaKeeper, name="quotas", max_ongoing_requests=10_000).bind(url),
            name="keeper",
            route_prefix=None,
        )
        print(
            f"{args.calls} admissions (check + reserve awaited, settle sent) per row, "
            f"{args.tenants} tenants\n"
        )
        print("| budgets | concurrency | admissions/s | wait p50 ms | wait p99 ms |")
        print("|---|---:|---:|---:|---:|")
        for concurrency in args.concurrency:
            rows = {
                "this process (LocalBook)": LocalBook(Quotas(store.tokens_used)),
                "Ray keeper (KeptBook)": KeptBook(keeper),
            }
            measured = {}
            for name, book in rows.items():
                asyncio.run(run(book, tenants, min(200, args.calls), concurrency))  # warm-up
                measured[name] = got = asyncio.run(run(book, tenants, args.calls, concurrency))
                print(
                    f"| {name} | {concurrency} | {got['per_s']:,.0f} | {got['p50_ms']:.3f} "
                    f"| {got['p99_ms']:.3f} |"
                )
            local, kept = measured.values()
            print(f"|  | keeper / local | {kept['per_s'] / local['per_s']:.4f}x | | |")
    finally:
        serve.shutdown()
        ray.shutdown()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
