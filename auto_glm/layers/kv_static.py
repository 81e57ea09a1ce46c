"""Static KV scales (``kv_cache_scales`` ``calibrate`` or ``checkpoint``): one scale per
(layer, KV head) for K and one for V, so an int8 / fp8_e4m3 cache stores only its 1-byte
values and holds exactly twice the tokens of a bfloat16 cache.

* ``k ~= q * scale`` as with dynamic scales (:mod:`auto_glm.layers.kv_quant`), but
  ``scale`` is fixed: from a compressed-tensors checkpoint's ``k_scale`` / ``v_scale``
  (llm-compressor's convention, ``stored = k / k_scale``), or calibrated at load as
  ``max|k| * CALIBRATION_HEADROOM / qmax`` over a fixed text. Values beyond
  ``qmax * scale`` saturate to ``+-qmax`` (clamped, never NaN).
* The scale is rounded to bfloat16 once and values are quantized against the rounded
  scale, as in the dynamic mode. Kernels read it as ``[num_slots, H_kv]`` with slot stride
  0 (an expanded ``[H_kv]`` tensor): the same code path as the dynamic mode's scales.
* A non-finite K or V value cannot go into a shared scale, so it is stored as a poison
  value instead, never as a finite one: NaN for fp8 (``0x7F`` / ``0xFF``) and -128 for
  int8 (quantized values stay in [-127, 127]). Every reader dequantizes int8 -128 to NaN,
  so attention over the slot is NaN as on a float cache, and
  :meth:`auto_glm.layers.attention.Attention.scrub_blocks` finds and zeroes them.
"""

from __future__ import annotations

import torch

from auto_glm.layers.kv_quant import _QMAX, SCALE_DTYPE

__all__ = [
    "CALIBRATION_HEADROOM",
    "INT8_POISON",
    "is_poison",
    "quantize_kv_static",
    "static_scale",
]

# calibrated scales leave 25% above the largest |K| / |V| seen: the calibration text is
# short, and a value past the range saturates (costing accuracy on that value only)
CALIBRATION_HEADROOM = 1.25
INT8_POISON = -128


def static_scale(amax: torch.Tensor, storage: torch.dtype, headroom: float) -> torch.Tensor:
    """amax [H_kv] (largest |K| or |V| per KV head) -> float32 scales [H_kv], rounded to
    the scale dtype; an all-zero head gets the smallest normal scale."""
    scale = amax.float() * headroom / _QMAX[storage]
    tiny = torch.finfo(SCALE_DTYPE).tiny
    return scale.clamp_min(tiny).to(SCALE_DTYPE).float()


def quantize_kv_static(x: torch.Tensor, storage: torch.dtype, scale: torch.Tensor) -> torch.Tensor:
    """x [T, H_kv, D], scale [H_kv] (bfloat16 or its float32 value) -> values [T, H_kv, D]
    in ``storage``: saturated at +-qmax, poisoned where ``x`` is not finite."""
    qmax = _QMAX[storage]
    xf = x.float()
    q = xf / scale.float()[:, None]  # [T, H_kv, D]
    if storage == torch.int8:
        q.round_()
    q.clamp_(-qmax, qmax)
    poison = float(INT8_POISON) if storage == torch.int8 else float("nan")
    return q.masked_fill_(~torch.isfinite(xf), poison).to(storage)


def is_poison(values: torch.Tensor) -> torch.Tensor:
    """Where int8 or fp8 ``values`` hold the poison of a non-finite K/V value (bool)."""
    raw = values.view(torch.uint8)
    if values.dtype == torch.int8:
        return raw == (INT8_POISON & 0xFF)
    return (raw & 0x7F) == 0x7F  # e4m3fn NaN: S.1111.111
