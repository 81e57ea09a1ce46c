"""The README's commands are the ones CI actually runs."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_commands() -> None:
    """The README's test command (the default run), then its command for the slow tests."""
    *_, command, slow = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command.startswith("pip install torch==") and command.endswith("python -m pytest")
    assert slow == "python -m pytest -m slow"
    readme = (ROOT / "README.md").read_text()
    assert f"\n{command}\n" in readme and f"\n{slow}" in readme
