"""Prints the report of ``autoglm bench --workload nano`` (the dict from ``run_nano``)."""

from __future__ import annotations

from typing import Any

__all__ = ["format_nano_report"]


def format_nano_report(report: dict[str, Any]) -> str:
    model, work, machine = report["model"], report["workload"], report["machine"]
    start, ours = report["startup"], report["ours"]
    lines = [
        f"machine: {machine['line']}",
        f"device: {machine['device']}, copy bandwidth {machine['copy_bandwidth'] / 1e9:.1f} GB/s "
        "(bytes read + written)",
        f"model: {model['architecture']}, {model['parameters'] / 1e6:.1f}M parameters, "
        f"{model['dtype']} weights, {report['engine']['compute_dtype']} math ({model['dir']})",
        f"workload: nano-vllm's, {work['requests']} requests (seed {work['seed']}), token ids "
        f"{work['token_ids'][0]}-{work['token_ids'][1]}, prompts "
        f"{work['prompt_lens'][0]}-{work['prompt_lens'][1]} tokens ({work['prompt_tokens']} in "
        f"all), outputs {work['output_lens'][0]}-{work['output_lens'][1]} tokens "
        f"({work['output_tokens']} in all), EOS ignored, greedy",
        "",
        f"engine start: {start['engine_start_s']:.2f} s; first request after start: first token "
        f"in {start['first_token_s']:.3f} s, {start['first_request_tokens']} tokens in "
        f"{start['first_request_s']:.3f} s",
        f"output tokens/s, ours: {ours['median_tokens_per_s']:.1f} "
        f"(median of {report['runs']}; {ours['label']})",
        *_ahead_lines(ours),
        *_transformers_lines(report),
        "",
        "| decode batch | step (ms) | engine step (ms) | forward (ms) | token wait (ms) "
        "| output thread (ms) | gc (ms) | mean context | KV read (MB) | floor (ms) "
        "| step / floor |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for step in report["decode"]:
        lines.append(
            f"| {step['batch']} | {step['step_s'] * 1e3:.2f} | {step['engine_step_s'] * 1e3:.2f} "
            f"| {step['forward_s'] * 1e3:.2f} | {step['wait_s'] * 1e3:.2f} "
            f"| {step['output_s'] * 1e3:.2f} | {step['gc_s'] * 1e3:.2f} "
            f"| {step['context_tokens']:.0f} "
            f"| {step['kv_bytes'] / 1e6:.1f} "
            f"| {step['floor_s'] * 1e3:.3f} | {step['floor_ratio']:.2f}x |"
        )
    replay = "CUDA graphs" if report["engine"].get("cuda_graphs") else "eager"
    if report["engine"].get("overlap_steps") and report["engine"].get("cuda_graphs"):
        replay += ", each planned and launched while the one before runs"
    lines.append(
        f"floor = (weights {model['weight_bytes'] / 1e6:.1f} MB + the step's KV read) / copy "
        f"bandwidth; each row is the mean over its timed steps; token wait: the loop's wait "
        "for the sampled tokens (the rest of the step is its host time); output thread: its "
        "CPU time per step; gc: garbage collections, which stop every thread; "
        f"decode steps: {replay}; "
        f"attention: {report['engine'].get('attention_backend', 'auto')}"
    )
    for in_turn, graphed in zip(report.get("decode_in_turn", []), report["decode"], strict=False):
        lines.append(
            f"decode batch {in_turn['batch']} with CUDA graphs, each step planned after the "
            f"last one's tokens are read: {in_turn['step_s'] * 1e3:.2f} ms per step "
            f"({in_turn['floor_ratio']:.2f}x its floor; "
            f"{in_turn['step_s'] / graphed['step_s']:.2f}x the overlapped step)"
        )
    for eager, graphed in zip(report.get("decode_eager", []), report["decode"], strict=False):
        lines.append(
            f"decode batch {eager['batch']} without CUDA graphs: {eager['step_s'] * 1e3:.2f} ms "
            f"per step ({eager['floor_ratio']:.2f}x its floor; "
            f"{eager['step_s'] / graphed['step_s']:.2f}x the step with graphs)"
        )
    return "\n".join(lines)


def _ahead_lines(ours: dict[str, Any]) -> list[str]:
    """Per run of ours: its engine steps, and how many were planned while the one before ran."""
    return [
        f"run {index}, ours: {run['steps']} engine steps, {run['steps_ahead']} of them "
        f"({run['steps_ahead'] / run['steps']:.0%}) planned and launched while the one before "
        f"ran; garbage collections held it {run['gc_s'] * 1e3:.0f} ms in all"
        for index, run in enumerate(ours["runs"], 1)
        if run.get("steps")
    ]


def _transformers_lines(report: dict[str, Any]) -> list[str]:
    hf = report["transformers"]
    if hf is None:
        return ["output tokens/s, transformers: not run (--hf-requests 0)"]
    requests = f"{hf['runs'][0]['requests']} of {report['workload']['requests']}"
    lines = [
        f"output tokens/s, transformers ({contender['name']}): "
        f"{contender['median_tokens_per_s']:.1f} on the first {requests} requests "
        f"({contender['label']})"
        for contender in report["transformers_contenders"]
    ]
    return [
        *lines,
        f"ours / transformers' best ({hf['name']}): {report['ratio']:.2f}x (per output token)",
    ]
