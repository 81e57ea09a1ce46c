"""The README's commands are the ones CI actually runs."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command() -> None:
    script = (ROOT / ".ci" / "run").read_text().splitlines()
    command = script[-1]
    assert command.startswith("pip install torch==") and command.endswith("python -m pytest")
    assert f"\n{command}\n" in (ROOT / "README.md").read_text()
