"""One build of the CPU kernels, run by ``build.py`` as a child process it can time out.

    python -m auto_glm.kernels.build_job '{"name": ..., "sources": [...], "cflags": [...],
        "ldflags": [...], "build_dir": ..., "final_dir": ...}'

Compiles into ``build_dir`` (private to this build, so torch's lock file there is never
shared), loads the result once to check it, then renames ``build_dir`` to ``final_dir``: a
finished build appears there whole, or not at all. Exits 1 with the reason as the last line
of stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import sys
from pathlib import Path

__all__ = ["install", "main"]


def install(build_dir: Path, final_dir: Path, library: str) -> None:
    """Rename the finished ``build_dir`` to ``final_dir``; where another process's build
    got there first, keep that one and drop ours."""
    for _ in range(3):
        try:
            os.rename(build_dir, final_dir)  # atomic; replaces at most an empty directory
            return
        except OSError:
            if (final_dir / library).exists():
                shutil.rmtree(build_dir, ignore_errors=True)
                return
        # a leftover with no library (an unfinished torch build and its lock): set it aside
        aside = final_dir.with_name(f"{final_dir.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(final_dir, aside)
        shutil.rmtree(aside, ignore_errors=True)
    raise RuntimeError(f"could not move the build into {final_dir}; check its permissions")


def main(argv: list[str] | None = None) -> int:
    job = json.loads((sys.argv[1:] if argv is None else argv)[0])
    from torch.utils import cpp_extension

    try:
        cpp_extension.load(
            job["name"],
            sources=job["sources"],
            extra_cflags=job["cflags"],
            extra_ldflags=job["ldflags"],
            build_directory=job["build_dir"],
            is_python_module=False,
            verbose=False,
        )
        install(Path(job["build_dir"]), Path(job["final_dir"]), f"{job['name']}.so")
    except Exception as exc:  # a missing compiler or ninja surfaces as several error types
        text = str(exc).strip()
        print(text.splitlines()[-1] if text else type(exc).__name__, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
