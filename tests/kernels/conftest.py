from __future__ import annotations

import shutil

import pytest

from auto_glm.kernels import cpu_kernels


@pytest.fixture(scope="session")
def kernels():
    """The built native kernels; skipped only where no C++ compiler exists at all."""
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler: the engine uses its torch path (tested elsewhere)")
    built = cpu_kernels()
    assert built is not None, "a compiler is installed but the kernels did not build"
    return built
