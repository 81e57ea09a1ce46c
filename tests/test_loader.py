"""load_model on real HF-format checkpoints, and every way a model directory can be wrong."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from auto_glm.loader import ModelLoadError, load_model
from auto_glm.loader.tokenizer import load_tokenizer

architectures = pytest.importorskip("auto_glm.models.architectures")

ARCHITECTURES = [
    "GlmForCausalLM",
    "Glm4ForCausalLM",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
]
CPU = torch.device("cpu")


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "model"))


def _edit_config(path: Path, **changes: object) -> None:
    file = path / "config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def _file_tensors(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _assert_weights_match(loaded: torch.nn.Module, path: Path, dtype: torch.dtype) -> None:
    # Packed (fused) parameters are the model's business; the ones it keeps under the
    # checkpoint's own name must hold exactly the file's values.
    params = dict(loaded.named_parameters())
    shared = [(name, t) for name, t in _file_tensors(path).items() if name in params]
    assert len(shared) >= 4
    for name, tensor in shared:
        assert torch.equal(params[name].detach(), tensor.to(dtype)), name


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_loads_every_architecture(make_checkpoint, architecture: str) -> None:
    path = make_checkpoint(architecture)
    lm = load_model(str(path), device="cpu", dtype="float32")
    assert type(lm.model).__name__ == architecture
    assert not lm.model.training
    assert all(p.dtype == torch.float32 and p.device == CPU for p in lm.model.parameters())
    _assert_weights_match(lm.model, path, torch.float32)
    tok = lm.tokenizer
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    assert lm.eos_token_ids == frozenset(ids)  # from generation_config.json
    assert lm.max_model_len == 512
    assert lm.path == path.resolve() and lm.device == CPU and lm.dtype == torch.float32
    assert tok.decode(tok.encode("Hello 世界")) == "Hello 世界"


def _native_bf16() -> bool:
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def test_default_dtype_is_bfloat16_on_cpu(make_checkpoint) -> None:
    path = make_checkpoint("Glm4ForCausalLM")
    lm = load_model(path, device="cpu")
    assert lm.weight_dtype == torch.bfloat16
    # without native bf16 arithmetic the bf16-rounded weights are computed in float32
    compute = torch.bfloat16 if _native_bf16() else torch.float32
    assert lm.dtype == compute
    assert all(p.dtype == compute for p in lm.model.parameters())
    params = dict(lm.model.named_parameters())
    for name, tensor in _file_tensors(path).items():
        if name in params:  # the upcast is exact: the values are the bf16-rounded file's
            assert torch.equal(params[name], tensor.to(torch.bfloat16).to(compute)), name


def test_compute_dtype_can_keep_bfloat16(make_checkpoint) -> None:
    path = make_checkpoint("Glm4ForCausalLM")
    lm = load_model(path, device="cpu", dtype="bf16", compute_dtype="bfloat16")
    assert lm.dtype == lm.weight_dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in lm.model.parameters())
    _assert_weights_match(lm.model, path, torch.bfloat16)
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        load_model(path, device="cpu", compute_dtype="fp8")


def test_sharded_checkpoint(make_checkpoint) -> None:
    path = make_checkpoint("Glm4ForCausalLM", max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    lm = load_model(path, device="cpu", dtype="float32")
    _assert_weights_match(lm.model, path, torch.float32)


def test_tied_embeddings(make_checkpoint) -> None:
    lm = load_model(
        make_checkpoint("Qwen3ForCausalLM", tie_word_embeddings=True), device="cpu", dtype="fp32"
    )
    assert lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()


def test_eos_falls_back_to_config_then_tokenizer(make_checkpoint, tmp_path: Path) -> None:
    path = _copy(make_checkpoint("LlamaForCausalLM"), tmp_path)
    (path / "generation_config.json").unlink()
    eos = load_model(path, device="cpu").tokenizer.eos_token_id
    assert load_model(path, device="cpu").eos_token_ids == frozenset({eos})
    _edit_config(path, eos_token_id=[eos, 6])
    assert load_model(path, device="cpu").eos_token_ids == frozenset({eos, 6})
    _edit_config(path, eos_token_id=None)
    assert load_model(path, device="cpu").eos_token_ids == frozenset({eos})


def test_pickle_refused_then_accepted_with_opt_in(make_checkpoint, tmp_path: Path) -> None:
    path = _copy(make_checkpoint("Qwen2ForCausalLM"), tmp_path)
    torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with pytest.raises(
        ModelLoadError,
        match=r"pytorch_model\.bin is a pickle checkpoint.*"
        r"convert it to safetensors, or pass allow_pickle=True",
    ):
        load_model(path, device="cpu")
    lm = load_model(path, device="cpu", dtype="float32", allow_pickle=True)
    _assert_weights_match(lm.model, make_checkpoint("Qwen2ForCausalLM"), torch.float32)


def test_a_tokenizer_json_with_truncation_is_settled_before_it_is_shared(
    make_checkpoint, tmp_path: Path
) -> None:
    # A fast tokenizer drops such settings from its shared Rust object on its first call;
    # two server threads making that first call at once could collide there.
    path = _copy(make_checkpoint("Glm4ForCausalLM"), tmp_path)
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["truncation"] = {
        "direction": "Right",
        "max_length": 8,
        "strategy": "LongestFirst",
        "stride": 0,
    }
    (path / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = load_tokenizer(path)
    assert tokenizer.backend_tokenizer.truncation is None
    assert len(tokenizer.encode("word " * 50, add_special_tokens=False)) > 8  # untruncated


# --- error paths: each names the problem and the fix ------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model directory .*nope does not exist"):
        load_model(str(tmp_path / "nope"))


def test_file_instead_of_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="is a file; pass the model directory"):
        load_model(tmp_path / "config.json")


def test_missing_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"has no config\.json; pass a Hugging Face model"):
        load_model(tmp_path)


def test_corrupt_config(make_checkpoint, tmp_path: Path) -> None:
    path = _copy(make_checkpoint("Glm4ForCausalLM"), tmp_path)
    (path / "config.json").write_text('{"model_type": "glm4",')
    with pytest.raises(ModelLoadError, match=r"config\.json is not valid JSON .*re-download"):
        load_model(path)


def test_missing_weights(make_checkpoint, tmp_path: Path) -> None:
    path = _copy(make_checkpoint("Glm4ForCausalLM"), tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no weights in .*expected model\.safetensors"):
        load_model(path)


def test_missing_shard(make_checkpoint, tmp_path: Path) -> None:
    path = _copy(make_checkpoint("Glm4ForCausalLM", max_shard_size="60KB"), tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=rf"shard {shard.name} listed in .* is missing"):
        load_model(path)


def test_truncated_safetensors(make_checkpoint, tmp_path: Path) -> None:
    path = _copy(make_checkpoint("Glm4ForCausalLM"), tmp_path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(
        ModelLoadError,
        match=r"model\.safetensors is corrupt or truncated .*"
        r"re-download it",
    ):
        load_model(path)


def _overwrite_tensor(file: Path, name: str, fill: bytes, length: int = 64) -> None:
    """Overwrite the first ``length`` bytes of tensor ``name``'s data in place with ``fill``
    repeated: a safetensors file is an 8-byte little-endian header length, a JSON header
    whose ``data_offsets`` are relative to the end of the header, then the data."""
    raw = bytearray(file.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + header_len])[name]["data_offsets"]
    length = min(length, end - begin)
    start = 8 + header_len + begin
    raw[start : start + length] = (fill * length)[:length]
    file.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    ("file_dtype", "fill", "found"),
    [
        # 64 bytes: 16 float32 values (0xFF.. is a NaN, 0x7f800000 is +inf), 32 bfloat16 ones
        (torch.float32, b"\xff", "holds 16 NaN and 0 infinite"),
        (torch.float32, struct.pack("<f", float("inf")), "holds 0 NaN and 16 infinite"),
        (torch.bfloat16, b"\xff", "holds 32 NaN and 0 infinite"),
    ],
    ids=["nan", "inf", "nan-bfloat16-file"],
)
def test_non_finite_weights_are_refused(
    make_checkpoint, tmp_path: Path, file_dtype: torch.dtype, fill: bytes, found: str
) -> None:
    path = _copy(make_checkpoint("Glm4ForCausalLM", dtype=file_dtype), tmp_path)
    weights = path / "model.safetensors"
    _overwrite_tensor(weights, "model.norm.weight", fill)
    for dtype in ("float32", "bfloat16"):
        with pytest.raises(ModelLoadError) as info:
            load_model(path, device="cpu", dtype=dtype)
        message = str(info.value)
        assert message.startswith(f"{weights.resolve()}: tensor model.norm.weight {found} values")
        assert message.endswith("the file is corrupt; re-download the model")


def test_non_finite_weights_in_a_shard_name_the_shard(make_checkpoint, tmp_path: Path) -> None:
    path = _copy(make_checkpoint("Glm4ForCausalLM", max_shard_size="60KB"), tmp_path)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = path / index["weight_map"]["model.layers.1.mlp.down_proj.weight"]
    _overwrite_tensor(shard, "model.layers.1.mlp.down_proj.weight", b"\xff", length=4)
    with pytest.raises(
        ModelLoadError,
        match=rf"{shard.name}: tensor model\.layers\.1\.mlp\.down_proj\.weight holds 1 NaN",
    ):
        load_model(path, device="cpu", dtype="float32")


@pytest.mark.filterwarnings("ignore:float16 on the CPU is very slow")
def test_weights_overflowing_the_dtype_are_refused(make_checkpoint, tmp_path: Path) -> None:
    # 1e5 is finite in the float32 file but past float16's largest value (65504)
    path = _copy(make_checkpoint("Glm4ForCausalLM"), tmp_path)
    _overwrite_tensor(path / "model.safetensors", "model.norm.weight", struct.pack("<f", 1e5), 4)
    with pytest.raises(
        ModelLoadError,
        match=r"tensor model\.norm\.weight is finite in the file \(float32\) but overflows "
        r"float16 \(largest magnitude 1e\+05\); load the model with dtype='bfloat16'",
    ):
        load_model(path, device="cpu", dtype="float16")
    load_model(path, device="cpu", dtype="bfloat16")  # bfloat16 has float32's range


def test_non_finite_pickle_weights_are_refused(make_checkpoint, tmp_path: Path) -> None:
    path = _copy(make_checkpoint("Qwen2ForCausalLM"), tmp_path)
    state = load_file(path / "model.safetensors")
    state["model.norm.weight"][3] = float("nan")
    torch.save(state, path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"pytorch_model\.bin: tensor model\.norm\.weight"):
        load_model(path, device="cpu", allow_pickle=True)


def test_weights_not_matching_config(make_checkpoint, tmp_path: Path) -> None:
    path = _copy(make_checkpoint("LlamaForCausalLM"), tmp_path)
    _edit_config(path, intermediate_size=96)
    with pytest.raises(ModelLoadError, match="do not match config.json"):
        load_model(path, device="cpu")


def test_unsupported_architecture_lists_supported(make_checkpoint, tmp_path: Path) -> None:
    path = _copy(make_checkpoint("LlamaForCausalLM"), tmp_path)
    _edit_config(path, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(ModelLoadError, match="MistralForCausalLM") as info:
        load_model(path)
    assert all(arch in str(info.value) for arch in architectures.SUPPORTED_ARCHITECTURES)


def test_unsupported_config_feature(make_checkpoint, tmp_path: Path) -> None:
    path = _copy(make_checkpoint("LlamaForCausalLM"), tmp_path)
    _edit_config(path, hidden_act="gelu")
    with pytest.raises(ModelLoadError, match="hidden_act"):
        load_model(path)


def test_remote_code_config_refused(tmp_path: Path) -> None:
    config = {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="custom Python code.*never runs") as info:
        load_model(tmp_path)
    assert all(arch in str(info.value) for arch in architectures.SUPPORTED_ARCHITECTURES)


def test_unknown_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"model_type": "no-such-model"}')
    with pytest.raises(ModelLoadError, match="transformers does not know; supported"):
        load_model(tmp_path)


def test_missing_tokenizer(make_checkpoint, tmp_path: Path) -> None:
    path = _copy(make_checkpoint("Glm4ForCausalLM"), tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).unlink()
    with pytest.raises(ModelLoadError, match="has no tokenizer files .*copy them"):
        load_model(path)


def test_hub_id_offline() -> None:
    repo = "autoglm-tests/no-such-model"
    expected = (
        f"could not fetch '{repo}' from the Hugging Face Hub (offline: HF_HUB_OFFLINE=1); "
        "download it on a connected machine and pass the local directory"
    )
    with pytest.raises(ModelLoadError) as info:
        load_model(repo)
    assert str(info.value) == expected


@pytest.mark.parametrize("bad", ["float8", "int8", torch.float64])
def test_unknown_dtype(bad: object, make_checkpoint) -> None:
    with pytest.raises(ModelLoadError, match="dtype .*use .*float32.*bfloat16.*float16"):
        load_model(make_checkpoint("Glm4ForCausalLM"), dtype=bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_requested_without_gpu(device: str, make_checkpoint) -> None:
    with pytest.raises(
        ModelLoadError,
        match=rf"device '{device}' requested but no CUDA GPU is "
        r"available .*use --device cpu",
    ):
        load_model(make_checkpoint("Glm4ForCausalLM"), device=device)
