"""Device and dtype choices: names, defaults, and the ones refused up front."""

from __future__ import annotations

import pytest
import torch

from auto_glm.loader import ModelLoadError, resolve_device, resolve_dtype

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


def test_float16_on_cpu_works_but_warns() -> None:
    with pytest.warns(UserWarning, match="float16 on the CPU is very slow"):
        assert resolve_dtype("fp16", CPU) == torch.float16


def test_unknown_device() -> None:
    with pytest.raises(ModelLoadError, match="unknown device 'tpu'; use one of: auto, cpu"):
        resolve_device("tpu")


def test_auto_device_prefers_a_gpu() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_index_out_of_range() -> None:
    with pytest.raises(ModelLoadError, match=r"'cuda:99' requested but only \d+ CUDA GPU"):
        resolve_device("cuda:99")
