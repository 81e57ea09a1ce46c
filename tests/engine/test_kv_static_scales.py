"""Static KV scales (kv_cache_scales calibrate / checkpoint) through the engine on a tiny
model: exactly twice the blocks of a bf16 cache in the same memory, compressed-tensors
checkpoints with a kv_cache_scheme (loaded, used, or refused by name), calibration through
continuous batching and the prefix cache (a NaN request's poison scrubbed: see
tests/engine/test_kv_cache_dtype.py)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from auto_glm import GLMModel
from auto_glm.engine.config import EngineConfig
from auto_glm.engine.kv_scales import calibrate_kv_scales
from auto_glm.loader import load_model
from auto_glm.loader.errors import ModelLoadError
from tests.engine.test_kv_cache_dtype import ARCH, VOCAB, _cached_logits
from tests.engine.test_nonfinite import GREEDY
from tests.reference import random_prompts

QUANTIZED = pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8_e4m3"])
KERNEL_OR_TORCH = pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernels", "torch"])
SCHEME = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False}
SCHEME |= {"strategy": "tensor", "group_size": None, "observer": "minmax"}


@pytest.fixture(scope="module")
def path(make_checkpoint):
    return make_checkpoint(ARCH, seed=3, partial_rotary_factor=0.5, head_dim=64)


def _model(path, **options) -> GLMModel:
    return GLMModel(str(path), device="cpu", dtype="float32", **options)


def _write_kv_checkpoint(source, out, scheme, factor=1.0, drop=None):
    """``source`` with a kv_cache_scheme and per-layer k_scale / v_scale (calibrated on the
    float model, times ``factor``; per tensor or per KV head as the scheme's strategy says);
    ``drop`` leaves one tensor out. Returns the per-layer float32 scales written."""
    shutil.copytree(source, out)
    loaded = load_model(source, device="cpu", dtype="float32")
    dtype = "fp8_e4m3" if scheme.get("type") == "float" else "int8"
    scales = calibrate_kv_scales(
        loaded, dtype if scheme.get("type") in ("float", "int") else "int8"
    )
    tensors = load_file(str(out / "model.safetensors"))
    written = []
    for i, pair in enumerate(scales):
        kept = []
        for which, scale in zip("kv", pair, strict=True):
            scale = scale * factor
            if scheme.get("strategy", "tensor") == "tensor":
                scale = scale.max().reshape(1)
            kept.append(scale.expand(pair[0].shape[0]))
            tensors[f"model.layers.{i}.self_attn.{which}_scale"] = scale.float()
        written.append(tuple(kept))
    tensors.pop(drop, None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((out / "config.json").read_text())
    raw["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "quantization_status": "compressed",
        "config_groups": {},
        "kv_cache_scheme": scheme,
    }
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    return written


@pytest.mark.parametrize(
    ("kv_cache_dtype", "scales"),
    [("int8", "calibrate"), ("fp8_e4m3", "calibrate"), ("auto", "checkpoint")],
)
def test_the_same_memory_holds_exactly_twice_the_blocks(path, tmp_path, kv_cache_dtype, scales):
    source = path
    if scales == "checkpoint":
        source = tmp_path / "kv"
        _write_kv_checkpoint(path, source, SCHEME)
    options = {"device": "cpu", "dtype": "bfloat16", "compute_dtype": "bfloat16"}
    with GLMModel(str(path), kv_cache_memory=1 << 20, **options) as model:
        bf16_block = model.engine.core.runner.bytes_per_block
    memory = 23 * bf16_block
    counts = {}
    for name, mode, where in (("auto", "dynamic", path), (kv_cache_dtype, scales, source)):
        with GLMModel(
            str(where), kv_cache_memory=memory, kv_cache_dtype=name, kv_cache_scales=mode,
            **options,
        ) as model:  # fmt: skip
            runner = model.engine.core.runner
            counts[mode] = runner.num_blocks
            layers = model.engine.loaded.model.attention_layers()
            held = sum(
                t.untyped_storage().nbytes()
                for layer in layers
                for t in (layer.k_cache, layer.v_cache)
            )
            assert held == runner.num_blocks * runner.bytes_per_block
            if mode != "dynamic":
                assert all(a.has_static_scales and a.k_scale.stride(0) == 0 for a in layers)
    assert counts[scales] == 2 * counts["dynamic"] == 46


@pytest.mark.parametrize(
    ("type_", "strategy", "storage"),
    [
        ("float", "tensor", "fp8_e4m3"),
        ("float", "attn_head", "fp8_e4m3"),
        ("int", "tensor", "int8"),
    ],
)
def test_checkpoint_scales_load_and_reach_the_layers(path, tmp_path, type_, strategy, storage):
    scheme = SCHEME | {"type": type_, "strategy": strategy}
    written = _write_kv_checkpoint(path, tmp_path / "kv", scheme)
    loaded = load_model(tmp_path / "kv", device="cpu", dtype="float32")
    assert loaded.kv_cache_scheme == storage
    for (k, v), (wk, wv) in zip(loaded.kv_scales, written, strict=True):
        assert torch.equal(k, wk.float()) and torch.equal(v, wv.float())
    if strategy == "attn_head":
        assert any(len(set(k.tolist())) > 1 for k, _ in loaded.kv_scales)
    with _model(tmp_path / "kv", max_num_seqs=2) as model:  # kv_cache_dtype auto
        config = model.engine.config
        assert (config.kv_cache_dtype, config.kv_cache_scales) == (storage, "checkpoint")
        for attn, (wk, _) in zip(
            model.engine.loaded.model.attention_layers(), written, strict=True
        ):
            assert (
                attn.k_cache.dtype == {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}[storage]
            )
            assert torch.equal(attn.k_scale[0], wk.bfloat16()) and attn.k_scale.stride(0) == 0


def test_checkpoint_scales_give_logits_and_tokens_close_to_dynamic_int8(path, tmp_path):
    """Int8 with the checkpoint's (calibrated) scales stays as close to the float cache as
    dynamic int8 does, and greedy generation agrees with dynamic int8's; the same checkpoint
    with scales 20x too small (saturating) is far off, so the scales are what is read."""
    _write_kv_checkpoint(path, tmp_path / "good", SCHEME | {"type": "int"})
    _write_kv_checkpoint(path, tmp_path / "bad", SCHEME | {"type": "int"}, factor=0.05)
    ids = torch.tensor(random_prompts(VOCAB, [96], seed=9)[0])
    errors = {}
    for name, where, kv in (("dynamic", path, "int8"), ("good", tmp_path / "good", "auto"),
                            ("bad", tmp_path / "bad", "auto")):  # fmt: skip
        with _model(where, cpu_kernels=False, kv_cache_dtype=kv) as model:
            ref = _cached_logits(model, ids, "auto")  # the layers keep their static scales
            got = _cached_logits(model, ids, "int8")
        errors[name] = float(((got - ref).abs() / ref.std(dim=-1, keepdim=True)).mean())
    assert errors["good"] < 0.03 and errors["good"] < 3 * errors["dynamic"], errors
    assert errors["bad"] > 5 * errors["good"], errors
    prompts = random_prompts(VOCAB, [12, 30, 7], seed=2)
    tokens = {}
    for name, where, kv in (("dynamic", path, "int8"), ("good", tmp_path / "good", "auto")):
        with _model(where, kv_cache_dtype=kv, max_num_seqs=4) as model:
            tokens[name] = [r.token_ids for r in model.generate_batch(prompts, GREEDY)]
    assert [t[:4] for t in tokens["good"]] == [t[:4] for t in tokens["dynamic"]]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_bits": 4}, "num_bits=4"),
        ({"type": "mxfp"}, "type='mxfp'"),
        ({"type": None}, "type=None"),
        ({"symmetric": False}, "symmetric=False"),
        ({"dynamic": True}, "dynamic=True"),
        ({"strategy": "channel"}, "strategy='channel'"),
        ({"group_size": 128}, "group_size=128"),
    ],
)
def test_unsupported_schemes_are_refused_by_name(path, tmp_path, change, field):
    raw = json.loads((path / "config.json").read_text())
    shutil.copytree(path, tmp_path / "kv")
    raw["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "dense", "config_groups": {},
        "kv_cache_scheme": SCHEME | change,
    }  # fmt: skip
    (tmp_path / "kv" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=f"kv_cache_scheme has {field}.*supported"):
        load_model(tmp_path / "kv", device="cpu", dtype="float32")


def test_conflicting_settings_and_missing_scales_are_refused(path, tmp_path):
    _write_kv_checkpoint(path, tmp_path / "fp8", SCHEME)
    with pytest.raises(ValueError, match="kv_cache_dtype='int8' conflicts.*'fp8_e4m3' or 'auto'"):
        _model(tmp_path / "fp8", kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="kv_cache_scales='calibrate' conflicts"):
        _model(tmp_path / "fp8", kv_cache_dtype="fp8_e4m3", kv_cache_scales="calibrate")
    with pytest.raises(ValueError, match="kv_cache_scales='checkpoint' needs KV scales"):
        _model(path, kv_cache_dtype="int8", kv_cache_scales="checkpoint")
    drop = "model.layers.1.self_attn.v_scale"
    _write_kv_checkpoint(path, tmp_path / "missing", SCHEME, drop=drop)
    with pytest.raises(ModelLoadError, match="no self_attn.v_scale for layer 1"):
        load_model(tmp_path / "missing", device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="kv_cache_scales='calibrate' needs a quantized.*int8"):
        EngineConfig(kv_cache_scales="calibrate")
    with pytest.raises(ValueError, match="kv_cache_scales='static' is not.*dynamic, calibrate"):
        EngineConfig(kv_cache_dtype="int8", kv_cache_scales="static")


@QUANTIZED
@KERNEL_OR_TORCH
def test_calibrated_generation_through_batching_and_the_prefix_cache(path, kv_cache_dtype, kernel):
    prefix = random_prompts(VOCAB, [48], seed=3)[0]
    prompts = [prefix + tail for tail in random_prompts(VOCAB, [5, 9, 13, 17, 30], seed=4)]
    outputs = {}
    for scales in ("dynamic", "calibrate"):
        options = {"max_num_seqs": 4, "max_num_batched_tokens": 32, "cpu_kernels": kernel}
        with _model(path, kv_cache_dtype=kv_cache_dtype, kv_cache_scales=scales, **options) as m:
            first = m.generate_batch(prompts[:1], GREEDY)
            rest = m.generate_batch(prompts[1:], GREEDY)  # 4 at once, chunked prefills
            stats = m.engine.stats()
            static = [a.has_static_scales for a in m.engine.loaded.model.attention_layers()]
        assert stats.prefix_cache_hits >= 4 * 48
        assert all(static) == (scales == "calibrate")
        outputs[scales] = [r.token_ids for r in first + rest]
    got, ref = outputs["calibrate"], outputs["dynamic"]
    assert all(len(tokens) == GREEDY.max_tokens for tokens in got)
    assert sum(g[:2] == r[:2] for g, r in zip(got, ref, strict=True)) >= len(prompts) - 1
