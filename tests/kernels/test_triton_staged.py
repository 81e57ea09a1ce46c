"""launch_staged (auto_glm.kernels.triton.staged): a kernel launched with the pipeline stages
asked for, or with fewer where the GPU's shared memory cannot hold them.

Triton raises OutOfResources when a build needs more shared memory than the device has; no
GPU here, so a stand-in kernel plays a device that holds ``limit`` stages, raising triton's
own exception above it and recording every launch it takes.
"""

from __future__ import annotations

import pytest
import torch
from triton.runtime.errors import OutOfResources

from auto_glm.kernels.triton.staged import launch_staged


class SmallGpuKernel:
    """``kernel[grid](*args, **options, num_stages=n)`` that fits ``limit`` stages at most."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.tried: list[int] = []  # num_stages of every launch, in order
        self.ran: list[tuple] = []  # (grid, options, num_stages) of the launches that ran

    def __getitem__(self, grid):
        def launch(*args, num_stages: int, **options) -> None:
            self.tried.append(num_stages)
            if num_stages > self.limit:
                raise OutOfResources(num_stages * 40_000, self.limit * 40_000, "shared memory")
            self.ran.append((grid, options, num_stages))

        return launch


ARGS = (torch.zeros(1),)


def test_stages_that_fit_are_launched_as_asked() -> None:
    kernel = SmallGpuKernel(limit=9)
    launch_staged(kernel, (4, 2), ARGS, {"BLOCK_N": 32}, stages=5)
    assert kernel.ran == [((4, 2), {"BLOCK_N": 32}, 5)]


@pytest.mark.parametrize(("limit", "tries"), [(4, [5, 3]), (2, [5, 3, 1])])
def test_too_many_stages_fall_back_to_3_then_1_and_the_fit_is_remembered(limit, tries) -> None:
    kernel = SmallGpuKernel(limit)
    launch_staged(kernel, (1,), ARGS, {"BLOCK_N": 64}, stages=5)
    launch_staged(kernel, (2,), ARGS, {"BLOCK_N": 64}, stages=5)
    taken = tries[-1]
    assert kernel.tried == [*tries, taken]  # the second launch goes straight to the fit
    assert [stages for _, _, stages in kernel.ran] == [taken, taken]
    # other options are another build: tried again from the stages asked
    launch_staged(kernel, (1,), ARGS, {"BLOCK_N": 16}, stages=5)
    assert kernel.tried[len(tries) + 1 :] == tries


def test_a_build_that_never_fits_raises_triton_s_error() -> None:
    kernel = SmallGpuKernel(limit=0)
    with pytest.raises(OutOfResources):
        launch_staged(kernel, (1,), ARGS, {}, stages=5)
    assert kernel.tried == [5, 3, 1] and kernel.ran == []


def test_fewer_stages_than_the_fallbacks_are_not_raised() -> None:
    kernel = SmallGpuKernel(limit=1)
    launch_staged(kernel, (1,), ARGS, {"case": "two"}, stages=2)
    assert kernel.tried == [2, 1]
