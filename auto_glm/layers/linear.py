"""Linear layers that fuse projections a checkpoint stores separately."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Linear", "PackedLinear", "SiluAndMul", "avx2_linear"]

log = logging.getLogger("auto_glm.layers")


class Linear(nn.Linear):
    """``nn.Linear`` that can hold its CPU weight pre-packed, once, for a faster matmul.

    Two packings: for oneDNN, a float32 weight that oneDNN would otherwise re-lay out on every
    call (about a third faster, measured in BENCHMARKS.md); or, for the native AVX2 kernel, a
    weight whose values are bfloat16 or float16 (such a checkpoint computing in float32)
    kept in that dtype, half the bytes, widened exactly as it is used.
    """

    _packed: torch.Tensor | None = None
    _packing: str | None = None  # "onednn" or "avx2", once packed
    _kernels: SimpleNamespace | None = None  # see enable_cpu_kernels

    def enable_cpu_kernels(self, kernels: SimpleNamespace) -> None:
        """Offer the native CPU kernels to :meth:`prepack` (their narrow-weight matmul)."""
        self._kernels = kernels

    def prepack(
        self,
        batch_hint: int,
        release_weight: bool = True,
        values_dtype: torch.dtype | None = None,
    ) -> bool:
        """Pack a float32 CPU weight; False (and plain matmuls) if no packing applies.

        ``values_dtype``: bfloat16 or float16 when every value of the weight is one (the
        loader rounded it to the checkpoint's dtype); it is then kept in that dtype for the
        native AVX2 kernel where :meth:`enable_cpu_kernels` gave kernels that have it, else
        packed for oneDNN.

        With ``release_weight`` the plain weight is dropped once packed, so weights are held
        once, not twice; ``weight`` is then empty. Pass False for a weight that another
        module shares (tied embeddings).
        """
        if self._packed is not None:
            return True
        w = self.weight
        if w.device.type != "cpu" or w.dtype != torch.float32:
            return False
        kernels = self._kernels
        narrow = values_dtype in (torch.bfloat16, torch.float16)
        if narrow and kernels is not None and kernels.avx2_linear_available():
            packed, packing = kernels.pack_linear_avx2(w.detach(), values_dtype), "avx2"
        elif not torch.backends.mkldnn.is_available():
            return False
        else:
            try:
                packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), batch_hint)
            except (RuntimeError, AttributeError) as exc:  # a torch build without these kernels
                log.warning("weight pre-packing unavailable (%s); using plain matmuls", exc)
                return False
            packing = "onednn"
        self._packed, self._packing = packed, packing
        if release_weight:
            self.release_weight()
        return True

    @property
    def is_packed(self) -> bool:
        return self._packed is not None

    def release_weight(self) -> None:
        """Drop the plain weight of a packed layer (``weight`` is then empty)."""
        assert self.is_packed, "only a packed layer can drop its plain weight"
        self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packing == "avx2":
            return avx2_linear(self._kernels, x, self._packed, None, self.bias, self.out_features)
        if self._packing == "onednn":
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def avx2_linear(
    kernels: SimpleNamespace,
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
) -> torch.Tensor:
    """x [..., in] float32 @ a weight packed by the kernels' ``pack_linear_avx2`` (times its
    channel ``scales``, plus ``bias``) -> [..., out]."""
    lead = x.shape[:-1]
    rows = x.reshape(-1, x.shape[-1])  # [T, in]
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    y = kernels.linear_avx2(rows, packed, scales, bias, out_features)  # [T, out]
    return y.reshape(*lead, out_features)


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
