"""Load the checkpoint's own tokenizer, without running repository code."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from auto_glm.loader.errors import ModelLoadError

__all__ = ["TOKENIZER_FILES", "load_tokenizer"]

# Any one of these is enough for AutoTokenizer to build a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer stored next to the weights in ``path``."""
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"model directory {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
            "copy them from the original model repository"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (ValueError, OSError, KeyError, TypeError, ImportError) as exc:
        raise ModelLoadError(
            f"could not load the tokenizer in {path} ({exc}); re-download the tokenizer "
            "files, or use the transformers-native version of the model"
        ) from exc
    # A fast tokenizer drops the truncation and padding its tokenizer.json may set on its
    # first call, changing its shared Rust object: done here, before threads share it.
    tokenizer.encode("", add_special_tokens=False)
    return tokenizer
