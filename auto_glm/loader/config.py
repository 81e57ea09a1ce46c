"""Read config.json / generation_config.json without ever running repository code."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from auto_glm.loader.errors import ModelLoadError

__all__ = ["read_config", "read_eos_token_ids", "read_json"]


def _supported() -> str:
    from auto_glm.models.architectures import SUPPORTED_ARCHITECTURES

    return ", ".join(SUPPORTED_ARCHITECTURES)


def read_json(file: Path) -> dict[str, Any]:
    """A JSON object from ``file``; a damaged file is named in the error."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{file} is not valid JSON ({exc}); re-download the model or repair the file"
        ) from exc
    if not isinstance(data, dict):
        raise ModelLoadError(
            f"{file} holds a JSON {type(data).__name__}, not an object; re-download the model"
        )
    return data


def read_config(path: Path) -> PretrainedConfig:
    """The transformers config of the model in ``path``."""
    file = path / "config.json"
    if not file.is_file():
        raise ModelLoadError(
            f"model directory {path} has no config.json; pass a Hugging Face model directory "
            "or hub id"
        )
    raw = read_json(file)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        if "auto_map" in raw:
            # e.g. the original THUDM/glm-4-9b-chat (model_type "chatglm") ships its own code.
            raise ModelLoadError(
                f"{file} needs custom Python code from the model repository (model_type "
                f"{model_type!r} with auto_map), which Open-AutoGLM never runs; use the "
                f"transformers-native checkpoint instead (e.g. THUDM/glm-4-9b-chat-hf). "
                f"Supported architectures: {_supported()}"
            )
        raise ModelLoadError(
            f"{file} has model_type {model_type!r}, which transformers does not know; "
            f"supported architectures: {_supported()}"
        )
    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"could not read {file} ({exc}); re-download the model") from exc


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, Iterable) and all(isinstance(v, int) for v in value):
        return list(value)
    raise ModelLoadError(f"eos_token_id {value!r} is neither an int nor a list of ints")


def read_eos_token_ids(path: Path, hf_config: PretrainedConfig, tokenizer: Any) -> frozenset[int]:
    """Token ids that end a generation.

    generation_config.json wins because chat models list every end-of-turn token there
    (GLM-4: end-of-text, <|user|>, <|observation|>); then config.json; then the tokenizer.
    """
    generation = path / "generation_config.json"
    if generation.is_file():
        ids = _ids(read_json(generation).get("eos_token_id"))
        if ids:
            return frozenset(ids)
    ids = _ids(getattr(hf_config, "eos_token_id", None))
    if ids:
        return frozenset(ids)
    return frozenset(_ids(getattr(tokenizer, "eos_token_id", None)))
