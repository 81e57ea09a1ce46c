from __future__ import annotations

import os
import shutil

import pytest
import torch

from auto_glm.kernels import cpu_kernels

# The Triton kernels (auto_glm.kernels.triton) run on CPU tensors only in triton's
# interpreter, which triton picks when the kernels are defined: set it before a test module
# imports them. On a CUDA machine they are compiled for the GPU as the engine runs them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def kernels():
    """The built native kernels; skipped only where no C++ compiler exists at all."""
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("no C++ compiler: the engine uses its torch path (tested elsewhere)")
    built = cpu_kernels()
    assert built is not None, "a compiler is installed but the kernels did not build"
    return built
