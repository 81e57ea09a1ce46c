"""Linear layers that fuse projections a checkpoint stores separately."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "PackedLinear", "SiluAndMul"]

log = logging.getLogger("auto_glm.layers")


class Linear(nn.Linear):
    """``nn.Linear`` that can hand oneDNN a pre-packed copy of its weight on the CPU.

    oneDNN otherwise re-lays out the weight on every call; packing once at start-up makes
    float32 matmuls about a third faster on the CPU (measured in BENCHMARKS.md).
    """

    _packed: torch.Tensor | None = None

    def prepack(self, batch_hint: int, release_weight: bool = True) -> bool:
        """Pack a float32 CPU weight for oneDNN; False (and plain matmuls) if unavailable.

        With ``release_weight`` the plain weight is dropped once packed (the packed copy is
        as large), so weights are held once, not twice; ``weight`` is then empty. Pass
        False for a weight that another module shares (tied embeddings).
        """
        if self._packed is not None:
            return True
        w = self.weight
        if (
            w.device.type != "cpu"
            or w.dtype != torch.float32
            or not torch.backends.mkldnn.is_available()
        ):
            return False
        try:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), batch_hint)
        except (RuntimeError, AttributeError) as exc:  # a torch build without these kernels
            log.warning("weight pre-packing unavailable (%s); using plain matmuls", exc)
            return False
        if release_weight:
            self.weight = nn.Parameter(w.new_empty(0), requires_grad=False)
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")


class PackedLinear(Linear):
    """One matmul for several stacked projections (q/k/v, gate/up).

    ``shards`` maps each part's checkpoint name to its output size, in stacking order; the
    loader copies each part into its rows with :meth:`load_shard`.
    """

    def __init__(self, in_features: int, shards: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(shards.values()), bias=bias)
        self.shard_rows: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in shards.items():
            self.shard_rows[name] = (start, size)
            start += size

    def load_shard(self, param: nn.Parameter, shard: str, tensor: torch.Tensor) -> None:
        start, size = self.shard_rows[shard]
        if tensor.shape[0] != size or tensor.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"checkpoint part {shard!r} has shape {tuple(tensor.shape)}, expected "
                f"({size}, {', '.join(map(str, param.shape[1:]))}); config and weights disagree"
            )
        param.data[start : start + size].copy_(tensor)


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` over a packed ``[gate | up]`` activation."""

    def __init__(self) -> None:
        super().__init__()
        self._kernels: SimpleNamespace | None = None

    def enable_kernels(self, kernels: SimpleNamespace) -> None:
        """One fused pass instead of silu, then a multiply (the native CPU kernels or a GPU
        platform's)."""
        self._kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernels is not None and x.dim() == 2 and x.is_contiguous():
            out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype, device=x.device)
            self._kernels.silu_and_mul(x, out)
            return out
        gate, up = x.chunk(2, dim=-1)
        return nn.functional.silu(gate) * up
