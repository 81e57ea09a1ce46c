"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket, as in nano-vllm
and vLLM.

A step that only decodes (one fed token per request, every request sampled) and fits the
largest bucket runs through persistent buffers allocated once: its inputs are packed on the
host into one int32 buffer (pinned on a GPU) and copied to the device in one transfer, rows
``B..b-1`` are padded up to the bucket ``b``, and the graph captured for ``b`` computes the
whole forward pass and the logits of all ``b`` rows. A padding row feeds token 0 at
position 0 with a context of 1, writing its K/V to a pad block that the block pool never
hands out (the model runner allocates it past the pool's blocks), so no real request sees
it. Where the platform has no CUDA graphs the same padded path runs eagerly
(``replay="eager"``), which is how the CPU tests check it. The attention backend (Triton's or
FlashInfer's) gives each bucket its metadata over these buffers and does its host work
before each step and each capture (``prepare_decode``: FlashInfer plans there).

A fed token's rotary position is its index plus its request's ``rope_offset``: 0, but for a
multimodal model's request after images, whose generated tokens sit at the same M-RoPE
position in all three rows (one row here, which the model takes as plain RoPE).

A step planned ahead (:meth:`Scheduler.schedule_ahead`) feeds tokens the host has not read
yet: the sampled ids of the step before, gathered on the device into the input ids after the
transfer. Two host buffers take turns, so that filling one never races the transfer from the
other: the step two back, which used it, has had its tokens read back by then, so its
transfer is done.

Each host buffer keeps its block tables from one step to the next: a row that held the same
request's blocks when that buffer was last filled gets only the entries added since
(a request's ``block_ids`` list only grows in place until it is freed or readmitted, which
gives it a new list), so the host does not rewrite every row's whole table every step.
"""

from __future__ import annotations

import bisect
import gc
import logging
import time
from typing import Any

import numpy as np
import torch

from auto_glm.engine.plan import SchedulerOutput
from auto_glm.engine.request import Request
from auto_glm.layers.attention import attention_metadata
from auto_glm.layers.attention_backends import AttentionBackend
from auto_glm.models.decoder import CausalLM

__all__ = ["DecodeGraphRunner", "graph_batch_sizes", "pick_batch_size"]

log = logging.getLogger(__name__)

REPLAYS = ("graph", "eager")
# input ids, positions, slots, context lengths, rows of the fed tokens: one [max_bs] segment
# each
_FIELDS = 5


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """The buckets: 1, 2, 4, then multiples of 8, up to and including ``max_num_seqs``."""
    sizes = [b for b in (1, 2, 4) if b < max_num_seqs]
    sizes += range(8, max_num_seqs, 8)
    return [*sizes, max_num_seqs]


def pick_batch_size(sizes: list[int], batch: int) -> int | None:
    """The smallest of ``sizes`` (ascending) that holds ``batch`` rows, or None."""
    index = bisect.bisect_left(sizes, batch)
    return sizes[index] if index < len(sizes) else None


class DecodeGraphRunner:
    """Persistent decode buffers of up to ``max_num_seqs`` rows, and a CUDA graph per bucket;
    the logits stay in the model's compute ``dtype`` (the sampler upcasts them where it must).

    ``max_blocks`` is the block-table width of every step (``max_model_len`` over
    ``block_size``, rounded up): the decode launcher's split-K depends on it, so it stays
    fixed for the graphs. ``pad_block`` is the block id the padding rows write to.
    """

    def __init__(
        self,
        model: CausalLM,
        backend: AttentionBackend,
        *,
        max_num_seqs: int,
        max_blocks: int,
        block_size: int,
        pad_block: int,
        device: torch.device,
        dtype: torch.dtype,
        replay: str = "graph",
    ) -> None:
        if replay not in REPLAYS:
            raise ValueError(f"replay={replay!r} is not a replay mode; use one of {REPLAYS}")
        self.model, self.replay, self.device, self._backend = model, replay, device, backend
        self.max_blocks, self.block_size, self.pad_block = max_blocks, block_size, pad_block
        self.sizes = graph_batch_sizes(max_num_seqs)
        rows = self.sizes[-1]
        self._width = _FIELDS * rows  # the first bucket-independent part of the packed buffer
        size = self._width + rows * max_blocks
        pinned = device.type == "cuda"
        self._hosts = [_HostInputs(size, rows, max_blocks, pinned) for _ in range(2)]
        self._turn = 0  # the host buffer of the next step
        for host in self._hosts:
            host.pad(0, rows, pad_block, block_size)
        dev = self._hosts[0].packed.to(device)  # [5 * max_bs + max_bs * max_blocks] int32
        self._dev = dev
        self.input_ids, self.positions, slots32, self.context_lens, self._fed_rows = dev[
            : self._width
        ].view(_FIELDS, rows)  # each [max_bs]
        self._slots32 = slots32
        self.block_tables = dev[self._width :].view(rows, max_blocks)  # [max_bs, max_blocks]
        self.slot_mapping = torch.zeros(rows, dtype=torch.long, device=device)  # [max_bs]
        vocab = model.spec.vocab_size
        self.logits = torch.zeros(rows, vocab, dtype=dtype, device=device)  # [max_bs, V]
        self._metadata: dict[int, Any] = {
            b: backend.decode_metadata(
                self.slot_mapping[:b], self.block_tables[:b], self.context_lens[:b], block_size
            )
            for b in self.sizes
        }
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def fits(self, plan: SchedulerOutput) -> bool:
        """Whether ``plan`` is a step this runner takes: decodes only, all sampled, at most
        the largest bucket, every block table within ``max_blocks``, and either every token
        in flight or none."""
        if not plan.requests or len(plan.requests) > self.sizes[-1]:
            return False
        if any(n != 1 for n in plan.num_scheduled_tokens):
            return False
        pending = int(plan.feeds_pending)  # the fed token is not in all_token_ids yet
        if pending and not all(plan.pending):
            return False
        return all(
            pos + 1 == req.num_tokens + pending and len(table) <= self.max_blocks
            for req, pos, table in zip(
                plan.requests, plan.start_positions, plan.block_tables, strict=True
            )
        )

    def _prepare(self, batch: int, host: _HostInputs) -> None:
        """The backend's host-side work before a step of ``batch`` rows from ``host``."""
        md = self._metadata[batch]
        self._backend.prepare_decode(md, host.tables[:batch], host.lens[:batch])

    def _forward(self, batch: int) -> None:
        """The captured region: the forward pass of ``batch`` rows and their logits."""
        self.slot_mapping[:batch].copy_(self._slots32[:batch])
        with attention_metadata(self._metadata[batch]):
            hidden = self.model(self.input_ids[:batch], self.positions[:batch])  # [b, hidden]
        self.logits[:batch].copy_(self.model.compute_logits(hidden))

    @torch.inference_mode()
    def run_padding(self, batch: int) -> None:
        """The forward pass of bucket ``batch`` on padding rows only (each writes to the pad
        block): what :meth:`capture` runs before capturing the bucket's graph."""
        self._prepare(batch, self._hosts[0])
        self._forward(batch)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture a graph per bucket, largest first, sharing one memory pool (each after a
        warm-up run, which compiles the kernels); a no-op with ``replay="eager"``.

        Other threads may use the GPU meanwhile (the engines of other models in the same
        process): only this thread's calls are checked (``capture_error_mode="thread_local"``).
        The garbage collector is off while capturing: a collection on this thread could free
        an unreachable engine's graphs, which the driver refuses during a capture."""
        if self.replay != "graph":
            return
        start, total = time.perf_counter(), len(self.sizes)
        pool = None
        collecting = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            for done, batch in enumerate(reversed(self.sizes), 1):
                self.run_padding(batch)  # warm-up: compiles the kernels before the capture
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                    self._forward(batch)
                pool = graph.pool() if pool is None else pool
                self._graphs[batch] = graph
                log.info("capturing CUDA graphs: %d/%d batch sizes", done, total)
        finally:
            if collecting:
                gc.enable()
        torch.cuda.synchronize(self.device)
        log.info(
            "captured CUDA graphs of %d decode batch sizes (1-%d) in %.1f s",
            total,
            self.sizes[-1],
            time.perf_counter() - start,
        )

    def release(self) -> None:
        """Destroy the captured graphs now, on the caller's thread (the engine is stopping),
        rather than whenever the garbage collector gets to them."""
        for graph in self._graphs.values():
            graph.reset()
        self._graphs.clear()

    def run(
        self, plan: SchedulerOutput, fed: tuple[torch.Tensor, list[int]] | None = None
    ) -> torch.Tensor:
        """Run a step that :meth:`fits`; returns its logits ``[B, V]`` (``dtype``), in plan
        order: a view of the persistent buffer, valid until the next step. A plan that
        ``feeds_pending`` comes with ``fed``: the step before's sampled ids ``[B_prev]`` on
        the device and, per request, its row in them."""
        batch = len(plan.requests)
        bucket = pick_batch_size(self.sizes, batch)
        assert bucket is not None, "run() takes only steps that fit()"
        assert plan.feeds_pending == (fed is not None), "fed goes with a plan made ahead"
        host = self._hosts[self._turn]
        self._turn ^= 1
        positions = plan.start_positions
        if fed is None:
            host.ids[:batch] = [
                req.all_token_ids[pos] for req, pos in zip(plan.requests, positions, strict=True)
            ]
        else:
            host.fed_rows[:batch] = fed[1]
        host.positions[:batch] = [
            pos + req.rope_offset for req, pos in zip(plan.requests, positions, strict=True)
        ]
        host.slots[:batch] = plan.slot_mapping
        host.lens[:batch] = np.asarray(positions) + 1
        host.fill_tables(plan.requests, plan.block_tables)
        host.pad(batch, bucket, self.pad_block, self.block_size)
        used = self._width + bucket * self.max_blocks
        self._dev[:used].copy_(host.packed[:used], non_blocking=True)  # the one transfer
        if fed is not None:
            self.input_ids[:batch].copy_(fed[0].index_select(0, self._fed_rows[:batch]))
        self._prepare(bucket, host)
        if self.replay == "graph":
            self._graphs[bucket].replay()
        else:
            self._forward(bucket)
        return self.logits[:batch]

    def fed_tokens(self, batch: int) -> torch.Tensor:
        """``[batch]`` int32 on the device: the input ids of the step :meth:`run` queued last,
        which for a plan made ahead are the step before's samples, in plan order. Kernels
        queued before the next :meth:`run` read them as they are."""
        return self.input_ids[:batch]


class _HostInputs:
    """One packed int32 host buffer of a step's inputs (pinned on a GPU), filled through numpy
    views (no tensor per step): the ``_FIELDS`` segments of ``rows``, then the block tables.
    Per row, the ``block_ids`` list of the request whose table it holds, and how many of
    its entries are written."""

    def __init__(self, size: int, rows: int, max_blocks: int, pinned: bool) -> None:
        self.packed = torch.zeros(size, dtype=torch.int32, pin_memory=pinned)
        values = self.packed.numpy()
        width = _FIELDS * rows
        self.ids, self.positions, self.slots, self.lens, self.fed_rows = values[:width].reshape(
            _FIELDS, rows
        )
        self.tables = values[width:].reshape(rows, max_blocks)
        self._owners: list[list[int] | None] = [None] * rows
        self._written = [0] * rows

    def fill_tables(self, requests: list[Request], tables: list[list[int]]) -> None:
        """Row ``i`` gets ``tables[i]``, the block table ``requests[i]`` had when planned:
        only its entries past those written last time, where the row held the same
        ``block_ids`` list then (entries past the context are not read)."""
        owners, written, dest = self._owners, self._written, self.tables
        for row, (request, table) in enumerate(zip(requests, tables, strict=True)):
            blocks, count = request.block_ids, len(table)
            start = written[row] if owners[row] is blocks else 0
            if start < count:
                dest[row, start:count] = table[start:]
            owners[row], written[row] = blocks, count

    def pad(self, start: int, stop: int, pad_block: int, block_size: int) -> None:
        """Make rows ``start..stop-1`` padding rows."""
        self.ids[start:stop] = 0
        self.positions[start:stop] = 0
        self.slots[start:stop] = pad_block * block_size
        self.lens[start:stop] = 1
        self.tables[start:stop, 0] = pad_block
        self._owners[start:stop] = [None] * (stop - start)
