"""The random-checkpoint builders: deterministic, real HF format, GLM-4-style tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from auto_glm.checkpoints import (
    ARCHITECTURE_CONFIGS,
    build_random_checkpoint,
    build_tokenizer,
    demo_model_path,
)


def _contents(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def test_tokenizer_is_deterministic(tmp_path: Path) -> None:
    build_tokenizer(tmp_path / "a", vocab_size=700)
    build_tokenizer(tmp_path / "b", vocab_size=700)
    assert _contents(tmp_path / "a") == _contents(tmp_path / "b")
    assert "tokenizer.json" in _contents(tmp_path / "a")


def test_checkpoint_is_deterministic(tmp_path: Path) -> None:
    first = build_random_checkpoint(tmp_path / "a", "Glm4ForCausalLM", {"num_hidden_layers": 1})
    again = build_random_checkpoint(tmp_path / "b", "Glm4ForCausalLM", {"num_hidden_layers": 1})
    other = build_random_checkpoint(
        tmp_path / "c", "Glm4ForCausalLM", {"num_hidden_layers": 1}, seed=1
    )
    assert _contents(first) == _contents(again)
    assert _contents(first)["model.safetensors"] != _contents(other)["model.safetensors"]


def test_unknown_architecture_lists_builders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no random checkpoint builder for 'GPT2LMHeadModel'"):
        build_random_checkpoint(tmp_path, "GPT2LMHeadModel", {})


def test_tokenizer_too_small(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        build_tokenizer(tmp_path, vocab_size=100)


@pytest.mark.parametrize("architecture", list(ARCHITECTURE_CONFIGS))
def test_config_and_vocab(make_checkpoint, architecture: str) -> None:
    path = make_checkpoint(architecture, hidden_size=96, num_attention_heads=6)
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert config.architectures == [architecture]
    assert (config.hidden_size, config.num_attention_heads, config.head_dim) == (96, 6, 16)
    assert max(tokenizer.get_vocab().values()) < config.vocab_size
    generation = json.loads((path / "generation_config.json").read_text())
    glm_stops = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    assert generation["eos_token_id"] == glm_stops


def test_glm4_chat_template(make_checkpoint) -> None:
    tokenizer = AutoTokenizer.from_pretrained(make_checkpoint("Glm4ForCausalLM"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(ids[:3]) == ["[gMASK]", "<sop>", "<|system|>"]
    assert tokenizer.convert_ids_to_tokens(ids[-1:]) == ["<|assistant|>"]


def test_demo_model_built_once_and_reused(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("AUTOGLM_CACHE", str(tmp_path))
    path = demo_model_path()
    assert path == tmp_path / "demo-glm4-v1"
    assert "building the demo model" in capsys.readouterr().err
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert demo_model_path() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["demo-glm4-v1"]  # no staging left over
    config = AutoConfig.from_pretrained(path)
    assert config.architectures == ["Glm4ForCausalLM"] and config.vocab_size == 8192
    assert len(AutoTokenizer.from_pretrained(path)) == 8192
