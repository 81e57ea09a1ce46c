"""Host values to the device without the host waiting for the device.

torch copies pageable host memory to a CUDA GPU with a blocking copy (``torch.tensor(values,
device=...)``, or any copy without ``non_blocking``): the host waits until every kernel queued
before it has run, so a step could not be queued while the one before still runs. From
page-locked (pinned) memory a ``non_blocking`` copy is queued like a kernel, and torch's
pinned-memory cache keeps the host buffer until the copy has run. On the CPU both are the
host tensor itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["pinned", "tensor_on", "to_device"]


def pinned(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` (a CPU tensor) in pinned memory where ``device`` is a CUDA GPU, else itself:
    what the host reads, and copies to the device, in the same step."""
    return host.pin_memory() if torch.device(device).type == "cuda" else host


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host`` (a CPU tensor) copied to ``device`` behind the work queued there, without
    waiting for it."""
    return pinned(host, device).to(device, non_blocking=True)


def tensor_on(values: Sequence, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)``, copied as :func:`to_device`
    does."""
    return to_device(torch.tensor(values, dtype=dtype), device)
