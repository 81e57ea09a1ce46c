"""Turns the timed runs into the benchmark's report: a JSON-ready dict and a printed table."""

from __future__ import annotations

import statistics
from dataclasses import asdict
from typing import Any

from auto_glm.bench.results import RunResult

__all__ = ["TARGETS", "format_report", "summarise"]

# Issue #3's targets: our output tokens/s over each transformers contender's (2-core CPU).
TARGETS: dict[str, float] = {"hf-seq": 6.0, "hf-static": 2.0, "hf-cb": 3.0}
OVERHEAD_TARGET = 0.10  # of step time outside the forward, at a full batch


def summarise(
    header: dict[str, Any], labels: dict[str, str], runs: dict[str, list[RunResult]]
) -> dict[str, Any]:
    """The report: ``header`` (model, machine, workload) plus medians, ratios and overhead."""
    contenders = {
        name: {
            "label": labels[name],
            "median_tokens_per_s": statistics.median(r.tokens_per_s for r in results),
            "runs": [
                {
                    "seconds": r.seconds,
                    "requests": r.num_requests,
                    "output_tokens": r.output_tokens,
                    "tokens_per_s": r.tokens_per_s,
                }
                for r in results
            ],
        }
        for name, results in runs.items()
    }
    report: dict[str, Any] = {**header, "contenders": contenders}
    if "ours" in runs:
        ours = contenders["ours"]["median_tokens_per_s"]
        report["ratios"] = {
            name: ours / c["median_tokens_per_s"]
            for name, c in contenders.items()
            if name != "ours"
        }
        report["targets"] = {name: TARGETS[name] for name in report["ratios"] if name in TARGETS}
        overheads = [r.overhead for r in runs["ours"] if r.overhead is not None]
        full = [o.full_batch_share for o in overheads if o.full_batch_share is not None]
        report["overhead"] = {
            "share": statistics.median(o.share for o in overheads),
            "full_batch_share": statistics.median(full) if full else None,
            "target": OVERHEAD_TARGET,
            "runs": [asdict(o) for o in overheads],
        }
    return report


def format_report(report: dict[str, Any]) -> str:
    model, work = report["model"], report["workload"]
    lines = [
        f"model: {model['architecture']}, {model['parameters'] / 1e6:.1f}M parameters, "
        f"{model['dtype']} weights, {report['machine']['torch_threads']} torch threads "
        f"({model['dir']})",
        f"workload: {work['requests']} requests (seed {work['seed']}), prompts "
        f"{work['prompt_lens'][0]}-{work['prompt_lens'][1]} tokens "
        f"({work['prompt_tokens']} in all), "
        f"outputs {work['output_lens'][0]}-{work['output_lens'][1]} tokens "
        f"({work['output_tokens']} in all), EOS ignored",
        f"runs: {report['runs']}, contenders interleaved; figures are medians",
        "",
        "| contender | output tokens/s (median) | runs | ours / this | target |",
        "|---|---:|---|---:|---:|",
    ]
    ratios, targets = report.get("ratios", {}), report.get("targets", {})
    for name, c in report["contenders"].items():
        each = " ".join(f"{r['tokens_per_s']:.1f}" for r in c["runs"])
        ratio = f"{ratios[name]:.2f}x" if name in ratios else "-"
        target = "-"
        if name in targets:
            verdict = "met" if ratios[name] >= targets[name] else "MISSED"
            target = f">= {targets[name]:g}x {verdict}"
        median = c["median_tokens_per_s"]
        lines.append(f"| {c['label']} | {median:.1f} | {each} | {ratio} | {target} |")
    overhead = report.get("overhead")
    if overhead is not None:
        full = overhead["full_batch_share"]
        full_text = "not measured (no full-batch window)" if full is None else f"{full:.1%}"
        lines += [
            "",
            f"our per-step overhead outside the model's forward (scheduling, batch preparation, "
            f"sampling): {overhead['share']:.1%} of step time over the whole run, {full_text} "
            f"while all {min(work['requests'], report['engine']['max_num_seqs'])} requests were "
            f"running (target < {overhead['target']:.0%}; medians over runs)",
        ]
    return "\n".join(lines)
