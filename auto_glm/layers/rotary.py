"""Rotary position embedding: full or partial, half-split or interleaved, with scaling.

Also the multimodal variants: M-RoPE (:class:`MRotaryEmbedding`, three position rows
t/h/w, each driving its own section of the frequencies; :func:`mrope_positions` lays the
rows out for a prompt with images) and the 2-D axial rotary of vision towers
(:class:`VisionRotaryEmbedding`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from auto_glm.layers.norm import RMSNorm

__all__ = [
    "MRotaryEmbedding",
    "RopeSpec",
    "RotaryEmbedding",
    "SUPPORTED_ROPE_TYPES",
    "VisionRotaryEmbedding",
    "mrope_positions",
]

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
        self.reserved = 0  # positions below this are in the table: cos_sin reads none back
        self._rotate: Callable[..., None] | None = None  # see enable_kernels

    def enable_kernels(self, rotate: Callable[..., None]) -> None:
        """Rotate q and k in one fused launch: ``rotate(q, k, cos, sin, interleaved,
        norms)``, which first RMS-normalises each head given ``norms`` (q's weight, k's
        weight, eps) (a GPU platform's, see
        :meth:`~auto_glm.platforms.base.Platform.fused_kernels`)."""
        self._rotate = rotate

    def reserve(self, length: int) -> bool:
        """Hold positions ``0..length-1`` in the table, so that :meth:`cos_sin` no longer reads
        the largest position back from the device (a host sync, which a CUDA graph cannot
        contain); False, changing nothing, where the table depends on the positions (dynamic
        NTK past the trained length). The caller feeds no position past ``length - 1``."""
        if self.spec.rope_type == "dynamic" and length > self.spec.max_position:
            return False
        if length > self.table.shape[0]:
            self.table = self._table(self.inv_freq, length)
        self.reserved = length
        return True

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
        needed = self.reserved or int(positions.max()) + 1
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
        self,
        rope: tuple[torch.Tensor, torch.Tensor],
        q: torch.Tensor,
        k: torch.Tensor,
        norms: tuple[RMSNorm, RMSNorm] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, H, head_dim] and k: [T, H_kv, head_dim] rotated, each head first
        normalised by ``norms`` (Qwen3's q_norm and k_norm) if given: q and k themselves,
        changed in place, or the norms' outputs, rotated in place."""
        cos, sin = rope
        if self._rotate is not None and q.dtype == cos.dtype:
            # q_norm and k_norm share one eps: the config's rms_norm_eps
            weights = None if norms is None else (norms[0].weight, norms[1].weight, norms[0].eps)
            self._rotate(q, k, cos, sin, self.spec.interleaved, weights)
            return q, k
        if norms is not None:
            q, k = norms[0](q), norms[1](k)
        for x in (q, k):
            rot = x[..., : self.spec.rotary_dim]
            if self.spec.interleaved:
                x1, x2 = rot[..., 0::2], rot[..., 1::2]
                out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
            else:
                x1, x2 = rot.chunk(2, dim=-1)
                out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
            rot.copy_(out)
        return q, k


class MRotaryEmbedding(RotaryEmbedding):
    """M-RoPE: positions are ``[3, T]`` (temporal, height, width rows); frequency ``j`` of
    the ``rotary_dim / 2`` takes its angle from the row of the section it falls in, with
    ``sections`` (the config's ``mrope_section``) sized in frequencies and cycling t, h, w.
    Text tokens carry the same position in all three rows, which makes this plain RoPE: such
    positions may come as one row ``[T]`` (a decode step's)."""

    def __init__(self, spec: RopeSpec, sections: Sequence[int]) -> None:
        if sum(sections) != spec.rotary_dim // 2:
            raise ValueError(
                f"mrope_section {list(sections)} sums to {sum(sections)} but the rotary "
                f"dimension has {spec.rotary_dim // 2} frequencies; fix rope_parameters in "
                "config.json"
            )
        super().__init__(spec)
        rows = [i % 3 for i, size in enumerate(sections) for _ in range(size)]
        self.register_buffer("section_rows", torch.tensor(rows), persistent=False)  # [D/2]

    def cos_sin(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for ``positions`` [3, T], or [T] where the three rows are equal, each
        [T, 1, rotary_dim / 2] (contiguous, as the fused rotary kernel takes them)."""
        if positions.dim() == 1:
            return super().cos_sin(positions, dtype)
        needed = self.reserved or int(positions.max()) + 1
        if needed > self.table.shape[0]:
            self.table = self._table(self.inv_freq, max(needed, 2 * self.table.shape[0]))
        half = self.spec.rotary_dim // 2
        cols = torch.arange(half, device=positions.device)
        rows = positions[self.section_rows]  # [D/2, T] position of each frequency
        table = self.table.view(-1, 2, half)  # [length, cos|sin, D/2]
        picked = table[rows, :, cols[:, None]]  # [D/2, T, 2]
        cos, sin = picked.permute(2, 1, 0).to(dtype).contiguous().unsqueeze(2)  # [T, 1, D/2]
        return cos, sin


def mrope_positions(
    num_tokens: int, images: Sequence[tuple[int, tuple[int, int, int]]]
) -> tuple[torch.Tensor, int]:
    """M-RoPE position rows of a prompt and its decode offset.

    ``images`` holds ``(offset, (t, h, w))`` per image, in prompt order: the index of its
    first placeholder token and its grid after spatial merging (``t * h * w`` tokens). Text
    runs count on from the last position in all three rows; an image starting at position
    ``p`` takes ``p + t_index``, ``p + h_index``, ``p + w_index`` (row-major over the grid),
    and the text after it continues at ``p + max(h, w)``. Returns positions ``[3,
    num_tokens]`` and ``delta``: token ``i >= num_tokens`` sits at ``i + delta`` in every row.
    No position exceeds its token's index (an image of ``t * h * w`` tokens moves the position
    on by ``max(h, w)``), so ``delta <= 0``, and a sequence of ``n`` tokens needs the rotary
    table of plain RoPE over ``n`` positions.
    """
    rows = torch.empty(3, num_tokens, dtype=torch.long)
    index = position = 0
    for offset, (t, h, w) in images:
        rows[:, index:offset] = torch.arange(position, position + offset - index)
        position += offset - index
        grid = torch.stack(
            torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        )  # [3, t, h, w]
        rows[:, offset : offset + t * h * w] = grid.reshape(3, -1) + position
        position += max(h, w)
        index = offset + t * h * w
    rows[:, index:] = torch.arange(position, position + num_tokens - index)
    delta = int(rows.max()) + 1 - num_tokens if num_tokens else 0
    return rows, delta


class VisionRotaryEmbedding(nn.Module):
    """2-D axial rotary of a vision tower: the first half of each head's frequencies turn
    with the patch row, the second half with its column; half-split rotation over the whole
    head, computed in float32."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.register_buffer("inv_freq", _base_inv_freq(theta, head_dim // 2), persistent=False)

    def cos_sin(self, hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hw`` [N, 2] (row, column) of each patch -> cos, sin, each [N, 1, head_dim / 2]."""
        freqs = (hw[:, :, None].float() * self.inv_freq).flatten(1)  # [N, head_dim / 2]
        return freqs.cos().unsqueeze(1), freqs.sin().unsqueeze(1)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Rotated copy of ``x`` [N, H, head_dim]."""
        cos, sin = rope
        x1, x2 = x.float().chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        return out.to(x.dtype)
