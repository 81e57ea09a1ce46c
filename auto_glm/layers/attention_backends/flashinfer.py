"""The FlashInfer backend: FlashInfer's paged decode and prefill kernels (the ``gpu`` extra,
``pip install 'open-autoglm[gpu]'``; the package is imported when the backend is built).

It reads the cache every backend lays out, ``[num_slots, H_kv, D]``, as FlashInfer's NHD
pages ``[num_blocks, block_size, H_kv, D]``, so a block is a page. Each step is planned
once, on the host, from its pages as compressed sparse rows
(:mod:`~auto_glm.layers.attention_backends.paged_csr`); every layer then runs the planned
wrappers: one decode launch for the step's decodes, one prefill launch for all of its
prefill chunks (causal, each chunk's queries aligned to the end of its keys).

Decode graphs (:mod:`auto_glm.engine.cuda_graphs`) get a graph-mode wrapper per batch
bucket over buffers of their own, planned before each replay (:meth:`prepare_decode`).
A plan rewrites its wrapper's pinned staging memory and queues a copy of it to the device,
so it first waits for the copy its wrapper's last plan queued: when the engine plans a step
while the one before runs, that copy sits right behind the step it has already read back,
so the wait is short and the device keeps its queue.

Only float16 and bfloat16 models with a cache in the model's dtype (``kv_cache_dtype``
``auto``) and head_dim 64, 128 or 256 run here: :func:`problem` says why another cannot.
FlashInfer compiles its kernels with nvcc the first time a plan asks for them, so where
there is no nvcc (:func:`find_nvcc`: most machines whose CUDA comes with torch's wheels)
the model's kernels must be prebuilt (:func:`kernel_specs`, which
benchmarks/flashinfer_prebuild.py builds ahead) or compiled here before.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from auto_glm.layers.attention_backends.base import AttentionBackend, StepLayout
from auto_glm.layers.attention_backends.paged_csr import (
    PagedCsr,
    padded_tables,
    paged_csr,
    query_starts,
)
from auto_glm.platforms.transfer import pinned, tensor_on, to_device

if TYPE_CHECKING:
    from auto_glm.layers.attention import Attention

__all__ = [
    "HEAD_DIMS",
    "FlashInferBackend",
    "FlashInferMetadata",
    "find_nvcc",
    "kernel_specs",
    "problem",
]

HEAD_DIMS = (64, 128, 256)
DTYPES = (torch.float16, torch.bfloat16)
# the float scratch of split-K decodes and prefills, shared by all of a backend's wrappers
# (one step runs at a time); FlashInfer's documentation recommends 128 MiB
WORKSPACE_BYTES = 128 << 20
# decode on tensor cores above this many query heads per KV head
_TENSOR_CORE_GROUP = 4
# the oldest GPUs FlashInfer's kernels run on (Turing)
MIN_CAPABILITY = (7, 5)
# where FlashInfer looks for the CUDA toolkit when neither CUDA_HOME nor PATH names one
DEFAULT_CUDA_HOME = Path("/usr/local/cuda")


def find_nvcc() -> Path | None:
    """The nvcc that FlashInfer would compile its kernels with, looked for as it does:
    ``$CUDA_HOME`` (or ``$CUDA_PATH``) when set, else the one on ``PATH``, else
    :data:`DEFAULT_CUDA_HOME`; None where it is not there."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home:
        on_path = shutil.which("nvcc")
        if on_path is not None:
            return Path(on_path)
    nvcc = Path(home or DEFAULT_CUDA_HOME, "bin", "nvcc")
    return nvcc if nvcc.is_file() else None


def kernel_specs(dtype: torch.dtype, head_dim: int, hopper: bool) -> list:
    """FlashInfer's kernel modules that this backend's plans ask for: no rotary, sliding
    window or soft cap inside the kernel (the model applies rotary), int32 page indices, q,
    K/V and output in the model's dtype. Decode with tensor cores (more than
    ``_TENSOR_CORE_GROUP`` query heads per KV head) runs on the FA2 prefill module; prefill
    runs on FA3 on Hopper, else on FA2."""
    from flashinfer.jit.attention import gen_batch_decode_module, gen_batch_prefill_module

    shape = (dtype, dtype, dtype, torch.int32, head_dim, head_dim, 0, False, False)
    specs = [gen_batch_decode_module(*shape), gen_batch_prefill_module("fa2", *shape, False)]
    if hopper:
        specs.append(gen_batch_prefill_module("fa3", *shape, False))
    return specs


