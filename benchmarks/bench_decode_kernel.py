"""The Triton paged decode kernel alone, timed over a grid of tilings, against the time its
K/V reads take at the card's copy bandwidth (issue 13: the batch-256 decode step is to come
within 2x of its memory-bandwidth floor, and attention is most of the gap).

One attention layer of the nano model (16 query heads, 8 KV heads, head dim 128, bfloat16,
blocks of 16 slots scattered through the cache) at each ``--batches`` size, every sequence
with ``--context`` keys. For each tiling (keys per tile, warps, pipeline stages, KV heads
first, split-K partitions) it checks the output against a float32 reference (relative error,
an output poisoned with NaN beforehand, so that a row left unwritten fails), then times
``--iters`` calls replayed from a CUDA graph (as the engine runs the kernel: no launch
overhead) between CUDA events, in ``--rounds`` rounds over the grid (every other round in
reverse order) whose median it keeps. Where one layer's K/V is smaller than
``--rotate-mib`` (default: four times the GPU's L2 cache), the calls rotate over as many
copies of it as that takes, so that they read device memory and not the cache. It prints a
table per batch, sorted by time, with the spread of the rounds and the ratio to the floor
(K/V bytes / copy bandwidth), and the fastest tiling.

``--write-tuned`` records the fastest at each batch (of those with the launcher's split-K)
for this card, dtype and head dim in ``auto_glm/kernels/triton/decode_tiles.json`` (or the
file given), where the engine's decode kernel finds it (:mod:`auto_glm.kernels.triton.tiles`).
It and ``--json`` are written after each batch, so a run stopped by a time limit keeps the
batches it finished; batch 256 goes first by default.

    python benchmarks/bench_decode_kernel.py [--batches 256 64 1] [--context 584] [--json F]
    python benchmarks/bench_decode_kernel.py --write-tuned     # tune this card's decode

It needs a CUDA GPU. Under ``TRITON_INTERPRET=1`` it also runs on the CPU, in triton's
interpreter, at a small ``--context`` and with ``--quick`` (three tilings): a check of the
script, whose times mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from auto_glm.bench.decode import copy_bandwidth  # noqa: E402
from auto_glm.bench.results import write_report  # noqa: E402
from auto_glm.kernels.triton import DecodeTiles, paged_decode_attention  # noqa: E402
from auto_glm.kernels.triton.tiles import (  # noqa: E402
    TUNED_TILES_FILE,
    tuned_key,
    write_tuned_tiles,
)

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 16, 8, 128, 16
# Each tiling runs with the launcher's split-K. The load through the block table takes a
# pipeline stage of its own: at 3 or 4 stages every tile waits for all of its copies, so no
# K/V tile is in flight while the one before is computed on (the default until 2026-11-29,
# timed here for comparison); 5 or 6 stages keep one in flight, 7 or 8 two, 9 three. Every
# one here builds for sm_90 with no register spill, 21-105 KB of shared memory.
TILINGS = [DecodeTiles(32, 8, 3)]
TILINGS += [
    DecodeTiles(block_n, warps, stages)
    for block_n, warps in ((16, 4), (32, 4), (32, 8), (64, 4), (64, 8))
    for stages in (5, 7)
]
TILINGS += [DecodeTiles(32, warps, stages, True) for warps, stages in ((8, 5), (4, 5), (8, 7))]
TILINGS += [DecodeTiles(16, 4, 9)]
# one program for all 8 KV heads, tiles of whole cache rows: keys x 8 rows, 16 to 64 (each
# builds spill-free for sm_90, with 21-72 KB of shared memory)
PACKED = [
    DecodeTiles(block_n, warps, stages, packed_heads=True)
    for block_n, warps, stages in [(2, 4, 5), (4, 8, 5), (8, 4, 5), (8, 8, 5), (4, 8, 7)]
]
# split-K partitions (None: the launcher's choice, one at batch 256) tried with the default
# tiling and a packed one too: whether more, shorter programs help a full batch
DEFAULT, PACKED_SPLIT, SPLITS = DecodeTiles(), PACKED[3], (2, 4)
QUICK = [(DEFAULT, None), (DecodeTiles(16, 4, 2, True), 2)]
QUICK += [(DecodeTiles(2, 4, 2, packed_heads=True), None)]
# against the float32 reference: the relative error (||out - ref|| / ||ref||) of bfloat16
# operands lands between 1e-3 and 1e-2, and no element may be off by more than MAX_ERROR (a
# few rows wrong hardly move the norm); NaN (an element left unwritten) never passes
TOLERANCE, MAX_ERROR = 1e-2, 2e-2
ROUNDS = 3
L2_COPIES = 4  # --rotate-mib's default: K/V copies that together fill this many L2 caches


@dataclasses.dataclass
class _Case:
    """One batch's inputs: q [B, H, D], block tables [B, blocks] with each sequence's blocks
    scattered, lengths [B], and ``kv`` copies of the caches, each ([slots, H_kv, D] K, V)
    with its own random values: the first is checked; timed calls take them in turn, from
    one timing to the next, so that none is read again before all the others were."""

    q: torch.Tensor
    tables: torch.Tensor
    lens: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]
    turn: int = 0  # the copy the next timed call reads

    def run(self, out: torch.Tensor, tiles=None, splits=None, copy: int | None = None) -> None:
        """Attend into ``out`` over copy ``copy`` of the caches (default: the next in turn)."""
        if copy is None:
            copy, self.turn = self.turn, (self.turn + 1) % len(self.kv)
        k, v = self.kv[copy]
        paged_decode_attention(
            self.q, k, v, self.tables, self.lens, BLOCK, HEAD_DIM**-0.5, out,
            num_splits=splits, tiles=tiles,
        )  # fmt: skip


def _case(batch: int, context: int, copies: int, device: torch.device, seed: int) -> _Case:
    blocks = -(-context // BLOCK)
    order = list(range(batch * blocks))
    random.Random(seed).shuffle(order)
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype, shape = torch.bfloat16, (batch * blocks * BLOCK, KV_HEADS, HEAD_DIM)
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen, device=device, dtype=dtype)
    tables = torch.tensor(order, dtype=torch.int32, device=device).view(batch, blocks)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    kv = [
        tuple(torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in "kv")
        for _ in range(copies)
    ]
    return _Case(q, tables, lens, kv)


def _reference(case: _Case, context: int, chunk: int = 32) -> torch.Tensor:
    """The attention of the first K/V copy in float32, through the block tables: [B, H, D]
    (``chunk`` sequences at a time, to bound the gathered K/V's memory)."""
    k_cache, v_cache = case.kv[0]
    offsets = torch.arange(BLOCK, device=case.q.device)
    out = []
    for first in range(0, case.q.shape[0], chunk):
        tables = case.tables[first : first + chunk].long()
        slots = (tables[:, :, None] * BLOCK + offsets).flatten(1)[:, :context]  # [b, T]
        k = k_cache[slots].float().repeat_interleave(HEADS // KV_HEADS, dim=2)  # [b, T, H, D]
        v = v_cache[slots].float().repeat_interleave(HEADS // KV_HEADS, dim=2)
        q = case.q[first : first + chunk].float()  # [b, H, D]
        scores = torch.einsum("bhd,bthd->bht", q, k) * HEAD_DIM**-0.5
        out.append(torch.einsum("bht,bthd->bhd", scores.softmax(dim=-1), v))
    return torch.cat(out)


def _errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """``out``'s elements still NaN (poisoned before the call: left unwritten, since ``ref``
    is finite), its relative error (||out - ref|| / ||ref||) and largest error against
    ``ref``, and whether all three are within bounds."""
    diff = out.float() - ref
    rel, most = (diff.norm() / ref.norm()).item(), diff.abs().max().item()
    unwritten = int(out.isnan().sum())
    ok = not unwritten and rel <= TOLERANCE and most <= MAX_ERROR
    return {"unwritten": unwritten, "rel_error": rel, "max_error": most, "matches": ok}


def _time(case: _Case, out: torch.Tensor, tiles, splits, iters: int, device) -> float:
    """Seconds per call, each call reading the next K/V copy. On a GPU the calls are replayed
    from a CUDA graph, as the engine's decode step runs them, so that small batches are timed
    without the host's launch overhead: ``max(iters, copies)`` calls captured once, one
    replay untimed, then one timed between CUDA events. On the CPU: the mean of ``iters``
    calls after one untimed."""
    if device.type != "cuda":
        case.run(out, tiles, splits)
        start = time.perf_counter()
        for _ in range(iters):
            case.run(out, tiles, splits)
        return (time.perf_counter() - start) / iters
    calls = max(iters, len(case.kv))
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            case.run(out, tiles, splits)
    graph.replay()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    graph.replay()
    end.record()
    end.synchronize()
    graph.reset()
    return begin.elapsed_time(end) / 1e3 / calls


def _copies(kv_bytes: int, rotate_bytes: int) -> int:
    """K/V copies to rotate over so that the calls read ``rotate_bytes`` before any repeats."""
    return max(1, -(-rotate_bytes // kv_bytes))


def _batch_rows(batch: int, args, device: torch.device, bandwidth: float) -> list[dict]:
    kv_bytes = 2 * batch * args.context * KV_HEADS * HEAD_DIM * torch.bfloat16.itemsize
    copies = _copies(kv_bytes, args.rotate_mib * 2**20)
    case = _case(batch, args.context, copies, device, seed=batch)
    floor = kv_bytes / bandwidth
    ref = _reference(case, args.context)
    grid = QUICK if args.quick else [(t, None) for t in TILINGS + PACKED]
    if not args.quick:
        grid += [(tiles, s) for tiles in (DEFAULT, PACKED_SPLIT) for s in SPLITS]
    rows, timed = [], []
    for tiles, splits in grid:
        row = {"batch": batch, **dataclasses.asdict(tiles), "num_splits": splits or "auto"}
        row["kv_copies"] = copies
        out = torch.full_like(case.q, float("nan"))  # an element left unwritten stays NaN
        try:
            case.run(out, tiles, splits, copy=0)
        except Exception as exc:  # a tiling the compiler refuses: reported, not fatal
            rows.append(row | {"error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        rows.append(row | _errors(out, ref) | {"rounds_us": []})
        timed.append((rows[-1], out, tiles, splits))
    for round_ in range(args.rounds):  # every other round in reverse: drift evens out
        for row, out, tiles, splits in timed[:: -1 if round_ % 2 else 1]:
            if "error" in row:
                continue
            try:
                seconds = _time(case, out, tiles, splits, args.iters, device)
            except Exception as exc:  # reported, not fatal: the other tilings are timed
                row |= {"error": f"timing: {type(exc).__name__}: {exc}"[:200], "matches": False}
                continue
            row["rounds_us"].append(seconds * 1e6)
    for row, *_ in timed:
        if "error" in row:
            continue
        us = row["rounds_us"]
        row["us"] = statistics.median(us)
        row |= {"spread": (max(us) - min(us)) / row["us"], "floor_ratio": row["us"] / 1e6 / floor}
    rows.sort(key=lambda r: r.get("us", float("inf")))
    print(f"\nbatch {batch}, {args.context} keys each: K/V {kv_bytes / 1e6:.1f} MB "
          f"({copies} copies rotated), floor {floor * 1e6:.1f} us")  # fmt: skip
    print("| keys/tile | warps | stages | heads first | packed | splits | us (median) | spread "
          "| x floor | error (rel., max) |")  # fmt: skip
    print("|---:|---:|---:|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        head = f"| {r['block_n']} | {r['num_warps']} | {r['num_stages']} | {r['heads_first']} "
        head += f"| {r['packed_heads']} | {r['num_splits']} "
        if "error" in r:
            print(head + f"| failed: {r['error']} | | | |")
        else:
            error = f"{r['rel_error']:.2g}, {r['max_error']:.2g}"
            if r["unwritten"]:
                error += f", {r['unwritten']} elements unwritten"
            error += "" if r["matches"] else " WRONG"
            print(head + f"| {r['us']:.1f} | {r['spread']:.0%} | {r['floor_ratio']:.2f}x "
                  f"| {error} |")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=[256, 64, 1],
        help="batch sizes, in the order timed (default: 256 64 1, the batch of the issue's "
        "2x target first)",
    )
    parser.add_argument("--context", type=int, default=584, help="keys per sequence")
    parser.add_argument("--iters", type=int, default=20, help="calls per timing (default 20)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=ROUNDS,
        help=f"timings per tiling, the median kept (default {ROUNDS})",
    )
    parser.add_argument(
        "--rotate-mib",
        type=int,
        help=f"K/V bytes the calls read before any repeats, in MiB (default: {L2_COPIES} times "
        "the GPU's L2 cache; none on the CPU)",
    )
    parser.add_argument("--quick", action="store_true", help="three tilings only")
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument(
        "--write-tuned",
        type=Path,
        nargs="?",
        const=TUNED_TILES_FILE,
        help=f"record the fastest tilings for this card here (default {TUNED_TILES_FILE})",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.iters < 1 or (args.rotate_mib or 0) < 0:
        parser.error(
            f"--rounds ({args.rounds}) and --iters ({args.iters}) must be at least 1, and "
            f"--rotate-mib ({args.rotate_mib}) at least 0"
        )
    if torch.cuda.is_available():
        device = torch.device("cuda")
        card = torch.cuda.get_device_name(device)
        print(f"GPU: {card}")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        device, card = torch.device("cpu"), "cpu"
        print("no GPU: triton's interpreter on the CPU, a check of the script (times mean nothing)")
    else:
        print("bench_decode_kernel needs a CUDA GPU (or TRITON_INTERPRET=1 to check the script)")
        return 2
    if args.rotate_mib is None:
        cuda = device.type == "cuda"
        l2 = torch.cuda.get_device_properties(device).L2_cache_size if cuda else 0
        args.rotate_mib = -(-L2_COPIES * l2 // 2**20)
    bandwidth = copy_bandwidth(device)
    print(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s (read + written)")
    rows, fastest = [], []
    for batch in args.batches:
        batch_rows = _batch_rows(batch, args, device, bandwidth)
        rows += batch_rows
        tiles = _fastest(batch, batch_rows)
        if tiles is not None:
            fastest.append((batch, tiles))
        # after each batch, so that a sweep stopped by its time limit keeps the batches done
        if args.write_tuned and fastest:
            key = tuned_key(card, torch.bfloat16, torch.bfloat16, (HEADS, KV_HEADS, HEAD_DIM))
            write_tuned_tiles(args.write_tuned, key, fastest)
            print(f"recorded in {args.write_tuned} under {key!r}: {fastest}")
        if args.json:
            write_report(args.json, {"copy_bandwidth": bandwidth, "rows": rows}, indent=1)
    return 1 if any(not r.get("matches", True) for r in rows) else 0


def _fastest(batch: int, rows: list[dict]) -> DecodeTiles | None:
    """Print the fastest correct tiling of one batch's rows (sorted by time); return the
    fastest of those with the launcher's split-K, the one the engine can be given."""
    timed = [r for r in rows if r.get("matches")]
    if not timed:
        return None
    best = timed[0]
    print(
        f"fastest at batch {batch}: {_tiles(best)}, splits {best['num_splits']}: "
        f"{best['us']:.1f} us, {best['floor_ratio']:.2f}x its floor"
    )
    tuned = next((r for r in timed if r["num_splits"] == "auto"), None)
    return None if tuned is None else _tiles(tuned)


def _tiles(row: dict) -> DecodeTiles:
    """The tiling a row of the sweep timed."""
    return DecodeTiles(**{f.name: row[f.name] for f in dataclasses.fields(DecodeTiles)})


if __name__ == "__main__":
    sys.exit(main())
