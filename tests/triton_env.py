"""Whether the Triton kernels (auto_glm.kernels.triton) can run on CPU tensors in this test
process: only in triton's interpreter, which tests/conftest.py switches on before any test
module imports triton."""

from __future__ import annotations

import os

import pytest

__all__ = ["require_triton_interpreter"]


def require_triton_interpreter() -> None:
    """Skip, saying why, where the Triton launchers cannot run on CPU tensors here."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    try:
        from auto_glm.kernels.triton import checks
    except ImportError as exc:
        pytest.skip(f"the Triton launchers are not importable here: {exc}")
    if not checks.INTERPRETED:
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1 was set (a pytest plugin?), so "
            "its kernels were not built for the interpreter"
        )
