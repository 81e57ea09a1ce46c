"""Pre-quantized INT8 checkpoints in llm-compressor's compressed-tensors format.

``config.json`` carries a ``quantization_config`` with ``"quant_method":
"compressed-tensors"``. Two schemes map onto :class:`~auto_glm.layers.quant.Int8Linear`:

* W8A8 INT8: 8-bit int symmetric per-channel weights and 8-bit int symmetric dynamic
  per-token activations -> ``w8a8``;
* weight-only 8-bit int symmetric per-channel weights -> ``int8``;

both with unpacked int8 weights (format ``int-quantized`` or ``naive-quantized``). Each
quantized linear stores ``<name>.weight`` as int8 ``[out, in]`` and ``<name>.weight_scale``
as ``[out, 1]``; they go into the INT8 layer as stored (no dequantize/requantize), the
parts of a fused q/k/v or gate/up layer stacked in the float path's order. Anything else is
refused with a :class:`ModelLoadError` naming what the checkpoint has. A ``kv_cache_scheme``
(quantized KV cache scales) is read by :mod:`auto_glm.loader.kv_scheme`; with it the weights
may also be float (no ``config_groups``, format ``dense``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from auto_glm.layers.linear import Linear, PackedLinear
from auto_glm.layers.quant import Int8Linear
from auto_glm.loader.errors import ModelLoadError

__all__ = [
    "COMPRESSED_TENSORS_FORMATS",
    "QuantizedTensors",
    "compressed_tensors_mode",
    "install_int8_layers",
    "is_scale_name",
]

# formats whose quantized weights are stored unpacked, as int8 ``weight`` tensors
COMPRESSED_TENSORS_FORMATS = ("int-quantized", "naive-quantized")
_SUPPORTED = (
    "supported: quant_method 'compressed-tensors', format 'int-quantized' or "
    "'naive-quantized', weights 8-bit int symmetric strategy 'channel', and either no "
    "input_activations (-> quantization='int8') or 8-bit int symmetric dynamic strategy "
    "'token' input_activations (-> quantization='w8a8')"
)
_SCALE = "weight_scale"


def is_scale_name(name: str) -> bool:
    """Whether checkpoint tensor ``name`` is a compressed-tensors weight scale (kept in its
    stored dtype, so it reaches the INT8 layer unrounded)."""
    return name.rpartition(".")[2] == _SCALE


def _refuse(file: Path, what: str) -> ModelLoadError:
    return ModelLoadError(
        f"{file} quantization_config has {what}, which Open-AutoGLM cannot load; {_SUPPORTED}"
    )


def _check_weights(file: Path, group: str, args: Any) -> None:
    if not isinstance(args, dict):
        raise _refuse(file, f"config_groups.{group}.weights={args!r}")
    wanted = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    for field, value in wanted.items():
        if args.get(field) != value:
            raise _refuse(file, f"config_groups.{group}.weights.{field}={args.get(field)!r}")
    if args.get("dynamic", False) is not False:
        raise _refuse(file, f"config_groups.{group}.weights.dynamic={args.get('dynamic')!r}")
    if args.get("group_size") is not None:
        raise _refuse(file, f"config_groups.{group}.weights.group_size={args['group_size']!r}")


def _group_mode(file: Path, group: str, scheme: Any) -> str:
    if not isinstance(scheme, dict):
        raise _refuse(file, f"config_groups.{group}={scheme!r}")
    if scheme.get("format") not in (None, *COMPRESSED_TENSORS_FORMATS):
        raise _refuse(file, f"config_groups.{group}.format={scheme['format']!r}")
    if scheme.get("output_activations") is not None:
        raise _refuse(file, f"config_groups.{group}.output_activations (quantized outputs)")
    _check_weights(file, group, scheme.get("weights"))
    acts = scheme.get("input_activations")
    if acts is None:
        return "int8"
    if not isinstance(acts, dict):
        raise _refuse(file, f"config_groups.{group}.input_activations={acts!r}")
    wanted = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True}
    wanted["strategy"] = "token"
    for field, value in wanted.items():
        if acts.get(field) != value:
            raise _refuse(
                file, f"config_groups.{group}.input_activations.{field}={acts.get(field)!r}"
            )
    return "w8a8"


def compressed_tensors_mode(raw: dict[str, Any], file: Path) -> str | None:
    """The quantization mode (``"int8"`` or ``"w8a8"``) of the checkpoint whose
    ``config.json`` (at ``file``) is ``raw``; ``None`` without a ``quantization_config``, or
    with float weights and only a ``kv_cache_scheme``. Raises :class:`ModelLoadError` for
    any weight scheme Open-AutoGLM cannot load."""
    config = raw.get("quantization_config")
    if not config:
        return None
    if not isinstance(config, dict):
        raise _refuse(file, f"quantization_config={config!r}")
    method = config.get("quant_method")
    if method != "compressed-tensors":
        raise _refuse(file, f"quant_method={method!r}")
    fmt = config.get("format")
    groups = config.get("config_groups")
    if config.get("kv_cache_scheme") is not None and not groups and fmt in (None, "dense"):
        return None  # float weights, quantized KV cache only
    if fmt not in COMPRESSED_TENSORS_FORMATS:
        raise _refuse(file, f"format={fmt!r}")
    status = config.get("quantization_status", "compressed")
    if status != "compressed":
        raise _refuse(file, f"quantization_status={status!r} (weights not stored compressed)")
    if not isinstance(groups, dict) or not groups:
        raise _refuse(file, f"config_groups={groups!r} (expected a non-empty object)")
    modes = {_group_mode(file, name, scheme) for name, scheme in groups.items()}
    if len(modes) > 1:
        raise _refuse(file, "config groups with different schemes (int8 and w8a8 mixed)")
    return modes.pop()


class QuantizedTensors:
    """Splits a checkpoint stream: int8 ``weight`` and ``weight_scale`` tensors are kept
    here, by checkpoint module name; everything else flows on to the float loader."""

    def __init__(self) -> None:
        self.parts: dict[str, dict[str, torch.Tensor]] = {}

    def split(
        self, stream: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the float tensors of ``stream``; keep the quantized ones."""
        for name, tensor in stream:
            prefix, _, leaf = name.rpartition(".")
            if leaf == _SCALE or (leaf == "weight" and tensor.dtype == torch.int8):
                self.parts.setdefault(prefix, {})[leaf] = tensor
            else:
                yield name, tensor

    def weight_names(self) -> Iterator[str]:
        """Checkpoint names of the quantized weights (``<module>.weight``), read lazily: only
        once iterated, so it can be handed over before the stream is consumed."""
        for prefix in self.parts:
            yield f"{prefix}.weight"

    def take(self, prefix: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(int8 weight [out, in], float32 scale [out])`` of checkpoint module ``prefix``,
        removed from here; ``None`` when it is not stored quantized."""
        found = self.parts.pop(prefix, None)
        if found is None:
            return None
        weight, scale = found.get("weight"), found.get(_SCALE)
        if weight is None or scale is None:
            missing = f"{prefix}.weight (int8)" if weight is None else f"{prefix}.{_SCALE}"
            raise ValueError(f"checkpoint has no {missing} for its quantized layer {prefix}")
        if weight.ndim != 2 or tuple(scale.shape) not in ((weight.shape[0], 1), (weight.shape[0],)):
            raise ValueError(
                f"checkpoint tensor {prefix}.{_SCALE} has shape {tuple(scale.shape)}; per-channel "
                f"scales of {prefix}.weight {tuple(weight.shape)} have shape ({weight.shape[0]}, 1)"
            )
        return weight, scale.float().view(-1)


def _checkpoint_parts(name: str, linear: Linear, packed: dict[str, tuple[str, str]]) -> list[str]:
    """The checkpoint module names stored in our linear ``name``, in stacking order."""
    if not isinstance(linear, PackedLinear):
        return [name]
    parent, _, attr = name.rpartition(".")
    by_part = {part: src for src, (dst, part) in packed.items() if dst == attr}
    return [f"{parent}.{by_part[part]}" for part in linear.shard_rows]


@torch.no_grad()
def install_int8_layers(
    model: nn.Module,
    tensors: QuantizedTensors,
    mode: str,
    packed: dict[str, tuple[str, str]],
    device: torch.device,
) -> int:
    """Replace each :class:`Linear` of ``model`` stored quantized by an :class:`Int8Linear`
    holding the stored int8 rows and scales (a fused layer's parts concatenated in its
    ``shard_rows`` order); returns how many. ``packed`` is the model's checkpoint-name ->
    (fused module, part) map. Raises ValueError for a partly quantized fused layer or for
    quantized tensors no layer takes."""
    names = [n for n, m in model.named_modules() if isinstance(m, Linear)]
    count = 0
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        linear = getattr(owner, attr)
        # a fused layer the checkpoint also stores fused (GLM's gate_up_proj) is one part
        parts = [name] if name in tensors.parts else _checkpoint_parts(name, linear, packed)
        found = {part: tensors.take(part) for part in parts}
        stored = [v for v in found.values() if v is not None]
        if not stored:
            continue
        if len(stored) != len(parts):
            floats = [p for p, v in found.items() if v is None]
            raise ValueError(
                f"fused layer {name} has quantized and float parts ({', '.join(floats)} not "
                "int8); all its parts must be stored the same way"
            )
        qweight = torch.cat([w for w, _ in stored]).to(device)  # int8 [out, in]
        scales = torch.cat([s for _, s in stored]).to(device)  # float32 [out]
        if tuple(qweight.shape) != tuple(linear.weight.shape):
            raise ValueError(
                f"quantized weights of {name} have shape {tuple(qweight.shape)} but the config "
                f"implies {tuple(linear.weight.shape)}"
            )
        bias = None if linear.bias is None else linear.bias.detach()
        setattr(owner, attr, Int8Linear(qweight, scales, bias, mode))
        count += 1
    if tensors.parts:
        raise ValueError(
            f"checkpoint has quantized tensors no layer uses: {sorted(tensors.parts)[:8]}"
        )
    return count
