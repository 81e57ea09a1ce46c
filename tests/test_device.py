"""Device and dtype choices: names, defaults, and the ones refused up front."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import warnings

import pytest
import torch

from auto_glm.loader import ModelLoadError, resolve_compute_dtype, resolve_device, resolve_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("auto", torch.bfloat16),
        (None, torch.bfloat16),
        (torch.float32, torch.float32),
    ],
)
def test_dtype_names(name: object, expected: torch.dtype) -> None:
    assert resolve_dtype(name, CPU) == expected


def test_float16_arithmetic_on_cpu_works_but_warns() -> None:
    with pytest.warns(UserWarning, match="float16 on the CPU is very slow"):
        assert resolve_compute_dtype("fp16", torch.float16, CPU) == torch.float16


def test_float16_weights_compute_in_float32_on_cpu_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_dtype("fp16", CPU) == torch.float16
        assert resolve_compute_dtype(None, torch.float16, CPU) == torch.float32


def test_unknown_device() -> None:
    with pytest.raises(ModelLoadError, match="unknown device 'tpu'; use one of: auto, cpu"):
        resolve_device("tpu")


@pytest.mark.parametrize(("gpus", "expected"), [(2, torch.device("cuda", 0)), (0, CPU)])
def test_auto_device_prefers_a_gpu(
    monkeypatch: pytest.MonkeyPatch, gpus: int, expected: torch.device
) -> None:
    # what torch reports is set here, so the expectation does not come from the code tested
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert resolve_device("auto") == expected


def _driver_lists_a_gpu() -> bool:
    """An NVIDIA GPU per the driver (nvidia-smi, else its device nodes), not per torch."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return bool(glob.glob("/dev/nvidia[0-9]*"))
    done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    return done.returncode == 0 and "GPU 0" in done.stdout


def test_auto_device_on_this_machine() -> None:
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        pytest.skip("CUDA_VISIBLE_DEVICES decides which GPUs torch sees")
    usable = _driver_lists_a_gpu() and torch.version.cuda is not None  # a CUDA build of torch
    assert resolve_device("auto") == (torch.device("cuda", 0) if usable else CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_index_out_of_range() -> None:
    with pytest.raises(ModelLoadError, match=r"'cuda:99' requested but only \d+ CUDA GPU"):
        resolve_device("cuda:99")
