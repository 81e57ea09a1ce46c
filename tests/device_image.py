"""Python as the GPU machine's image runs it: of the distributions installed here, only those
that image holds (benchmarks/gpu_image_packages.txt) and the wheels a GPU session carries
there (benchmarks/gpu_wheels.txt) can be imported or are seen by ``importlib.metadata``
(pytest's plugins among them); every other one is hidden, as if it were not installed.

    python tests/device_image.py -m pytest ...     # as python -m pytest ...
    python tests/device_image.py SCRIPT ARGS...    # as python SCRIPT ARGS...

tests/test_gpu_check.py gives it to benchmarks/gpu_check.sh as its PYTHON, so that what a
lent GPU session would fail to import fails here instead.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
import os
import re
import runpy
import sys
from collections.abc import Iterator
from importlib.machinery import ModuleSpec
from importlib.metadata import Distribution
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement

__all__ = ["allowed_distributions", "hidden_modules", "main"]

REPO = Path(__file__).resolve().parent.parent
IMAGE = REPO / "benchmarks" / "gpu_image_packages.txt"
CARRIED = REPO / "benchmarks" / "gpu_wheels.txt"
OURS = "open-autoglm"  # the repository itself goes on the image's PYTHONPATH


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _listed(path: Path) -> set[str]:
    """The distributions a list names, by canonical name."""
    names = set()
    for line in path.read_text().splitlines():
        requirement = line.split("#", 1)[0].strip()
        if requirement:
            names.add(_canonical(Requirement(requirement).name))
    return names


def allowed_distributions() -> frozenset[str]:
    """The distributions the image holds, with what those need (as installed here, where
    their versions may differ from the image's, which brings its own dependencies), and the
    wheels a session carries there, whose own needs are not added: the image or the list
    must hold them. By canonical name."""
    image, carried = _listed(IMAGE), _listed(CARRIED)
    allowed, todo = set(image), list(image)
    while todo:
        try:
            requires = importlib.metadata.requires(todo.pop()) or []
        except importlib.metadata.PackageNotFoundError:  # not installed here
            continue
        for requirement in map(Requirement, requires):
            marker = requirement.marker
            name = _canonical(requirement.name)
            if (marker is None or marker.evaluate({"extra": ""})) and name not in allowed:
                allowed.add(name)
                todo.append(name)
    return frozenset(allowed | carried | {OURS})


def hidden_modules(allowed: frozenset[str]) -> frozenset[str]:
    """Top-level modules that only distributions outside ``allowed`` provide here."""
    return frozenset(
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if not any(_canonical(dist) in allowed for dist in dists)
    )


class _ImageOnly(importlib.machinery.PathFinder):
    """The path finder, blind to the hidden modules and distributions."""

    allowed: frozenset[str] = frozenset()
    hidden: frozenset[str] = frozenset()

    @classmethod
    def find_spec(cls, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        if fullname.partition(".")[0] in cls.hidden:
            return None
        return super().find_spec(fullname, path, target)

    @classmethod
    def find_distributions(cls, *args: Any, **kwargs: Any) -> Iterator[Distribution]:
        for dist in super().find_distributions(*args, **kwargs):
            if _canonical(dist.metadata["Name"] or "") in cls.allowed:
                yield dist


def main(argv: list[str]) -> None:
    if not argv or (argv[0] == "-m" and len(argv) < 2):
        sys.exit("usage: device_image.py -m MODULE [ARGS...] | SCRIPT [ARGS...]")
    _ImageOnly.allowed = allowed_distributions()
    _ImageOnly.hidden = hidden_modules(_ImageOnly.allowed)
    loaded = [name for name in sys.modules if name.partition(".")[0] in _ImageOnly.hidden]
    for name in loaded:  # imported while Python started (.pth files): import them afresh
        del sys.modules[name]
    sys.meta_path[sys.meta_path.index(importlib.machinery.PathFinder)] = _ImageOnly
    if argv[0] == "-m":
        sys.argv = argv[1:]
        sys.path[0] = os.getcwd()  # where `python -m` looks first
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path[0] = str(Path(argv[0]).resolve().parent)  # where `python SCRIPT` looks first
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
