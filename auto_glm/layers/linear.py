"""Linear layers that fuse projections a checkpoint stores separately."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PackedLinear", "SiluAndMul"]


class PackedLinear(nn.Linear):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, dim=-1)
        return nn.functional.silu(gate) * up