def _build_problem(dtype: torch.dtype, head_dim: int, hopper: bool) -> str | None:
    """None where FlashInfer can compile this model's kernels here, or has them built
    already (prebuilt, or compiled by an earlier run), else why not."""
    if find_nvcc() is not None:
        return None
    try:
        specs = kernel_specs(dtype, head_dim, hopper)
    except (ImportError, RuntimeError) as exc:  # RuntimeError: it refuses the GPU
        return f"the flashinfer package does not load ({exc}); reinstall 'open-autoglm[gpu]'"
    unbuilt = [spec.name for spec in specs if not spec.is_compiled]
    if not unbuilt:
        return None
    return (
        f"FlashInfer compiles its kernels with nvcc on first use, and there is no nvcc here "
        f"(none in $CUDA_HOME, on PATH or in {DEFAULT_CUDA_HOME}), nor are {len(unbuilt)} of "
        "this model's kernels built yet; install the CUDA toolkit's nvcc, or build the "
        "kernels ahead on a machine that has one (benchmarks/flashinfer_prebuild.py)"
    )


def problem(
    device: torch.device, head_dim: int, dtype: torch.dtype, kv_cache_dtype: str
) -> str | None:
    """None if this backend can serve such a model on ``device``, else why not."""
    if device.type != "cuda":
        return f"FlashInfer's kernels run on CUDA GPUs only, not on {device}"
    if importlib.util.find_spec("flashinfer") is None:
        return "the flashinfer package is not installed (pip install 'open-autoglm[gpu]')"
    if dtype not in DTYPES:
        name = str(dtype).removeprefix("torch.")
        return f"its kernels take float16 and bfloat16 models, not {name} (--dtype)"
    if kv_cache_dtype != "auto":
        quantized = f"kv_cache_dtype={kv_cache_dtype!r}"
        return f"its kernels read a cache in the model's dtype, not a {quantized} one"
    if head_dim not in HEAD_DIMS:
        dims = ", ".join(map(str, HEAD_DIMS))
        return f"its kernels take head_dim {dims}, not this model's {head_dim}"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        need, found = (".".join(map(str, c)) for c in (MIN_CAPABILITY, capability))
        return f"its kernels need compute capability {need} or newer, not {device}'s {found}"
    return _build_problem(dtype, head_dim, hopper=capability[0] == 9)


@dataclass
class FlashInferMetadata:
    """One step's wrappers, planned; or a decode graph's, planned before each replay."""

    slot_mapping: torch.Tensor  # [num_tokens] int64 cache slot written by each token
    num_decodes: int  # rows 0..num_decodes-1 are single-token decodes
    block_size: int
    decode: Any | None  # a planned BatchDecodeWithPagedKVCacheWrapper, if there are decodes
    prefill: Any | None  # a planned BatchPrefillWithPagedKVCacheWrapper, if there are chunks


