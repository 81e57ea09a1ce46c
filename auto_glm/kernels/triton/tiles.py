"""How the paged decode kernel tiles its work (:class:`DecodeTiles`), and the tilings measured
fastest on a card model, which the launcher uses on that card.

``benchmarks/bench_decode_kernel.py --write-tuned`` times a grid of tilings on the GPU it
runs on and records the fastest at each batch size in :data:`TUNED_TILES_FILE`, under a key
naming the card, the query and cache dtypes and the attention's shape (query and KV heads,
head dim: :func:`tuned_key`), so a model of another shape keeps the defaults. The
launcher then takes, for a batch of B sequences, the entry with the smallest ``max_batch``
that holds B (the last one past them all); with no entry for its key, :class:`DecodeTiles`'s
defaults. A tiling changes the order in which scores are summed, so it is read from the file
once per process and fixed per batch size: the same batch gives the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "TUNED_TILES_FILE",
    "DecodeTiles",
    "pick_tiles",
    "read_tuned_tiles",
    "tuned_key",
    "tuned_tiles",
    "write_tuned_tiles",
]

TUNED_TILES_FILE = Path(__file__).with_name("decode_tiles.json")


@dataclass(frozen=True)
class DecodeTiles:
    """How the decode kernel splits its work: ``block_n`` keys per tile (a power of two, at
    least 16), ``num_warps`` per program, ``num_stages`` of software pipelining of its
    loads (triton's option; the interpreter ignores it; fewer where the GPU's shared memory
    is short, see :mod:`~auto_glm.kernels.triton.staged`), and ``heads_first``: the KV head
    as the grid's first axis, so that the programs of one sequence's heads start together.
    The default keeps one K/V tile in flight while the one before is computed on (5 stages:
    at 3, sm_90 builds wait for every copy at each tile), with no register spill for float
    caches at head dims 64 to 256 in sm_90 builds (ptxas -v, 48-80 registers, 19-150 KB of
    shared memory); ``benchmarks/bench_decode_kernel.py`` times others on a GPU.

    ``packed_heads``: one program for all KV heads of a sequence (or split), reading whole
    cache rows (:func:`~auto_glm.kernels.triton.decode.decode_packed_kernel`); its tiles
    hold ``block_n`` keys of every KV head, so ``block_n`` may go down to 1 there, as long as
    ``block_n`` x KV heads is from 16 to 256 rows. Float caches only."""

    block_n: int = 32
    num_warps: int = 8
    num_stages: int = 5
    heads_first: bool = False
    packed_heads: bool = False

    def __post_init__(self) -> None:
        if self.packed_heads and self.heads_first:
            raise ValueError(
                "DecodeTiles: heads_first orders the programs of one sequence's KV heads; with "
                "packed_heads one program holds them all: set one of the two"
            )
        low_n = 1 if self.packed_heads else 16
        powers = {"block_n": (self.block_n, low_n, 256), "num_warps": (self.num_warps, 1, 32)}
        for name, (value, low, high) in powers.items():
            if not (low <= value <= high and value & (value - 1) == 0):
                raise ValueError(
                    f"DecodeTiles: {name}={value} must be a power of two from {low} to {high}"
                )
        if self.num_stages < 1:
            raise ValueError(f"DecodeTiles: num_stages={self.num_stages} must be at least 1")


_DEFAULT = DecodeTiles()
Tuned = dict[str, list[tuple[int, DecodeTiles]]]  # key -> [(max_batch, tiles)], ascending


def tuned_key(
    card: str, q_dtype: torch.dtype, cache_dtype: torch.dtype, shape: tuple[int, int, int]
) -> str:
    """The file's key of a card model (``torch.cuda.get_device_name``), the queries' and the
    cache's dtypes and ``shape`` (query heads, KV heads, head dim), e.g. ``NVIDIA H200,
    q bfloat16, cache bfloat16, H 16, H_kv 8, D 128``."""
    names = [str(dtype).removeprefix("torch.") for dtype in (q_dtype, cache_dtype)]
    heads, kv_heads, head_dim = shape
    return f"{card}, q {names[0]}, cache {names[1]}, H {heads}, H_kv {kv_heads}, D {head_dim}"


def read_tuned_tiles(path: Path) -> Tuned:
    """The tilings recorded in ``path`` (nothing if it does not exist), each key's entries in
    ascending ``max_batch``; a file that does not parse raises ``ValueError`` naming it."""
    if not path.exists():
        return {}
    fields = {f.name for f in dataclasses.fields(DecodeTiles)}
    try:
        raw = json.loads(path.read_text())
        tuned = {
            key: sorted(
                (int(entry["max_batch"]), DecodeTiles(**{f: entry[f] for f in fields}))
                for entry in entries
            )
            for key, entries in raw.items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(
            f"{path} is not a file of decode tilings ({exc!r}); delete it, or write it again "
            "with python benchmarks/bench_decode_kernel.py --write-tuned"
        ) from exc
    return {key: entries for key, entries in tuned.items() if entries}


def write_tuned_tiles(path: Path, key: str, entries: list[tuple[int, DecodeTiles]]) -> None:
    """Record ``entries`` (max_batch, tiles) under ``key`` in ``path``, keeping its other
    keys. The file is replaced whole, so a writer killed midway leaves the old one."""
    raw = json.loads(path.read_text()) if path.exists() else {}
    raw[key] = [
        {"max_batch": max_batch, **dataclasses.asdict(tiles)}
        for max_batch, tiles in sorted(entries, key=lambda entry: entry[0])
    ]
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.write_text(json.dumps(raw, indent=1, sort_keys=True) + "\n")
    os.replace(staging, path)


def tuned_tiles(
    device: torch.device,
    q_dtype: torch.dtype,
    cache_dtype: torch.dtype,
    shape: tuple[int, int, int],
    batch: int,
) -> DecodeTiles:
    """The tiling for a decode of ``batch`` sequences on ``device``: the one recorded for its
    card, dtypes and ``shape`` (query heads, KV heads, head dim; see the module's docstring),
    else the default."""
    if device.type != "cuda":
        return _DEFAULT
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _tuned_for(index, q_dtype, cache_dtype, shape, batch)


@functools.cache
def _card(index: int) -> str:
    return torch.cuda.get_device_name(index)


@functools.cache
def _file() -> Tuned:
    return read_tuned_tiles(TUNED_TILES_FILE)


@functools.cache
def _tuned_for(
    index: int,
    q_dtype: torch.dtype,
    cache_dtype: torch.dtype,
    shape: tuple[int, int, int],
    batch: int,
) -> DecodeTiles:
    entries = _file().get(tuned_key(_card(index), q_dtype, cache_dtype, shape), [])
    return pick_tiles(entries, batch)


def pick_tiles(entries: list[tuple[int, DecodeTiles]], batch: int) -> DecodeTiles:
    """Of ``entries`` (ascending max_batch), the first that holds ``batch``, else the last;
    the default with none."""
    for max_batch, tiles in entries:
        if batch <= max_batch:
            return tiles
    return entries[-1][1] if entries else _DEFAULT
