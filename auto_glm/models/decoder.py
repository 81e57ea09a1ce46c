"""The decoder-only transformer that GLM, GLM-4, Llama, Qwen2 and Qwen3 share.

Module and parameter names mirror the Hugging Face checkpoints; only q/k/v and gate/up are
fused here, and :meth:`CausalLM.load_weights` stacks their parts at load time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from auto_glm.layers.attention import Attention
from auto_glm.layers.attention_backends import AttentionBackend
from auto_glm.layers.embedding import Embedding
from auto_glm.layers.linear import Linear, PackedLinear, SiluAndMul
from auto_glm.layers.norm import RMSNorm
from auto_glm.layers.quant import Int8Linear
from auto_glm.layers.rotary import RopeSpec, RotaryEmbedding

__all__ = ["CausalLM", "DecoderSpec"]


@dataclass(frozen=True)
class DecoderSpec:
    """Everything about an architecture that changes the math, read from its HF config."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope: RopeSpec
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before rotary
    sandwich_norm: bool = False  # GLM-4-0414: extra norms after attention and after the MLP
    tie_word_embeddings: bool = False


class SelfAttention(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
        )
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.qkv_proj = PackedLinear(
            spec.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, bias=spec.qkv_bias
        )
        self.o_proj = Linear(q_size, spec.hidden_size, bias=spec.o_bias)
        if spec.qk_norm:
            self.q_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
            self.k_norm = RMSNorm(spec.head_dim, spec.rms_norm_eps)
        self.qk_norm = spec.qk_norm
        self.attn = Attention(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.head_dim**-0.5)
        self.splits = [q_size, kv_size, kv_size]

    def forward(
        self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, rotary: RotaryEmbedding
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.splits, dim=-1)
        q = q.reshape(t, self.num_heads, self.head_dim)
        k = k.reshape(t, self.num_kv_heads, self.head_dim)
        v = v.reshape(t, self.num_kv_heads, self.head_dim)
        q, k = rotary(rope, q, k, (self.q_norm, self.k_norm) if self.qk_norm else None)
        return self.o_proj(self.attn(q, k, v))


