"""The Triton paged decode kernel alone, timed over a grid of tilings, against the time its
K/V reads take at the card's copy bandwidth (issue 13: the batch-256 decode step is to come
within 2x of its memory-bandwidth floor, and attention is most of the gap).

One attention layer of the nano model (16 query heads, 8 KV heads, head dim 128, bfloat16,
blocks of 16 slots scattered through the cache) at each ``--batches`` size, every sequence
with ``--context`` keys. For each tiling (keys per tile, warps, pipeline stages, KV heads
first, split-K partitions) it checks the output against the default tiling's, then times
``--iters`` calls between CUDA events. It prints a table per batch, sorted by time, with
the ratio to the floor (K/V bytes / copy bandwidth), and the fastest tiling.

``--write-tuned`` records the fastest at each batch (of those with the launcher's split-K)
for this card, dtype and head dim in ``auto_glm/kernels/triton/decode_tiles.json`` (or the
file given), where the engine's decode kernel finds it (:mod:`auto_glm.kernels.triton.tiles`).
It and ``--json`` are written after each batch, so a run stopped by a time limit keeps the
batches it finished; batch 256 goes first by default.

    python benchmarks/bench_decode_kernel.py [--batches 256 64 1] [--context 584] [--json F]
    python benchmarks/bench_decode_kernel.py --write-tuned     # tune this card's decode

It needs a CUDA GPU. Under ``TRITON_INTERPRET=1`` it also runs on the CPU, in triton's
interpreter, at a small ``--context`` and with ``--quick`` (two tilings): a check of the
script, whose times mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import random
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
TOLERANCE = 2e-2  # bfloat16 outputs of two tilings differ by rounding only


def _case(batch: int, context: int, dtype: torch.dtype, device: torch.device, seed: int):
    """q [B, H, D], caches [slots, H_kv, D] with each sequence's blocks scattered, block
    tables [B, blocks] and lengths [B]."""
    blocks = -(-context // BLOCK)
    order = list(range(batch * blocks))
    random.Random(seed).shuffle(order)
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (batch * blocks * BLOCK, KV_HEADS, HEAD_DIM)
    k = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    v = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen, device=device, dtype=dtype)
    tables = torch.tensor(order, dtype=torch.int32, device=device).view(batch, blocks)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return q, k, v, tables, lens


def _time(call, iters: int, device: torch.device) -> float:
    """Seconds per call: the mean of ``iters`` calls after one untimed."""
    call()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            call()
        return (time.perf_counter() - start) / iters
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    for _ in range(iters):
        call()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3 / iters


def _batch_rows(batch: int, args, device: torch.device, bandwidth: float) -> list[dict]:
    dtype = torch.bfloat16
    q, k, v, tables, lens = _case(batch, args.context, dtype, device, seed=batch)
    kv_bytes = 2 * batch * args.context * KV_HEADS * HEAD_DIM * k.element_size()
    floor = kv_bytes / bandwidth
    scale = HEAD_DIM**-0.5
    want = torch.empty_like(q)
    paged_decode_attention(q, k, v, tables, lens, BLOCK, scale, want)
    grid = QUICK if args.quick else [(t, None) for t in TILINGS + PACKED]
    if not args.quick:
        grid += [(tiles, s) for tiles in (DEFAULT, PACKED_SPLIT) for s in SPLITS]
    rows = []
    for tiles, splits in grid:
        out = torch.empty_like(q)

        def call(tiles=tiles, splits=splits, out=out) -> None:
            paged_decode_attention(
                q, k, v, tables, lens, BLOCK, scale, out, num_splits=splits, tiles=tiles
            )

        row = {"batch": batch, **dataclasses.asdict(tiles), "num_splits": splits or "auto"}
        try:
            call()
        except Exception as exc:  # a tiling the compiler refuses: reported, not fatal
            rows.append(row | {"error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        diff = (out.float() - want.float()).abs().max().item()
        seconds = _time(call, args.iters, device)
        timed = {"us": seconds * 1e6, "floor_ratio": seconds / floor, "max_diff": diff}
        rows.append(row | timed | {"matches": diff <= TOLERANCE})
    rows.sort(key=lambda r: r.get("us", float("inf")))
    print(f"\nbatch {batch}, {args.context} keys each: K/V {kv_bytes / 1e6:.1f} MB, floor "
          f"{floor * 1e6:.1f} us")  # fmt: skip
    print("| keys/tile | warps | stages | heads first | packed | splits | us | x floor | diff |")
    print("|---:|---:|---:|---|---|---:|---:|---:|---|")
    for r in rows:
        head = f"| {r['block_n']} | {r['num_warps']} | {r['num_stages']} | {r['heads_first']} "
        head += f"| {r['packed_heads']} | {r['num_splits']} "
        if "error" in r:
            print(head + f"| failed: {r['error']} | | |")
        else:
            diff = f"{r['max_diff']:.2g}" + ("" if r["matches"] else " WRONG")
            print(head + f"| {r['us']:.1f} | {r['floor_ratio']:.2f}x | {diff} |")
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
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="two tilings only")
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument(
        "--write-tuned",
        type=Path,
        nargs="?",
        const=TUNED_TILES_FILE,
        help=f"record the fastest tilings for this card here (default {TUNED_TILES_FILE})",
    )
    args = parser.parse_args(argv)
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
