"""KV cache scales of a compressed-tensors (llm-compressor) checkpoint.

``quantization_config.kv_cache_scheme`` in config.json describes how K and V are quantized;
what maps onto our caches (see :mod:`auto_glm.layers.kv_static`) is a symmetric, static
(``dynamic: false``) 8-bit scheme: ``type: float`` -> ``kv_cache_dtype='fp8_e4m3'``,
``type: int`` -> ``'int8'``, with ``strategy`` ``tensor`` (one scale per layer) or
``attn_head`` (one per KV head). The weights hold each attention layer's
``<prefix>.layers.<i>.self_attn.k_scale`` / ``v_scale`` (older exports:
``self_attn.k_proj.output_scale`` / ``v_proj.output_scale``), with ``stored = k / k_scale``;
a ``q_scale`` (queries quantized for FP8 attention) is not used. Anything else is refused
with a :class:`ModelLoadError` naming the field and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from auto_glm.loader.errors import ModelLoadError

__all__ = ["KvScaleTensors", "is_kv_scale_name", "kv_cache_scheme_dtype"]

_NAME = re.compile(r"layers\.(\d+)\.self_attn\.(?:(k|v|q)_scale|(k|v)_proj\.output_scale)$")
_STRATEGIES = ("tensor", "attn_head")
_FIX = (
    "supported: a symmetric, static (dynamic: false) 8-bit scheme, type 'float' "
    "(-> kv_cache_dtype='fp8_e4m3') or 'int' (-> 'int8'), strategy 'tensor' or 'attn_head'; "
    "re-export the checkpoint with such a kv_cache_scheme, or without one"
)


def _refuse(file: Path, what: str) -> ModelLoadError:
    return ModelLoadError(
        f"{file} quantization_config.kv_cache_scheme has {what}, which Open-AutoGLM cannot "
        f"load; {_FIX}"
    )


def kv_cache_scheme_dtype(raw: dict[str, Any], file: Path) -> str | None:
    """The ``kv_cache_dtype`` a checkpoint's ``kv_cache_scheme`` stores (``"fp8_e4m3"`` or
    ``"int8"``), ``None`` without one; ModelLoadError for one we cannot load."""
    config = raw.get("quantization_config")
    scheme = config.get("kv_cache_scheme") if isinstance(config, dict) else None
    if scheme is None:
        return None
    if not isinstance(scheme, dict):
        raise _refuse(file, f"the value {scheme!r}")
    checks = [
        ("num_bits", scheme.get("num_bits") == 8),
        ("type", scheme.get("type") in ("float", "int")),
        ("symmetric", scheme.get("symmetric", True) is True),
        ("dynamic", scheme.get("dynamic", False) is False),
        ("strategy", scheme.get("strategy", "tensor") in _STRATEGIES),
        ("group_size", scheme.get("group_size") is None),
    ]
    for field, ok in checks:
        if not ok:
            raise _refuse(file, f"{field}={scheme.get(field)!r}")
    return "fp8_e4m3" if scheme["type"] == "float" else "int8"


def is_kv_scale_name(name: str) -> bool:
    """Whether checkpoint tensor ``name`` is an attention layer's K/V/Q cache scale."""
    return _NAME.search(name) is not None


class KvScaleTensors:
    """Splits a checkpoint stream: the KV cache scales are kept here, by layer; everything
    else flows on."""

    def __init__(self) -> None:
        self.found: dict[tuple[int, str], torch.Tensor] = {}  # (layer, "k" | "v") -> scale

    def split(
        self, stream: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in stream:
            match = _NAME.search(name)
            if match is None:
                yield name, tensor
                continue
            which = match.group(2) or match.group(3)
            if which != "q":
                self.found[(int(match.group(1)), which)] = tensor

    def per_layer(
        self, num_layers: int, num_kv_heads: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """float32 (K, V) scales [H_kv] of each layer (a per-tensor scale repeated); ValueError
        for a missing, misshapen, non-positive or non-finite one."""
        out = []
        for i in range(num_layers):
            pair = []
            for which in ("k", "v"):
                scale = self.found.get((i, which))
                if scale is None:
                    raise ValueError(f"no self_attn.{which}_scale for layer {i} (kv_cache_scheme)")
                flat = scale.float().flatten()  # [1] or [H_kv]
                if flat.numel() not in (1, num_kv_heads):
                    raise ValueError(
                        f"layer {i}'s self_attn.{which}_scale has shape {tuple(scale.shape)}; "
                        f"expected one scale or one per KV head ({num_kv_heads})"
                    )
                if not bool((flat > 0).all()) or not bool(flat.isfinite().all()):
                    raise ValueError(
                        f"layer {i}'s self_attn.{which}_scale is {flat.tolist()}: KV scales must "
                        "be positive and finite"
                    )
                pair.append(flat.expand(num_kv_heads).clone())
            out.append((pair[0], pair[1]))
        return out
