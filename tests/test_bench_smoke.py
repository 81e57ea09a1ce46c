"""The engine benchmark's machinery on a tiny model: report fields and exact token counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from auto_glm.bench.cli import main
from auto_glm.bench.model import prompt_vocab
from auto_glm.bench.workload import make_workload

TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "partial_rotary_factor": 0.5,
}


@pytest.fixture(scope="module")
def tiny_model(make_checkpoint) -> Path:
    return make_checkpoint("Glm4ForCausalLM", dtype=torch.bfloat16, **TINY)


def _run_bench(model: Path, tmp_path: Path, options: str) -> dict:
    """``autoglm bench`` with ``options`` on ``model`` at this process's thread count."""
    out = tmp_path / "report.json"
    argv = [*options.split(), "--threads", str(torch.get_num_threads())]
    assert main([*argv, "--model-dir", str(model), "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_workload_is_seeded_within_ranges_and_free_of_special_tokens(tiny_model: Path) -> None:
    vocab = prompt_vocab(tiny_model)
    first = make_workload(16, seed=3, vocab=vocab, prompt_lens=(5, 9), output_lens=(2, 4))
    assert first == make_workload(16, seed=3, vocab=vocab, prompt_lens=(5, 9), output_lens=(2, 4))
    assert first != make_workload(16, seed=4, vocab=vocab, prompt_lens=(5, 9), output_lens=(2, 4))
    allowed = set(vocab)
    for request in first.requests:
        assert 5 <= len(request.prompt) <= 9 and 2 <= request.output_len <= 4
        assert set(request.prompt) <= allowed
    assert 0 not in allowed  # the tiny tokenizer's EOS


def test_bench_report_has_every_field_and_exact_token_counts(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    options = (
        "--only ours --only hf-static --runs 2 --requests 5 --seed 7 --prompt-lens 4 20 "
        "--output-lens 3 9 --static-batch-size 2 --max-num-seqs 4 --max-num-batched-tokens 32 "
        "--kv-cache-mib 4"
    )
    report = _run_bench(tiny_model, tmp_path, options)

    workload = make_workload(5, 7, prompt_vocab(tiny_model), (4, 20), (3, 9))
    assert report["workload"]["output_tokens"] == workload.output_tokens
    assert report["workload"]["prompt_tokens"] == workload.prompt_tokens
    assert report["model"]["parameters"] > 0
    assert set(report["contenders"]) == {"ours", "hf-static"}
    for contender in report["contenders"].values():
        assert len(contender["runs"]) == 2 and contender["median_tokens_per_s"] > 0
        for run in contender["runs"]:
            assert run["requests"] == 5
            assert run["output_tokens"] == workload.output_tokens
            assert run["tokens_per_s"] > 0
    assert set(report["ratios"]) == {"hf-static"} and report["ratios"]["hf-static"] > 0
    assert report["targets"] == {"hf-static": 2.0}
    overhead = report["overhead"]
    assert 0 <= overhead["share"] < 1
    assert len(overhead["runs"]) == 2
    for run in overhead["runs"]:
        assert run["steps"] > 0 and run["forward_time"] <= run["step_time"]
        # the same prompts again must not become cache hits the other contenders never get
        assert run["prefix_cache_hits"] == 0

    printed = capsys.readouterr().out
    assert "| contender |" in printed and "ours / this" in printed and "overhead" in printed


def test_sequential_subset_and_transformers_continuous_batching_count_exactly(
    tiny_model: Path, tmp_path: Path
) -> None:
    options = (
        "--only hf-seq --only hf-cb --runs 1 --requests 5 --prompt-lens 4 20 --output-lens 3 9 "
        "--hf-seq-requests 2 --max-num-seqs 4 --max-num-batched-tokens 32"
    )
    report = _run_bench(tiny_model, tmp_path, options)

    workload = make_workload(5, 0, prompt_vocab(tiny_model), (4, 20), (3, 9))
    (seq,) = report["contenders"]["hf-seq"]["runs"]
    assert seq["requests"] == 2 and seq["output_tokens"] == workload.head(2).output_tokens
    assert "first 2 requests" in report["contenders"]["hf-seq"]["label"]
    (cb,) = report["contenders"]["hf-cb"]["runs"]
    assert cb["requests"] == 5 and cb["output_tokens"] == workload.output_tokens
    assert "ratios" not in report and "overhead" not in report  # nothing to compare without ours
