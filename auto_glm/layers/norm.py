"""RMSNorm with the residual add fused into the same call."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """``y = w * x / rms(x)``, computed in float32 like the reference checkpoints.

    Called with a ``residual`` it first adds it (in the model dtype, as the reference does)
    and returns ``(normed, new_residual)``, saving a separate pass over the activations.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self._kernels: SimpleNamespace | None = None

    def enable_kernels(self, kernels: SimpleNamespace) -> None:
        """One fused pass (add, normalise, scale) instead of several torch ops: the native
        CPU kernels or a GPU platform's (``Platform.fused_kernels``)."""
        self._kernels = kernels

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self._kernels is not None and x.dim() == 2 and x.dtype == self.weight.dtype:
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            if residual is None:
                self._kernels.rms_norm(x, self.weight, self.eps, out)
                return out
            # the sum overwrites ``residual`` in place: it is this forward's own buffer
            residual = residual.contiguous()
            self._kernels.add_rms_norm(x, residual, self.weight, self.eps, out)
            return out, residual
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
