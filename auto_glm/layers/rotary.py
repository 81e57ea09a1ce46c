"""Rotary position embedding: full or partial, half-split or interleaved, with scaling."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["RopeSpec", "RotaryEmbedding", "SUPPORTED_ROPE_TYPES"]

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    rotary_dim: int  # leading dims of each head that rotate; the rest pass through
    max_position: int  # the checkpoint's max_position_embeddings
    interleaved: bool = False  # GLM pairs dims (0,1),(2,3)…; Llama/Qwen pair (i, i + d/2)
    rope_type: str = "default"
    params: dict = field(default_factory=dict)  # the scaling fields of the config


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _yarn(spec: RopeSpec, dim: int) -> tuple[torch.Tensor, float]:
    p = spec.params
    factor = p["factor"]
    original = p.get("original_max_position_embeddings") or spec.max_position
    attention_factor = p.get("attention_factor")
    if attention_factor is None:

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(spec.theta))

    low = correction_dim(p.get("beta_fast") or 32)
    high = correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = spec.theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolate = 1 - ramp
    inv_freq = (1 / (factor * pos_freqs)) * ramp + (1 / pos_freqs) * extrapolate
    return inv_freq, float(attention_factor)


def _llama3(spec: RopeSpec, dim: int) -> torch.Tensor:
    p = spec.params
    inv_freq = _base_inv_freq(spec.theta, dim)
    factor, low_ff, high_ff = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low_ff, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high_ff) & (wavelen <= old_len / low_ff)
    return torch.where(medium, smoothed, scaled)


def inv_freq_for(spec: RopeSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin scale for ``spec`` (``seq_len`` for dynamic NTK)."""
    dim = spec.rotary_dim
    if spec.rope_type == "linear":
        return _base_inv_freq(spec.theta, dim) / spec.params["factor"], 1.0
    if spec.rope_type == "dynamic":
        seq_len = max(seq_len or spec.max_position, spec.max_position)
        factor = spec.params["factor"]
        base = spec.theta * ((factor * seq_len / spec.max_position) - (factor - 1)) ** (
            dim / (dim - 2)
        )
        return _base_inv_freq(base, dim), 1.0
    if spec.rope_type == "yarn":
        return _yarn(spec, dim)
    if spec.rope_type == "llama3":
        return _llama3(spec, dim), 1.0
    return _base_inv_freq(spec.theta, dim), 1.0


class RotaryEmbedding(nn.Module):
    """Rotates q and k in place by the cos/sin of their positions (a cached table)."""

    def __init__(self, spec: RopeSpec) -> None:
        super().__init__()
        self.spec = spec
        inv_freq, self.scale = inv_freq_for(spec)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("table", self._table(inv_freq, spec.max_position), persistent=False)

    def _table(self, inv_freq: torch.Tensor, length: int) -> torch.Tensor:
        freqs = torch.outer(
            torch.arange(length, dtype=torch.float32, device=inv_freq.device), inv_freq
        )
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1) * self.scale  # [length, rotary_dim]

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for ``positions`` [T], each [T, 1, rotary_dim / 2]; computed once per
        forward pass and shared by every layer."""
        needed = int(positions.max()) + 1
        if self.spec.rope_type == "dynamic" and needed > self.spec.max_position:
            # dynamic NTK stretches the base once the sequence outgrows the trained length
            inv_freq, _ = inv_freq_for(self.spec, needed)
            table = self._table(inv_freq.to(positions.device), needed)
        else:
            if needed > self.table.shape[0]:
                self.table = self._table(self.inv_freq, max(needed, 2 * self.table.shape[0]))
            table = self.table
        cos, sin = table.index_select(0, positions).to(dtype).unsqueeze(1).chunk(2, dim=-1)
        return cos, sin

    def forward(
        self, rope: tuple[torch.Tensor, torch.Tensor], q: torch.Tensor, k: torch.Tensor
    ) -> None:
        """Rotate q: [T, H, head_dim] and k: [T, H_kv, head_dim] in place."""
        cos, sin = rope
        for x in (q, k):
            rot = x[..., : self.spec.rotary_dim]
            if self.spec.interleaved:
                x1, x2 = rot[..., 0::2], rot[..., 1::2]
                out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
            else:
                x1, x2 = rot.chunk(2, dim=-1)
                out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
            rot.copy_(out)
