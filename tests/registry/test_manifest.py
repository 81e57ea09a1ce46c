"""Manifests: every file's path, SHA-256 and size, what the model is, and what is refused."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from auto_glm.registry import FileEntry, Manifest, RegistryError, build_manifest
from auto_glm.registry.hashing import hash_files, scan_directory
from tests.conftest import MakeCheckpoint


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_manifest_lists_every_file_with_its_digest_and_size(model_dir: Path) -> None:
    (model_dir / "extra" / "deeper").mkdir(parents=True)
    (model_dir / "extra" / "deeper" / "notes.txt").write_text("hello")
    manifest = build_manifest(model_dir, "hub:org/model")
    on_disk = sorted(
        p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()
    )
    assert [entry.path for entry in manifest.files] == on_disk
    assert "extra/deeper/notes.txt" in on_disk and "model.safetensors" in on_disk
    for entry in manifest.files:
        assert entry.sha256 == _sha256(model_dir / entry.path)
        assert entry.size == (model_dir / entry.path).stat().st_size
    assert manifest.total_bytes == sum((model_dir / p).stat().st_size for p in on_disk)
    assert manifest.architecture == "Glm4ForCausalLM"
    assert manifest.dtype == "float32"
    assert manifest.source == "hub:org/model"
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_the_dtype_comes_from_the_safetensors_headers_without_one_in_config(
    make_checkpoint: MakeCheckpoint, tmp_path: Path
) -> None:
    source = make_checkpoint("Qwen2ForCausalLM", dtype=torch.bfloat16)
    directory = tmp_path / "qwen"
    directory.mkdir()
    for path in source.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())
    config = json.loads((directory / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (directory / "config.json").write_text(json.dumps(config))
    manifest = build_manifest(directory, str(directory))
    assert (manifest.architecture, manifest.dtype) == ("Qwen2ForCausalLM", "bfloat16")


def test_a_directory_without_config_json_is_refused(model_dir: Path) -> None:
    (model_dir / "config.json").unlink()
    with pytest.raises(RegistryError, match="has no config.json: give the directory of"):
        build_manifest(model_dir, "x")


def test_links_are_refused_naming_them_and_the_fix(model_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x")
    os.symlink(outside, model_dir / "escape.bin")
    os.symlink("config.json", model_dir / "alias.json")
    with pytest.raises(RegistryError) as caught:
        build_manifest(model_dir, "x")
    message = str(caught.value)
    assert f"'escape.bin' is a symbolic link (to '{outside}', outside the directory)" in message
    assert "'alias.json' is a symbolic link (to 'config.json')" in message
    assert "replace it with the file itself (cp -L)" in message


def test_a_linked_subdirectory_is_refused_not_followed(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "code.py").write_text("print('hi')")
    os.symlink(tmp_path / "elsewhere", model_dir / "sub")
    assert scan_directory(model_dir).refused[0].startswith("'sub' is a symbolic link")
    with pytest.raises(RegistryError, match="'sub' is a symbolic link"):
        build_manifest(model_dir, "x")


@pytest.mark.parametrize("path", ["../x", "/etc/passwd", "a/../../b", "a//b", "./a", "a\\b", ""])
def test_paths_outside_the_directory_are_refused_in_a_manifest(path: str) -> None:
    with pytest.raises(RegistryError, match="paths are relative to the model directory"):
        FileEntry(path, "0" * 64, 1)


def test_an_unreadable_stored_manifest_says_what_to_do() -> None:
    with pytest.raises(RegistryError, match="stored manifest is not readable .* register"):
        Manifest.from_json('{"format": 99}')


def test_parallel_and_single_threaded_hashing_agree_and_report_progress(tmp_path: Path) -> None:
    sizes = {}
    for index, size in enumerate([0, 1, 5 << 20, 9 << 20 | 7, 3 << 20]):
        path = tmp_path / f"f{index}.bin"
        path.write_bytes(os.urandom(size))
        sizes[path.name] = size
    calls: list[tuple[int, int]] = []
    parallel, unreadable = hash_files(
        tmp_path, sizes, workers=4, progress=lambda *a: calls.append(a)
    )
    single, _ = hash_files(tmp_path, sizes, workers=1)
    assert unreadable == {} and parallel == single
    assert parallel == {name: (_sha256(tmp_path / name), sizes[name]) for name in sizes}
    total = sum(sizes.values())
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
