"""Where an engine's KV scales come from (``kv_cache_scales``), settled once before its model
runner sizes and allocates the cache.

* A checkpoint with a compressed-tensors ``kv_cache_scheme`` (:mod:`auto_glm.loader.kv_scheme`)
  brings its own scales: ``kv_cache_dtype`` ``auto`` takes the scheme's precision, a
  different explicit one is refused, and the scales are static (``checkpoint``).
* ``calibrate`` runs the model once over a fixed text (the first :data:`CALIBRATION_LINES`
  lines of the built-in tokenizer's corpus, at most :data:`CALIBRATION_TOKENS` tokens; not
  the benchmark's quality texts) with a float cache, and sets each (layer, KV head)'s scale
  to ``max|K| * CALIBRATION_HEADROOM / qmax`` (likewise V).
* ``dynamic`` keeps a scale per (slot, KV head).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from auto_glm.checkpoints.corpus import corpus_lines
from auto_glm.engine.config import EngineConfig
from auto_glm.layers.attention import AttentionMetadata, PrefillChunk, attention_metadata
from auto_glm.layers.attention_backends import TorchBackend
from auto_glm.layers.kv_quant import kv_storage_dtype
from auto_glm.layers.kv_static import CALIBRATION_HEADROOM, static_scale

__all__ = [
    "CALIBRATION_LINES",
    "CALIBRATION_TOKENS",
    "calibrate_kv_scales",
    "calibration_text",
    "prepare_kv_scales",
]

log = logging.getLogger(__name__)

CALIBRATION_LINES = 48
CALIBRATION_TOKENS = 512
Scales = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: float32 K, V scales [H_kv]


def calibration_text() -> str:
    """The fixed text calibration runs over: prose, then some dialogue."""
    lines = corpus_lines()
    return "\n".join(next(lines) for _ in range(CALIBRATION_LINES))


def prepare_kv_scales(loaded: Any, config: EngineConfig) -> EngineConfig:
    """Give ``loaded.model``'s attention layers the static scales ``config`` asks for (or
    none) and return ``config`` as the engine must use it (with a checkpoint
    ``kv_cache_scheme``: its precision, ``kv_cache_scales='checkpoint'``). ValueError
    names a conflicting setting and the fix."""
    layers = loaded.model.attention_layers()
    scheme = loaded.kv_cache_scheme
    scales: Scales | None = None
    if scheme is not None:
        if config.kv_cache_dtype not in ("auto", scheme):
            raise ValueError(
                f"kv_cache_dtype={config.kv_cache_dtype!r} conflicts with {loaded.path}, whose "
                f"quantization_config.kv_cache_scheme stores a {scheme!r} KV cache with its "
                f"scales; pass kv_cache_dtype={scheme!r} or 'auto'"
            )
        if config.kv_cache_scales == "calibrate":
            raise ValueError(
                f"kv_cache_scales='calibrate' conflicts with {loaded.path}, whose "
                "quantization_config.kv_cache_scheme brings calibrated KV scales; drop "
                "kv_cache_scales (or pass 'checkpoint')"
            )
        config = dataclasses.replace(config, kv_cache_dtype=scheme, kv_cache_scales="checkpoint")
        scales = loaded.kv_scales
    elif config.kv_cache_scales == "checkpoint":
        raise ValueError(
            f"kv_cache_scales='checkpoint' needs KV scales in the checkpoint, but "
            f"{loaded.path} has no quantization_config.kv_cache_scheme; pass "
            "kv_cache_scales='calibrate' or 'dynamic'"
        )
    elif config.kv_cache_scales == "calibrate":
        scales = calibrate_kv_scales(loaded, config.kv_cache_dtype)
    for i, attn in enumerate(layers):
        attn.static_kv_scales = None if scales is None else scales[i]
    if scales is not None:
        log.info(
            "KV cache %s with static scales (%s)", config.kv_cache_dtype, config.kv_cache_scales
        )
    return config


@torch.inference_mode()
def calibrate_kv_scales(
    loaded: Any, kv_cache_dtype: str, headroom: float = CALIBRATION_HEADROOM
) -> Scales:
    """Per attention layer of ``loaded.model``: float32 K and V scales [H_kv] from the
    largest |K| and |V| of each KV head over :func:`calibration_text`."""
    model, device = loaded.model, loaded.device
    storage = kv_storage_dtype(kv_cache_dtype, loaded.dtype)
    vocab = model.spec.vocab_size
    ids = [i % vocab for i in loaded.tokenizer.encode(calibration_text())]
    ids = ids[: min(CALIBRATION_TOKENS, loaded.max_model_len)]
    tokens = torch.tensor(ids, dtype=torch.long, device=device)  # [T]
    positions = torch.arange(len(ids), device=device)  # [T]
    if model.accepts_images:
        positions = positions.expand(3, -1)  # [3, T] M-RoPE rows of plain text
    model.set_attention_backend(TorchBackend())  # the model runner sets its own after this
    layers = model.attention_layers()
    for attn in layers:
        attn.static_kv_scales = None
        attn.allocate_cache(len(ids), loaded.dtype, "auto", device)
    slots = torch.arange(len(ids), device=device)
    md = AttentionMetadata(slot_mapping=slots, prefills=[PrefillChunk(0, len(ids))])
    with attention_metadata(md):
        model(tokens, positions)
    scales = []
    for i, attn in enumerate(layers):
        amax = [c.float().abs().amax(dim=(0, 2)).cpu() for c in (attn.k_cache, attn.v_cache)]
        if not all(bool(a.isfinite().all()) for a in amax):
            raise ValueError(
                f"kv_cache_scales='calibrate': layer {i}'s K/V are not finite over the "
                "calibration text (the model's activations overflow); load it with "
                "compute_dtype='float32' or use kv_cache_scales='dynamic'"
            )
        scales.append(tuple(static_scale(a, storage, headroom) for a in amax))
        attn.allocate_cache(0, loaded.dtype, "auto", device)  # the runner allocates the real one
    return scales  # type: ignore[return-value]
