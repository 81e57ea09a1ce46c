"""Issue #3's engine benchmark: our engine against transformers on one seeded workload."""

from auto_glm.bench.cli import BENCH_HELP, add_bench_command, configure_bench, main, run_bench
from auto_glm.bench.runner import CONTENDERS, BenchOptions, run_benchmark

__all__ = [
    "BENCH_HELP",
    "CONTENDERS",
    "BenchOptions",
    "add_bench_command",
    "configure_bench",
    "main",
    "run_bench",
    "run_benchmark",
]
