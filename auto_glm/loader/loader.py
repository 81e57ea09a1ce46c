"""``load_model``: from a directory or Hub id to a ready, evaluating model and its tokenizer."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PretrainedConfig

from auto_glm.layers.quant import check_w8a8, quantize_linears, resolve_quantization
from auto_glm.loader.compressed_tensors import (
    QuantizedTensors,
    compressed_tensors_mode,
    install_int8_layers,
    is_scale_name,
)
from auto_glm.loader.config import read_config, read_eos_token_ids, read_json
from auto_glm.loader.device import resolve_compute_dtype, resolve_device, resolve_dtype
from auto_glm.loader.errors import ModelLoadError
from auto_glm.loader.image_processor import load_image_processor
from auto_glm.loader.kv_scheme import KvScaleTensors, is_kv_scale_name, kv_cache_scheme_dtype
from auto_glm.loader.paths import resolve_model_path
from auto_glm.loader.tokenizer import load_tokenizer
from auto_glm.loader.weights import find_weight_files, iter_weights

__all__ = ["LoadedModel", "load_model"]

log = logging.getLogger("auto_glm.loader")


@dataclass
class LoadedModel:
    """A model ready for inference, with everything the engine needs to serve it."""

    model: nn.Module
    hf_config: PretrainedConfig
    tokenizer: Any
    path: Path
    device: torch.device
    dtype: torch.dtype  # what the model computes in (and its KV cache holds)
    eos_token_ids: frozenset[int]
    max_model_len: int
    weight_dtype: torch.dtype  # the precision the weights were rounded to
    quantization: str = "none"  # "int8" or "w8a8": linear weights held in INT8
    image_processor: Any = None  # a model that takes images: its checkpoint's processor
    # a compressed-tensors kv_cache_scheme: its kv_cache_dtype, and per attention layer the
    # float32 (K, V) scales [H_kv] (see auto_glm.loader.kv_scheme)
    kv_cache_scheme: str | None = None
    kv_scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # Parameters are created directly in the compute dtype, so a bf16 model never
    # briefly exists in float32 (which would double peak memory).
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(
    model: str | os.PathLike[str],
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    allow_pickle: bool = False,
    revision: str | None = None,
    compute_dtype: str | torch.dtype | None = None,
    quantization: str | None = "none",
    quantize_lm_head: bool = False,
) -> LoadedModel:
    """Load a Hugging Face format checkpoint (local directory or ``owner/name`` Hub id).

    ``dtype`` is ``"float32"``/``"bfloat16"``/``"float16"`` (or fp32/bf16/fp16, a torch
    dtype, ``"auto"``/``None`` for the device default). Pickle weights
    (``pytorch_model.bin``) are refused unless ``allow_pickle=True``. A pre-quantized
    compressed-tensors INT8 checkpoint loads its stored INT8 weights as they are (see
    :mod:`auto_glm.loader.compressed_tensors`); ``quantization`` then must be ``"none"`` or
    its scheme's mode. Every failure is a :class:`ModelLoadError` naming the problem and
    the fix.
    """
    # Cheap argument checks first, so a typo fails before any download or allocation.
    target = resolve_device(device)
    weight_dtype = resolve_dtype(dtype, target)
    compute = resolve_compute_dtype(compute_dtype, weight_dtype, target)
    try:
        quantization = resolve_quantization(quantization)
        if quantization == "w8a8":
            check_w8a8(target)
        if quantize_lm_head and quantization == "none":
            raise ValueError(
                "quantize_lm_head=True asks for an INT8 lm_head but quantization='none'; "
                "pass quantization='int8' or 'w8a8' with it"
            )
    except ValueError as exc:
        raise ModelLoadError(str(exc)) from exc
    if compute != weight_dtype:
        log.info(
            "%s weights compute in %s on this %s (no native %s arithmetic); pass "
            "compute_dtype=%r to keep %s math",
            weight_dtype,
            compute,
            target.type,
            weight_dtype,
            str(weight_dtype).removeprefix("torch."),
            weight_dtype,
        )
    path = resolve_model_path(model, revision=revision, allow_pickle=allow_pickle)
    hf_config = read_config(path)
    stored = _stored_quantization(path, target, quantization, quantize_lm_head)
    kv_scheme = kv_cache_scheme_dtype(read_json(path / "config.json"), path / "config.json")

    from auto_glm.models.architectures import resolve_model_class

    try:
        model_cls = resolve_model_class(hf_config)
    except ValueError as exc:
        raise ModelLoadError(f"{path / 'config.json'}: {exc}") from exc
    # a multimodal config keeps its text model's fields in text_config
    max_model_len = getattr(hf_config.get_text_config(), "max_position_embeddings", None)
    if not isinstance(max_model_len, int) or max_model_len < 1:
        raise ModelLoadError(
            f"{path / 'config.json'} has no usable max_position_embeddings "
            f"({max_model_len!r}); add the model's context length there"
        )
    weights = find_weight_files(path, allow_pickle=allow_pickle)
    tokenizer = load_tokenizer(path)
    image_processor = load_image_processor(path) if model_cls.accepts_images else None

    with torch.device(target), _default_dtype(compute):
        module = model_cls(hf_config)
    quantized = QuantizedTensors() if stored else None
    kv_tensors = KvScaleTensors() if kv_scheme else None

    def keep(name: str) -> bool:  # INT8 weight scales and KV scales stay as stored
        return (stored is not None and is_scale_name(name)) or is_kv_scale_name(name)

    stream = tqdm(
        # rounded to dtype, then copied up to compute
        iter_weights(weights, weight_dtype, keep),
        total=weights.num_tensors,
        desc=f"loading {path.name}",
        unit="tensor",
        disable=None,  # None: shown only when stderr is a terminal
    )
    source = stream if kv_tensors is None else kv_tensors.split(stream)
    try:
        with torch.no_grad():
            if quantized is None:
                module.load_weights(source)
            else:
                module.load_weights(quantized.split(source), quantized.weight_names())
                count = install_int8_layers(
                    module, quantized, stored, module.packed_modules, target
                )
                log.info("loaded %d INT8 linear layers of %s (%s)", count, path.name, stored)
                quantization = stored
            kv_scales = None
            if kv_tensors is not None:
                spec = module.spec
                kv_scales = kv_tensors.per_layer(spec.num_layers, spec.num_kv_heads)
    except ModelLoadError:  # a damaged weight file, already explained
        raise
    except ValueError as exc:
        raise ModelLoadError(
            f"weights in {path} do not match config.json ({exc}); re-download the model"
        ) from exc
    finally:
        stream.close()
    if quantization != "none" and stored is None:
        skip = () if quantize_lm_head else (module.lm_head,)
        count = quantize_linears(module, quantization, skip)
        log.info("quantized %d linear layers of %s to %s", count, path.name, quantization)
    module.eval().requires_grad_(False)
    return LoadedModel(
        model=module,
        hf_config=hf_config,
        tokenizer=tokenizer,
        path=path,
        device=target,
        dtype=compute,
        eos_token_ids=read_eos_token_ids(path, hf_config, tokenizer),
        max_model_len=max_model_len,
        weight_dtype=weight_dtype,
        quantization=quantization,
        image_processor=image_processor,
        kv_cache_scheme=kv_scheme,
        kv_scales=kv_scales,
    )


def _stored_quantization(
    path: Path, target: torch.device, quantization: str, quantize_lm_head: bool
) -> str | None:
    """The INT8 mode a pre-quantized (compressed-tensors) checkpoint in ``path`` is stored
    in, or ``None`` for a float checkpoint; refuses a conflicting ``quantization``."""
    file = path / "config.json"
    stored = compressed_tensors_mode(read_json(file), file)
    if stored is None:
        return None
    if quantization not in ("none", stored):
        raise ModelLoadError(
            f"quantization={quantization!r} conflicts with {file}, which is pre-quantized "
            f"as {stored!r} (compressed-tensors); pass quantization={stored!r} or leave it "
            "unset ('none')"
        )
    if quantize_lm_head:
        raise ModelLoadError(
            f"quantize_lm_head=True cannot apply to {file}: in a pre-quantized checkpoint "
            "lm_head's precision is fixed by quantization_config (its 'ignore' list); drop "
            "quantize_lm_head"
        )
    if stored == "w8a8":
        try:
            check_w8a8(target)
        except ValueError as exc:
            raise ModelLoadError(
                f"{file} is pre-quantized as 'w8a8' (INT8 weights and activations), which "
                f"cannot run here ({exc}); load an unquantized or a weight-only INT8 "
                "checkpoint of the model instead"
            ) from exc
    return stored
