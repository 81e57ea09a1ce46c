"""What this installation is: the package version and the versions it runs on.

Read from installed package metadata rather than by importing torch or transformers, so
``autoglm --version`` answers at once. ``GET /version`` serves the same facts.
"""

from __future__ import annotations

import platform
from importlib import metadata

import auto_glm

__all__ = ["build_info", "version_line"]

# the libraries that decide how a model runs and how the API behaves
_DEPENDENCIES = ("torch", "transformers", "fastapi", "pydantic", "uvicorn")


def _installed(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def build_info() -> dict[str, str | None]:
    """``{"version": ..., "python": ..., "torch": ..., ...}``; ``None`` for a missing library."""
    return {
        "version": auto_glm.__version__,
        "python": platform.python_version(),
        **{name: _installed(name) for name in _DEPENDENCIES},
    }


def version_line() -> str:
    """``autoglm 0.1.0 (python 3.11.2, torch 2.13.0, ...)``, what ``--version`` prints."""
    info = build_info()
    parts = ", ".join(f"{name} {value}" for name, value in info.items() if name != "version")
    return f"autoglm {info['version']} ({parts})"
