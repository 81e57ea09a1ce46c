"""KV cache precision (``kv_cache_dtype``): the model's dtype, or int8 / fp8 values with a
scale per (slot, KV head); and where the scales come from (``kv_cache_scales``).

* ``auto``: K and V are stored in the model's compute dtype, as computed.
* ``int8``: ``k ~= q * scale`` with ``q = round(k / scale)`` in [-127, 127] and
  ``scale = max|k| / 127`` over the head's ``head_dim`` values of one token.
* ``fp8_e4m3``: ``q = k / scale`` rounded to ``torch.float8_e4m3fn`` with
  ``scale = max|k| / 448`` (its largest finite value).

Scales are bfloat16 ``[num_slots, H_kv]``: at head_dim 64 a float32 scale would cost 4 of
every 68 bytes a slot's head takes (1.88x the tokens of a bfloat16 cache), a bfloat16 one
2 of 66 (1.94x; 1.97x at head_dim 128). Values are quantized against the scale as
rounded to bfloat16 (relative error 2^-9), so the narrow scale costs no accuracy: an int8
value stays within half a step of ``q * scale`` (``|k| / scale`` < 127 * (1 + 2^-9) rounds
to at most 127).

A non-finite K or V value gives its (slot, head) a non-finite scale and zero values: the
dequantized head is NaN, so a reader fails as it would on a float cache, and
:meth:`auto_glm.engine.model_runner.ModelRunner.scrub_blocks` finds it in the scales.

``kv_cache_scales``: ``dynamic`` (the default) is the scale per (slot, KV head) above;
``calibrate`` and ``checkpoint`` fix one scale per (layer, KV head) instead (see
:mod:`auto_glm.layers.kv_static`), so a slot holds its values alone: exactly twice the
tokens of a bfloat16 cache.
"""

from __future__ import annotations

import torch

__all__ = [
    "KV_CACHE_DTYPES",
    "KV_CACHE_SCALES",
    "SCALE_DTYPE",
    "dequantize_kv",
    "kv_bytes_per_slot",
    "kv_storage_dtype",
    "quantize_kv",
    "resolve_kv_cache_dtype",
    "resolve_kv_cache_scales",
]

KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3")
KV_CACHE_SCALES = ("dynamic", "calibrate", "checkpoint")
SCALE_DTYPE = torch.bfloat16
_FP8 = getattr(torch, "float8_e4m3fn", None)
_QMAX = {torch.int8: 127.0, _FP8: 448.0}


def resolve_kv_cache_dtype(value: object) -> str:
    """``value`` if it is a usable ``kv_cache_dtype`` (``None`` means ``"auto"``), else a
    ValueError naming the setting, the value and the choices."""
    name = "auto" if value is None else value
    if name not in KV_CACHE_DTYPES:
        raise ValueError(
            f"kv_cache_dtype={value!r} is not a KV cache precision; use one of: "
            f"{', '.join(KV_CACHE_DTYPES)} (auto: the model's dtype; int8 and fp8_e4m3 hold "
            "about twice the tokens in the same kv_cache_memory)"
        )
    if name == "fp8_e4m3" and _FP8 is None:
        raise ValueError(
            f"kv_cache_dtype='fp8_e4m3' needs torch.float8_e4m3fn, which torch "
            f"{torch.__version__} lacks; upgrade torch (2.1 or later) or use "
            "kv_cache_dtype='int8'"
        )
    return str(name)


def resolve_kv_cache_scales(value: object, kv_cache_dtype: str) -> str:
    """``value`` if it is a usable ``kv_cache_scales`` for the (resolved) ``kv_cache_dtype``,
    else a ValueError naming the setting, the value and the fix."""
    if value not in KV_CACHE_SCALES:
        raise ValueError(
            f"kv_cache_scales={value!r} is not a KV scale mode; use one of: "
            f"{', '.join(KV_CACHE_SCALES)} (dynamic: a scale per token and KV head; calibrate: "
            "one per layer and KV head, measured at load; checkpoint: the checkpoint's "
            "kv_cache_scheme scales)"
        )
    if value == "calibrate" and kv_cache_dtype == "auto":
        raise ValueError(
            f"kv_cache_scales={value!r} needs a quantized KV cache, but kv_cache_dtype='auto'; "
            "pick kv_cache_dtype='int8' or 'fp8_e4m3' (or kv_cache_scales='dynamic')"
        )
    return str(value)


def kv_storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype K/V values are stored in (``kv_cache_dtype`` already resolved)."""
    return {"auto": model_dtype, "int8": torch.int8, "fp8_e4m3": _FP8}[kv_cache_dtype]


def kv_bytes_per_slot(
    kv_cache_dtype: str, model_dtype: torch.dtype, head_dim: int, static_scales: bool = False
) -> int:
    """Bytes one slot of one KV head takes in one of K or V: values plus its scale (none
    with ``static_scales``, whose scale is per layer)."""
    values = head_dim * kv_storage_dtype(kv_cache_dtype, model_dtype).itemsize
    return values if kv_cache_dtype == "auto" or static_scales else values + SCALE_DTYPE.itemsize


def quantize_kv(x: torch.Tensor, storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H_kv, D] -> (values [T, H_kv, D] in ``storage``, scales [T, H_kv] bfloat16)."""
    qmax = _QMAX[storage]
    xf = x.float()
    amax = xf.abs().amax(dim=-1)  # [T, H_kv]; NaN and inf carry through
    scale = amax.div_(qmax).clamp_min_(torch.finfo(torch.float32).tiny).to(SCALE_DTYPE)
    # against the stored (rounded) scale; under a non-finite scale every value is NaN or 0
    q = (xf / scale.float().unsqueeze(-1)).nan_to_num_(0.0)  # [T, H_kv, D]
    if storage == torch.int8:
        q.round_()
    return q.clamp_(-qmax, qmax).to(storage), scale


def dequantize_kv(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, poisoned: bool = False
) -> torch.Tensor:
    """values [..., D] and scales [...] -> K/V [..., D] in ``dtype``. ``poisoned`` (static
    scales): int8 -128 marks a non-finite value and reads as NaN (fp8 stores NaN itself)."""
    x = q.to(dtype).mul_(scale.to(dtype).unsqueeze(-1))
    return x.masked_fill_(q == -128, float("nan")) if poisoned and q.dtype == torch.int8 else x
