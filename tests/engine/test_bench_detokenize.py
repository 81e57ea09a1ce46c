"""benchmarks/bench_detokenize.py times our detokenizer against tokenizers' DecodeStream on
the same streams and checks both against a full decode."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from auto_glm.checkpoints.corpus import corpus_lines
from auto_glm.checkpoints.tokenizer import build_tokenizer

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_detokenize.py"


def test_bench_detokenize_reports_both_contenders_on_both_streams(tmp_path: Path) -> None:
    out = tmp_path / "detok.json"
    argv = [str(SCRIPT), "--requests", "8", "--tokens", "40", "--repeat", "1", "--out", str(out)]
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("machine: ") and "; flags: " in done.stdout.splitlines()[0]
    report = json.loads(out.read_text())
    rows = {(r["streams"], r["contender"]): r for r in report["results"]}
    assert set(rows) == {
        (s, c) for s in ("nano", "text") for c in ("ours", "tokenizers DecodeStream")
    }
    for (streams, contender), row in rows.items():
        assert row["seconds"] > 0 and row["us_per_token"] > 0
        peer = rows[(streams, "tokenizers DecodeStream")]
        assert row["ours_over_peer"] == rows[(streams, "ours")]["seconds"] / peer["seconds"]
        assert f"| {streams} | {contender} |" in done.stdout
    # ours gives, in deltas, exactly the text of a full decode
    assert rows[("nano", "ours")]["texts_unlike_full_decode"] == 0
    assert rows[("text", "ours")]["texts_unlike_full_decode"] == 0


def test_text_streams_longer_than_the_corpus_go_round_it_again() -> None:
    spec = importlib.util.spec_from_file_location("bench_detokenize", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(tmp, vocab_size=2048)
    corpus = tokenizer.encode("\n".join(corpus_lines()), add_special_tokens=False)
    streams = bench.text_streams(tokenizer, len(corpus) + 100, 3)
    assert [len(s) for s in streams] == [len(corpus) + 100] * 3
    assert streams[0][: len(corpus)] == corpus and streams[0][len(corpus) :] == corpus[:100]
    assert len({tuple(s[:50]) for s in streams}) == 3  # each from its own place