class MLP(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        size = spec.intermediate_size
        self.gate_up_proj = PackedLinear(
            spec.hidden_size, {"gate": size, "up": size}, bias=spec.mlp_bias
        )
        self.down_proj = Linear(size, spec.hidden_size, bias=spec.mlp_bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.self_attn = SelfAttention(spec)
        self.mlp = MLP(spec)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.sandwich_norm = spec.sandwich_norm
        if spec.sandwich_norm:
            self.post_self_attn_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
            self.post_mlp_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(
        self,
        rope: tuple[torch.Tensor, torch.Tensor],
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rotary: RotaryEmbedding,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, rotary)
        if self.sandwich_norm:
            x = self.post_self_attn_layernorm(x)
        x, residual = self.post_attention_layernorm(x, residual)
        x = self.mlp(x)
        if self.sandwich_norm:
            x = self.post_mlp_layernorm(x)
        return x, residual


class DecoderModel(nn.Module):
    def __init__(self, spec: DecoderSpec) -> None:
        super().__init__()
        self.embed_tokens = Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(spec.rope)  # one table for every layer

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        rope = self.rotary_emb.cos_sin(positions, x.dtype)
        for layer in self.layers:
            x, residual = layer(rope, x, residual, self.rotary_emb)
        x, _ = self.norm(x, residual)
        return x


class CausalLM(nn.Module):
    """Base of every architecture: subclasses only translate their HF config to a spec."""

    # checkpoint module name -> (our fused module, part)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    accepts_images = False  # multimodal subclasses take image embeddings in forward()

    def __init__(self, hf_config) -> None:
        super().__init__()
        self.spec = self.spec_from_config(hf_config)
        self.model = self.build_model(hf_config)
        self.lm_head = Linear(self.spec.hidden_size, self.spec.vocab_size, bias=False)
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.language_model().embed_tokens.weight

    @classmethod
    def spec_from_config(cls, hf_config) -> DecoderSpec:
        raise NotImplementedError

    def build_model(self, hf_config) -> nn.Module:
        """The module stored as ``self.model`` (checkpoint prefix ``model.``)."""
        return DecoderModel(self.spec)

    def language_model(self) -> DecoderModel:
        """The text decoder: its embedding, layers and final norm."""
        return self.model

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions: [T] (packed, no padding) -> hidden states [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def prepack(
        self,
        batch_hint: int,
        compute_dtype: torch.dtype | None = None,
        weight_dtype: torch.dtype | None = None,
    ) -> int:
        """Pre-pack every CPU linear weight, dropping the plain copies; returns how many.

        After :meth:`use_cpu_kernels`, which offers the native kernels: float32 weights
        loaded from a bfloat16 or float16 checkpoint (``weight_dtype``) are kept in that
        dtype for their AVX2 kernel where it is built, other float32 weights are packed for
        oneDNN, and INT8 weights for their matmul (with the model's ``compute_dtype``: see
        :meth:`Int8Linear.prepack`). The embedding keeps such a checkpoint's dtype too
        (:meth:`Embedding.narrow`); a tied lm_head's plain weight, which the embedding
        shares, is dropped only once the embedding holds its own narrow copy."""
        embedding = self.language_model().embed_tokens
        tied = self.lm_head if getattr(self.lm_head, "weight", None) is embedding.weight else None
        packed = 0
        for m in self.modules():
            if isinstance(m, Linear):
                packed += m.prepack(
                    batch_hint, release_weight=m is not tied, values_dtype=weight_dtype
                )
            elif isinstance(m, Int8Linear):
                packed += m.prepack(compute_dtype)
        if tied is None:
            embedding.narrow(weight_dtype)
        elif tied.is_packed and embedding.narrow(weight_dtype):
            tied.release_weight()
        return packed

    def use_cpu_kernels(self, kernels: SimpleNamespace) -> None:
        """Hand the native CPU kernels (auto_glm.kernels) to every norm, activation and
        linear layer; only for a model computing in one of ``auto_glm.kernels.KERNEL_DTYPES``.
        Attention takes its kernels from its backend (:meth:`set_attention_backend`)."""
        for m in self.modules():
            if isinstance(m, (Linear, Int8Linear)):
                m.enable_cpu_kernels(kernels)
        self.use_fused_kernels(kernels)

    def use_fused_kernels(self, kernels: SimpleNamespace) -> None:
        """Hand fused RMSNorm and SiLU-and-multiply kernels (``rms_norm``, ``add_rms_norm``,
        ``silu_and_mul``: the native CPU ones or a GPU platform's) to every norm and
        activation, a GPU platform's ``write_kv`` to every attention layer and its
        ``rotary`` to the rotary embedding."""
        for m in self.modules():
            if isinstance(m, (RMSNorm, SiluAndMul, Attention)):
                m.enable_kernels(kernels)
        rotary = getattr(kernels, "rotary", None)  # the native CPU kernels have none
        if rotary is not None:
            self.language_model().rotary_emb.enable_kernels(rotary)

    def set_attention_backend(self, backend: AttentionBackend) -> None:
        """Compute every attention layer with ``backend``; before its caches are allocated,
        since the backend lays them out."""
        layers = self.attention_layers()
        backend.bind(layers)
        for attn in layers:
            attn.backend = backend

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.language_model().layers]

    @torch.no_grad()
    def load_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], quantized: Iterable[str] = ()
    ) -> None:
        """Copy checkpoint tensors in by name; raise on any missing or unexpected tensor.

        ``quantized`` names checkpoint weights (``<module>.weight``) stored in INT8, which
        the caller installs itself: they are not expected among ``weights``. It is read
        only after ``weights`` is exhausted, so it may be filled while they stream.
        """
        params = dict(self.named_parameters())
        pending = {name: None for name in params}  # name -> parts still missing (None: whole)
        for name, packed in self._packed_params(params):
            pending[name] = set(packed.shard_rows)
        unexpected = []
        for name, tensor in weights:
            if name.endswith("rotary_emb.inv_freq") or (
                name == "lm_head.weight" and self.spec.tie_word_embeddings
            ):
                continue
            target, part = self._map_name(name)
            param = params.get(target)
            if param is None:
                unexpected.append(name)
                continue
            if part is None:
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ValueError(
                        f"checkpoint tensor {name} has shape {tuple(tensor.shape)} but the config "
                        f"implies {tuple(param.shape)}; config.json and the weights disagree"
                    )
                param.copy_(tensor)
                pending.pop(target, None)
            else:
                self.get_submodule(target.rsplit(".", 1)[0]).load_shard(param, part, tensor)
                parts = pending.get(target)
                if parts is not None:
                    parts.discard(part)
                    if not parts:
                        pending.pop(target)
        if unexpected:
            raise ValueError(
                f"checkpoint has tensors this architecture does not use: {unexpected[:8]}"
            )
        for name in quantized:
            target, part = self._map_name(name)
            parts = pending.get(target)
            if part is None or parts is None:
                pending.pop(target, None)
            else:
                parts.discard(part)
                if not parts:
                    pending.pop(target)
        if pending:
            raise ValueError(f"checkpoint is missing tensors: {sorted(pending)[:8]}")

    def _map_name(self, name: str) -> tuple[str, str | None]:
        for src, (dst, part) in self.packed_modules.items():
            if f".{src}." in name:
                return name.replace(f".{src}.", f".{dst}."), part
        return name, None

    def _packed_params(self, params: dict[str, nn.Parameter]) -> Iterable[tuple[str, PackedLinear]]:
        for name in params:
            module = self.get_submodule(name.rsplit(".", 1)[0])
            if isinstance(module, PackedLinear):
                yield name, module
