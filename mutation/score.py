"""Mutation score per module from mutmut's results, less the mutants explained as equivalent.

Usage: ``python mutation/score.py [MODULE ...]`` after ``mutation/run``. Exits 1 when a
survivor is neither killed nor listed in ``mutation/EQUIVALENT.md``, or when that list names
a mutant that no longer survives (mutant numbers shift when the source changes: re-check).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGES = {
    "admission": "auto_glm.serving",
    "quotas": "auto_glm.tenants",
    "traffic": "auto_glm.fleet",
    "canary": "auto_glm.fleet",
}
MODULES = [
    "scheduler",
    "kv_cache_manager",
    "block_pool",
    "sampler",
    "output_processor",
    "admission",
    "queue_policy",
    "quotas",
    "traffic",
    "canary",
]
NAME = re.compile(r"auto_glm\.[\w.ǁ]+__mutmut_\d+")


def main(modules: list[str]) -> int:
    modules = modules or MODULES
    listed = set(NAME.findall((HERE / "EQUIVALENT.md").read_text(encoding="utf-8")))
    text = subprocess.run(
        ["mutmut", "results", "--all", "true"],
        cwd=HERE.parent,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    status = dict(line.strip().rsplit(": ", 1) for line in text.splitlines() if "__mutmut_" in line)
    ok = True
    print(f"{'module':<18} {'killed':>6} {'total':>6} {'equiv':>6} {'other':>6}  score")
    for module in modules:
        prefix = f"{PACKAGES.get(module, 'auto_glm.engine')}.{module}."
        mine = {n: s for n, s in status.items() if n.startswith(prefix)}
        counts = Counter(mine.values())
        killed = counts["killed"] + counts["timeout"]
        survivors = {n for n, s in mine.items() if s == "survived"}
        equivalent = survivors & listed
        unexplained = sorted(survivors - listed)
        stale = sorted(n for n in listed if n.startswith(prefix) and n not in survivors)
        # "other": not checked, no tests, suspicious, ...: neither killed nor a known survivor
        other = len(mine) - killed - len(survivors)
        scored = len(mine) - len(equivalent)
        score = killed / scored if scored else 0.0
        print(
            f"{module:<18} {killed:>6} {len(mine):>6} {len(equivalent):>6} {other:>6}  {score:.1%}"
        )
        for name in unexplained:
            print(f"  survived, not in EQUIVALENT.md: {name}")
        for name in stale:
            print(f"  in EQUIVALENT.md but {mine.get(name, 'not a mutant')}: {name}")
        ok = ok and not unexplained and not stale and other == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
