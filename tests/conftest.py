"""Shared test set-up: never touch the network, and build tiny checkpoints on demand."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import torch  # noqa: E402  (importing torch does not import triton)

# Set before anything imports huggingface_hub / transformers, which read them at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Servers started by tests open the default tenant store ($AUTOGLM_HOME/autoglm.db): keep it
# out of the user's home, in a directory of this test run, removed when the run ends.
os.environ["AUTOGLM_HOME"] = tempfile.mkdtemp(prefix="autoglm-test-home-")
atexit.register(shutil.rmtree, os.environ["AUTOGLM_HOME"], ignore_errors=True)
# The Triton kernels (auto_glm.kernels.triton) run on CPU tensors only in triton's
# interpreter, which triton reads as it is first imported (transformers imports it): switch
# it on before any test module loads. On a CUDA machine they compile for the GPU instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402

MakeCheckpoint = Callable[..., Path]


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> MakeCheckpoint:
    """``make_checkpoint(architecture, seed=0, **config_overrides) -> Path``.

    Keyword-only build options ``max_shard_size``, ``dtype`` (default float32) and
    ``tokenizer`` go to :func:`build_random_checkpoint`. Same arguments return the same
    directory for the whole session, so treat it as read-only (copy it before damaging it).
    """
    built: dict[str, Path] = {}

    def make(
        architecture: str,
        seed: int = 0,
        *,
        max_shard_size: int | str | None = None,
        dtype: Any = None,
        tokenizer: bool = True,
        **overrides: Any,
    ) -> Path:
        # Imported here so a broken builder fails only the tests that need checkpoints.
        import torch

        from auto_glm.checkpoints import build_random_checkpoint

        dtype = dtype or torch.float32
        options = (architecture, seed, max_shard_size, dtype, tokenizer)
        key = repr((options, sorted(overrides.items())))
        if key not in built:
            directory = tmp_path_factory.mktemp(architecture)
            built[key] = build_random_checkpoint(
                directory,
                architecture,
                overrides,
                seed=seed,
                dtype=dtype,
                tokenizer=tokenizer,
                max_shard_size=max_shard_size,
            )
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint) -> Path:
    """The tiny GLM-4 checkpoint most server tests serve."""
    return make_checkpoint("Glm4ForCausalLM")
