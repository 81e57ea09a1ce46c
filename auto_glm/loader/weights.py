"""Locate and stream checkpoint tensors, one at a time, in the compute dtype.

Every floating tensor is checked for NaN and infinity as it streams in (a corrupt file
or a dtype it overflows), so a broken checkpoint fails at load, naming the tensor.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from auto_glm.loader.config import read_json
from auto_glm.loader.errors import ModelLoadError

__all__ = ["WeightFiles", "find_weight_files", "iter_weights"]

_SAFE_INDEX, _SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
_PICKLE_INDEX, _PICKLE_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"


@dataclass(frozen=True)
class WeightFiles:
    """The checkpoint's weight files in load order.

    ``num_tensors`` is known up front for safetensors (from the headers) and ``None``
    for pickle files, which must be read whole to be counted.
    """

    files: tuple[Path, ...]
    safetensors: bool
    num_tensors: int | None


def _corrupt(file: Path, exc: BaseException) -> ModelLoadError:
    return ModelLoadError(f"{file} is corrupt or truncated ({exc}); re-download it")


def _shards(path: Path, index_name: str) -> tuple[Path, ...]:
    index = path / index_name
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index} has no weight_map; re-download the model")
    shards = tuple(path / name for name in sorted(set(weight_map.values())))
    for shard in shards:
        if not shard.is_file():
            raise ModelLoadError(
                f"shard {shard.name} listed in {index} is missing from {path}; re-download "
                f"the model (all {len(shards)} shards are needed)"
            )
    return shards


def _count_safetensors(files: tuple[Path, ...]) -> int:
    # Opening reads only the header, which also catches truncated files before any
    # memory is spent on the model.
    total = 0
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                total += len(list(handle.keys()))
        except (SafetensorError, OSError) as exc:
            raise _corrupt(file, exc) from exc
    return total


def find_weight_files(path: Path, allow_pickle: bool = False) -> WeightFiles:
    """The weight files in ``path``: safetensors (single or sharded), or opted-in pickle."""
    if (path / _SAFE_INDEX).is_file():
        files = _shards(path, _SAFE_INDEX)
    elif (path / _SAFE_SINGLE).is_file():
        files = (path / _SAFE_SINGLE,)
    else:
        files = ()
    if files:
        return WeightFiles(files, safetensors=True, num_tensors=_count_safetensors(files))

    pickle_name = next(
        (name for name in (_PICKLE_INDEX, _PICKLE_SINGLE) if (path / name).is_file()), None
    )
    if pickle_name is None:
        raise ModelLoadError(
            f"no weights in {path}: expected {_SAFE_SINGLE}, or {_SAFE_INDEX} with its shards; "
            "download the complete model"
        )
    if not allow_pickle:
        raise ModelLoadError(
            f"{path / pickle_name} is a pickle checkpoint, and loading pickle can run "
            "arbitrary code; convert it to safetensors, or pass allow_pickle=True if you "
            "trust its source (CLI: --allow-pickle)"
        )
    if pickle_name == _PICKLE_INDEX:
        files = _shards(path, _PICKLE_INDEX)
    else:
        files = (path / _PICKLE_SINGLE,)
    return WeightFiles(files, safetensors=False, num_tensors=None)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _non_finite(file: Path, name: str, stored: torch.Tensor, dtype: torch.dtype) -> ModelLoadError:
    """Why ``stored`` (as read from ``file``) is unusable once in ``dtype``, and the fix."""
    nan, inf = int(stored.isnan().sum()), int(stored.isinf().sum())
    if nan or inf:
        return ModelLoadError(
            f"{file}: tensor {name} holds {nan} NaN and {inf} infinite values (of "
            f"{stored.numel()}), which no trained model has: the file is corrupt; "
            "re-download the model"
        )
    wider = {torch.float16: "'bfloat16' or 'float32'", torch.bfloat16: "'float32'"}.get(dtype)
    fix = (
        f"load the model with dtype={wider} (CLI: --dtype)"
        if wider
        else "no supported dtype holds it; re-export the checkpoint"
    )
    largest = float(stored.abs().max())
    return ModelLoadError(
        f"{file}: tensor {name} is finite in the file ({_dtype_name(stored.dtype)}) but "
        f"overflows {_dtype_name(dtype)} (largest magnitude {largest:.4g}); {fix}"
    )


def _is_finite(tensor: torch.Tensor) -> bool:
    """No NaN or infinity in ``tensor``. One min/max pass (a NaN propagates to both, an
    infinity is one of them): several times faster on the CPU than ``isfinite().all()``."""
    if not tensor.numel():
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _convert(file: Path, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` in ``dtype``, refusing NaN and infinity: one check, on the narrower of the
    two copies, so a rounding overflow is caught as well as a corrupt file."""
    if not tensor.is_floating_point():  # integer tensors (none in supported models) stay
        return tensor
    converted = tensor.to(dtype)
    if not _is_finite(converted if converted.element_size() <= tensor.element_size() else tensor):
        raise _non_finite(file, name, tensor, dtype)
    return converted


_KeepDtype = Callable[[str], bool]


def _target(name: str, tensor: torch.Tensor, dtype: torch.dtype, keep: _KeepDtype) -> torch.dtype:
    return tensor.dtype if keep(name) else dtype


def _keep_none(name: str) -> bool:
    return False


def _iter_safetensors(
    file: Path, dtype: torch.dtype, keep: _KeepDtype
) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            names = handle.keys()  # a safe_open handle is not iterable itself
            for name in names:
                tensor = handle.get_tensor(name)
                yield name, _convert(file, name, tensor, _target(name, tensor, dtype, keep))
    except (SafetensorError, OSError) as exc:
        raise _corrupt(file, exc) from exc


def _iter_pickle(
    file: Path, dtype: torch.dtype, keep: _KeepDtype
) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelLoadError(
            f"{file} holds objects other than tensors, which are refused even with "
            f"allow_pickle=True ({exc}); convert it to safetensors"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise _corrupt(file, exc) from exc
    if not isinstance(state, dict):
        raise ModelLoadError(f"{file} is not a state dict (found {type(state).__name__})")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ModelLoadError(
                f"{file} entry {name!r} is not a tensor; convert the model to safetensors"
            )
        yield name, _convert(file, name, tensor, _target(name, tensor, dtype, keep))


def iter_weights(
    weights: WeightFiles, dtype: torch.dtype, keep_dtype: _KeepDtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(checkpoint name, CPU tensor in dtype)`` pairs, reading one file at a time.

    Floating tensors whose name ``keep_dtype`` accepts stay in their stored dtype (still
    checked for NaN and infinity): e.g. quantization scales, which must not be rounded.
    """
    read = _iter_safetensors if weights.safetensors else _iter_pickle
    keep = keep_dtype or _keep_none
    for file in weights.files:
        yield from read(file, dtype, keep)
