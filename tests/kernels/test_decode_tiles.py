"""The decode kernel's tilings (auto_glm.kernels.triton.tiles): checked fields, the file of
tilings measured per card, and the pick per batch size. No triton needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from auto_glm.kernels.triton.tiles import (
    TUNED_TILES_FILE,
    DecodeTiles,
    pick_tiles,
    read_tuned_tiles,
    tuned_key,
    tuned_tiles,
    write_tuned_tiles,
)

SMALL, LARGE = DecodeTiles(8, 4, 5, packed_heads=True), DecodeTiles(32, 8, 5, True)


def test_tilings_recorded_per_card_read_back_in_batch_order(tmp_path: Path) -> None:
    path = tmp_path / "tiles.json"
    h200 = tuned_key("NVIDIA H200", torch.bfloat16, torch.bfloat16, (16, 8, 128))
    assert h200 == "NVIDIA H200, q bfloat16, cache bfloat16, H 16, H_kv 8, D 128"
    write_tuned_tiles(path, h200, [(256, LARGE), (1, SMALL)])
    other = tuned_key("NVIDIA H100 80GB HBM3", torch.float16, torch.int8, (32, 8, 64))
    write_tuned_tiles(path, other, [(64, DecodeTiles())])
    write_tuned_tiles(path, h200, [(1, SMALL), (256, LARGE)])  # rewritten, not duplicated
    want = {h200: [(1, SMALL), (256, LARGE)], other: [(64, DecodeTiles())]}
    assert read_tuned_tiles(path) == want
    assert json.loads(path.read_text())[h200][0] == {
        "max_batch": 1,
        "block_n": 8,
        "num_warps": 4,
        "num_stages": 5,
        "heads_first": False,
        "packed_heads": True,
    }


def test_each_batch_takes_the_smallest_entry_that_holds_it() -> None:
    entries = [(1, SMALL), (64, DecodeTiles()), (256, LARGE)]
    picks = [pick_tiles(entries, b) for b in (1, 2, 64, 65, 256, 512)]
    assert picks == [SMALL, DecodeTiles(), DecodeTiles(), LARGE, LARGE, LARGE]
    assert pick_tiles([], 8) == DecodeTiles()


def test_no_file_means_no_tilings_and_a_bad_one_names_itself(tmp_path: Path) -> None:
    assert read_tuned_tiles(tmp_path / "missing.json") == {}
    odd_tiles = {"max_batch": 1, "block_n": 48, "num_warps": 8, "num_stages": 3}
    odd_tiles |= {"heads_first": False, "packed_heads": False}
    for text in ("not json", '{"k": [{"block_n": 32}]}', json.dumps({"k": [odd_tiles]})):
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        named = "bad.json is not a file of decode tilings.*--write-tuned"
        with pytest.raises(ValueError, match=named):
            read_tuned_tiles(bad)


def test_the_shipped_file_parses_and_the_cpu_keeps_the_default() -> None:
    for entries in read_tuned_tiles(TUNED_TILES_FILE).values():
        assert entries == sorted(entries, key=lambda entry: entry[0])
    cpu = torch.device("cpu")
    assert tuned_tiles(cpu, torch.bfloat16, torch.bfloat16, (16, 8, 128), 256) == DecodeTiles()
