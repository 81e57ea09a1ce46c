"""The GLM-4.1V vision tower (``model.visual`` of ``Glm4vForConditionalGeneration``).

Patches (already cut and flattened by the image processor) go through a patch projection,
an RMSNorm, a bicubic-interpolated learned position embedding, ViT blocks with 2-D axial
rotary and per-image bidirectional attention, a final RMSNorm, a ``merge x merge``
downsample and a gated MLP merger into the text model's hidden size. Module and parameter
names mirror the checkpoint; only gate/up projections are fused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from auto_glm.layers.linear import Linear, PackedLinear, SiluAndMul
from auto_glm.layers.norm import RMSNorm
from auto_glm.layers.rotary import VisionRotaryEmbedding

__all__ = ["Glm4vVisionModel", "VisionSpec", "read_vision_spec"]


@dataclass(frozen=True)
class VisionSpec:
    """Everything about the vision tower that changes the math, read from ``vision_config``."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int  # of the merger's gated MLP
    out_hidden_size: int  # the text model's hidden size; also the blocks' MLP width
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    num_grid_positions: int  # side of the learned position-embedding grid
    rms_norm_eps: float
    qkv_bias: bool
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def read_vision_spec(config: Any) -> VisionSpec:
    """Read ``vision_config``; raise ValueError naming any field whose math we lack."""

    def refuse(feature: str, fix: str) -> None:
        raise ValueError(f"Glm4v vision_config: {feature} is not supported; {fix}")

    for name in ("patch_size", "image_size", "temporal_patch_size"):
        if not isinstance(getattr(config, name), int):
            refuse(f"a non-integer {name}={getattr(config, name)!r}", "give a single int")
    if config.hidden_act != "silu":
        refuse(f"hidden_act={config.hidden_act!r}", "only 'silu' is implemented")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if rope.get("rope_type", "axial") != "axial":
        refuse(f"rope_type={rope['rope_type']!r}", "only the 'axial' 2-D rotary is implemented")
    if config.hidden_size % config.num_heads or (config.hidden_size // config.num_heads) % 4:
        refuse(
            f"hidden_size={config.hidden_size} with num_heads={config.num_heads}",
            "the head size must be a multiple of 4 (two rotary axes of paired dims)",
        )
    if config.image_size % config.patch_size:
        refuse(f"image_size={config.image_size}", "it must be a multiple of patch_size")
    return VisionSpec(
        depth=config.depth,
        hidden_size=config.hidden_size,
        num_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        out_hidden_size=config.out_hidden_size,
        in_channels=config.in_channels,
        patch_size=config.patch_size,
        temporal_patch_size=config.temporal_patch_size,
        spatial_merge_size=config.spatial_merge_size,
        num_grid_positions=config.image_size // config.patch_size,
        rms_norm_eps=config.rms_norm_eps,
        qkv_bias=bool(config.attention_bias),
        rope_theta=float(rope.get("rope_theta", 10000.0)),
    )


class PatchLinear(nn.Module):
    """A convolution whose kernel equals its stride, applied to pre-cut patches as one
    matmul. ``weight`` keeps the checkpoint's ``[out, in, *kernel]`` shape; with
    ``channels_last`` each input row is laid out ``[*kernel, in]`` instead of ``[in, *kernel]``."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel: tuple[int, ...], channels_last: bool
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *kernel))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.channels_last:
            w = w.movedim(1, -1)  # [out, *kernel, in]
        return F.linear(x.reshape(-1, w[0].numel()), w.reshape(w.shape[0], -1), self.bias)


class VisionPatchEmbed(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        kernel = (spec.temporal_patch_size, spec.patch_size, spec.patch_size)
        self.proj = PatchLinear(spec.in_channels, spec.hidden_size, kernel, channels_last=False)


class VisionEmbeddings(nn.Module):
    """A learned ``g x g`` grid of position vectors, resampled (bicubic) to each image's grid."""

    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.position_embedding = nn.Embedding(spec.num_grid_positions**2, spec.hidden_size)

    def forward(self, x: torch.Tensor, hw: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        """x: [N, C]; hw: [N, 2] row/column of each patch; sizes: [N, 2] its image's grid."""
        weight = self.position_embedding.weight  # [g * g, C]
        side = int(weight.shape[0] ** 0.5)
        grid_2d = weight.view(side, side, -1).permute(2, 0, 1)[None].float()  # [1, C, g, g]
        normed = (hw.float() + 0.5) / sizes.float() * 2 - 1  # [N, 2] in [-1, 1]
        where = normed.flip(-1)[None, :, None, :]  # [1, N, 1, 2] as (x=column, y=row)
        sampled = F.grid_sample(
            grid_2d, where, mode="bicubic", align_corners=False, padding_mode="border"
        )  # [1, C, N, 1]
        return x + sampled[0, :, :, 0].t().to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.num_heads, self.head_dim = spec.num_heads, spec.head_dim
        self.qkv = Linear(spec.hidden_size, 3 * spec.hidden_size, bias=spec.qkv_bias)
        self.proj = Linear(spec.hidden_size, spec.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        rotary: VisionRotaryEmbedding,
        seq_lens: list[int],
    ) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # [N, H, D]
        q, k = rotary(rope, q), rotary(rope, k)
        out = torch.empty_like(q)
        start = 0
        for length in seq_lens:  # each image attends only to itself, in both directions
            rows = slice(start, start + length)
            heads = [t[rows].transpose(0, 1)[None] for t in (q, k, v)]  # [1, H, L, D]
            out[rows] = F.scaled_dot_product_attention(*heads)[0].transpose(0, 1)
            start += length
        return self.proj(out.view(n, -1))


class VisionMlp(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = PackedLinear(
            hidden_size, {"gate": intermediate_size, "up": intermediate_size}, bias=False
        )
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class VisionBlock(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.norm1 = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.norm2 = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.attn = VisionAttention(spec)
        self.mlp = VisionMlp(spec.hidden_size, spec.out_hidden_size)

    def forward(self, x, rope, rotary, seq_lens) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, rotary, seq_lens)
        return x + self.mlp(self.norm2(x))


class VisionPatchMerger(VisionMlp):
    """Projection, LayerNorm and GELU, then the gated MLP (its parameters sit directly in
    ``merger.`` in the checkpoint)."""

    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__(dim, context_dim)
        self.proj = Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.act1 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.act1(self.post_projection_norm(self.proj(x))))


class Glm4vVisionModel(nn.Module):
    def __init__(self, spec: VisionSpec) -> None:
        super().__init__()
        self.spec = spec
        self.patch_embed = VisionPatchEmbed(spec)
        self.post_conv_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.embeddings = VisionEmbeddings(spec)
        self.rotary_pos_emb = VisionRotaryEmbedding(spec.head_dim, spec.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(spec) for _ in range(spec.depth))
        self.post_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        m = spec.spatial_merge_size
        self.downsample = PatchLinear(spec.hidden_size, spec.out_hidden_size, (m, m), True)
        self.merger = VisionPatchMerger(spec.out_hidden_size, spec.intermediate_size)

    def _patch_positions(self, grids: list[tuple[int, int, int]], device) -> torch.Tensor:
        """[N, 4]: row, column, grid height, grid width of every patch, in the image
        processor's order (``merge x merge`` blocks, row-major inside and across blocks)."""
        m = self.spec.spatial_merge_size
        out = []
        for t, h, w in grids:
            rows, cols = torch.meshgrid(
                torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
            )
            hw = torch.stack((rows, cols), dim=-1)  # [h, w, 2]
            hw = hw.view(h // m, m, w // m, m, 2).transpose(1, 2).reshape(-1, 2)  # [h * w, 2]
            size = torch.empty(h * w, 2, dtype=torch.long, device=device)
            size[:, 0], size[:, 1] = h, w  # filled there: no copy from the host
            out.append(torch.cat((hw, size), dim=-1).repeat(t, 1))
        return torch.cat(out)

    def forward(
        self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]
    ) -> torch.Tensor:
        """pixel_values: [N, C * t * p * p] patches of all images; grids: (t, h, w) in patches
        per image -> [N / merge**2, out_hidden_size] image tokens, images in order."""
        dtype = self.post_layernorm.weight.dtype
        x = self.post_conv_layernorm(self.patch_embed.proj(pixel_values.to(dtype)))  # [N, C]
        where = self._patch_positions(grids, x.device)  # [N, 4]
        rope = self.rotary_pos_emb.cos_sin(where[:, :2])
        x = self.embeddings(x, where[:, :2], where[:, 2:])
        seq_lens = [h * w for t, h, w in grids for _ in range(t)]  # one frame attends to itself
        for block in self.blocks:
            x = block(x, rope, self.rotary_pos_emb, seq_lens)
        x = self.downsample(self.post_layernorm(x))  # [N / merge**2, out_hidden_size]
        return self.merger(x)
