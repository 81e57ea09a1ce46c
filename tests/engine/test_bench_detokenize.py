"""benchmarks/bench_detokenize.py times our detokenizer against tokenizers' DecodeStream on
the same streams and checks both against a full decode."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