class FlashInferBackend(AttentionBackend):
    name = "flashinfer"
    supports_decode_graphs = True

    def __init__(self, device: torch.device) -> None:
        self._flashinfer = importlib.import_module("flashinfer")
        self._device = device
        self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._layer: Attention | None = None  # every layer's heads, scale and cache dtype
        # per wrapper (by id), the end of the copies its last plan queued
        self._copied: dict[int, torch.cuda.Event] = {}
        self._decode: Any = None
        self._prefill = self._flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD")

    def bind(self, layers: Sequence[Attention]) -> None:
        shapes = {(a.num_heads, a.num_kv_heads, a.head_dim, a.scale) for a in layers}
        if len(shapes) > 1:
            raise ValueError(
                "attention_backend='flashinfer' plans one step for all layers, but this "
                f"model's layers differ in heads, head_dim or scale ({sorted(shapes)}); "
                "use attention_backend='triton'"
            )
        self._layer = layers[0]
        self._decode = self._decode_wrapper()

    def _decode_wrapper(self, **graph: Any) -> Any:
        """A decode wrapper; graph-mode with ``use_cuda_graph=True`` and its buffers."""
        group = self._geometry.num_heads // self._geometry.num_kv_heads
        return self._flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._workspace, "NHD", use_tensor_cores=group > _TENSOR_CORE_GROUP, **graph
        )

    @property
    def _geometry(self) -> Attention:
        if self._layer is None:
            raise RuntimeError("the FlashInfer backend is used before bind(); use the model runner")
        return self._layer

    def _plan_args(self, block_size: int) -> tuple[tuple[int, int, int, int], dict[str, Any]]:
        """The heads, head_dim and page size every plan takes, and its dtypes and scale."""
        a = self._geometry
        dtype = a.k_cache.dtype  # the model's: the cache is never quantized here
        options = {"q_data_type": dtype, "kv_data_type": dtype, "sm_scale": a.scale}
        return (a.num_heads, a.num_kv_heads, a.head_dim, block_size), options

    def _plan(self, wrapper: Any, *args: Any, **options: Any) -> None:
        """``wrapper.plan(*args, **options)``, once the copies of its last plan have run."""
        copied = self._copied.get(id(wrapper))
        if copied is not None:
            copied.synchronize()
        wrapper.plan(*args, **options)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self._device))
        self._copied[id(wrapper)] = done

    def _pages(self, csr: PagedCsr) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``csr``'s arrays as a plan takes them without the host waiting for the device:
        the row starts and last-page lengths pinned (the plan reads them on the host and
        copies them), the page ids sent to the device now. A graph-mode wrapper copies page
        ids it gets on the host with a blocking copy, which would hold back the launch of a
        step planned ahead until the step before it has run."""
        indptr, indices, last_page_len = csr.tensors()
        device = self._device
        return pinned(indptr, device), to_device(indices, device), pinned(last_page_len, device)

    def _plan_decode(self, wrapper: Any, csr: PagedCsr, block_size: int) -> None:
        shape, options = self._plan_args(block_size)
        self._plan(wrapper, *self._pages(csr), *shape, **options)

    def build_metadata(self, layout: StepLayout, device: torch.device) -> FlashInferMetadata:
        n, bs = layout.num_decodes, layout.block_size

        def pages(sequences: list) -> PagedCsr:
            tables = np.asarray(padded_tables([s.block_table for s in sequences]), np.int32)
            lens = np.asarray([s.context_len + s.query_len for s in sequences], np.int32)
            return paged_csr(tables.reshape(len(sequences), -1), lens, bs)

        decodes, prefills = layout.sequences[:n], layout.sequences[n:]
        decode = prefill = None
        if decodes:
            self._plan_decode(self._decode, pages(decodes), bs)
            decode = self._decode
        if prefills:
            csr = pages(prefills)
            qo = pinned(query_starts([s.query_len for s in prefills]), self._device)
            shape, options = self._plan_args(bs)
            self._plan(self._prefill, qo, *self._pages(csr), *shape, causal=True, **options)
            prefill = self._prefill
        slots = tensor_on(layout.slot_mapping, torch.long, device)
        return FlashInferMetadata(slots, n, bs, decode, prefill)

    def decode_metadata(
        self,
        slot_mapping: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        block_size: int,
    ) -> FlashInferMetadata:
        """A graph-mode wrapper of its own for this batch size; ``block_tables`` and
        ``context_lens`` are read on the host instead (:meth:`prepare_decode`)."""
        batch, width = block_tables.shape
        device = slot_mapping.device

        def ints(size: int) -> torch.Tensor:
            return torch.zeros(size, dtype=torch.int32, device=device)

        wrapper = self._decode_wrapper(
            use_cuda_graph=True,
            paged_kv_indptr_buffer=ints(batch + 1),
            paged_kv_indices_buffer=ints(batch * width),
            paged_kv_last_page_len_buffer=ints(batch),
        )
        return FlashInferMetadata(slot_mapping, batch, block_size, wrapper, None)

    def prepare_decode(
        self, metadata: FlashInferMetadata, tables: np.ndarray, lens: np.ndarray
    ) -> None:
        csr = paged_csr(tables, lens, metadata.block_size)
        self._plan_decode(metadata.decode, csr, metadata.block_size)

    def forward(
        self,
        layer: Attention,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        metadata: FlashInferMetadata,
    ) -> torch.Tensor:
        out = torch.empty_like(q)  # [T, H, D]
        md, n = metadata, metadata.num_decodes
        shape = (-1, md.block_size, layer.num_kv_heads, layer.head_dim)
        pages = (layer.k_cache.view(shape), layer.v_cache.view(shape))  # [blocks, bs, H_kv, D]
        if n:
            md.decode.run(q[:n].contiguous(), pages, out=out[:n])
        if q.shape[0] > n:
            md.prefill.run(q[n:].contiguous(), pages, out=out[n:])
        return out
