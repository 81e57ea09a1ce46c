"""Launching a kernel with as many software-pipeline stages as the GPU's shared memory holds.

The attention kernels load K/V through the block table, and triton's pipeliner gives that
table load a stage of its own: with 3 or 4 stages every iteration waits for all of its copies
(``cp.async.wait_group 0``, in sm_90 builds), so no K/V tile is in flight while the one
before is computed on; 5 or 6 stages keep one in flight, 7 or 8 two. Each tile in flight
costs a K and a V buffer of shared memory, which smaller GPUs lack (a bfloat16 prefill of
head_dim 128 needs 115 KB at 5 stages; an RTX 4090 has 99 KB). :func:`launch_staged`
launches with the stages asked for and, where triton finds the build too large for the
device, with fewer (3, then 1), remembering that for the kernel, its options and the device.
The stages change where copies wait, not the arithmetic: outputs are the same at any count.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

from triton.runtime.errors import OutOfResources

__all__ = ["FALLBACK_STAGES", "launch_staged"]

FALLBACK_STAGES = (3, 1)  # tried in turn, each only when fewer than the stages asked for
_fits: dict[Hashable, int] = {}  # (kernel, device, stages asked, *options) -> stages that fit


def launch_staged(
    kernel: Any, grid: tuple[int, ...], args: Sequence[Any], options: dict[str, Any], stages: int
) -> None:
    """``kernel[grid](*args, **options, num_stages=stages)``, or with the first of
    :data:`FALLBACK_STAGES` whose shared memory the device holds; ``args[0]`` is a tensor on
    the device. Raises triton's ``OutOfResources`` when even one stage does not fit."""
    # a call site passes its options in one order, so they need no sorting
    key = (kernel, args[0].device, stages, *options.items())
    known = _fits.get(key)
    if known is not None:
        kernel[grid](*args, **options, num_stages=known)
        return
    tries = [stages, *(s for s in FALLBACK_STAGES if s < stages)]
    for attempt in tries:
        try:
            kernel[grid](*args, **options, num_stages=attempt)
        except OutOfResources:
            if attempt == tries[-1]:
                raise
            continue
        _fits[key] = attempt
        return
