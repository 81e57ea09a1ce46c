"""A registered version is loaded from the very files it hashed, and only from those.

Between a check by path and a load by path, a file can be replaced, written or added; the
load then reads bytes nobody verified. Here a writer changes the model's directory at that
moment (inside ``load_model``, before it reads anything), in this process and in an engine
process, and the load must read the verified bytes and then refuse, naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import auto_glm.fleet.sources as sources
from auto_glm.cluster.process import ProcessEngineClient
from auto_glm.engine.config import EngineConfig
from auto_glm.fleet import LoadSettings, RegisteredSource
from auto_glm.registry import IntegrityError, ModelRegistry
from tests.conftest import MakeCheckpoint

KV = EngineConfig(kv_cache_memory=2**20)


def _open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def _replace(path: Path, data: bytes) -> None:
    """Swap ``path`` for a new file (a new inode), as an editor or a download would."""
    fresh = path.with_name(path.name + ".new")
    fresh.write_bytes(data)
    fresh.rename(path)


def _config_with_vocab(model_dir: Path, vocab_size: int) -> bytes:
    config = json.loads((model_dir / "config.json").read_text())
    return json.dumps({**config, "vocab_size": vocab_size}).encode()


def test_pinned_files_are_the_hashed_ones_and_only_the_manifests(
    sqlite_registry: ModelRegistry, model_dir: Path
) -> None:
    mv = sqlite_registry.add("glm", model_dir, "1")
    original = (model_dir / "config.json").read_bytes()
    before = _open_fds()
    report = sqlite_registry.verify(mv, pin=True)
    pinned = report.pinned
    assert pinned is not None and pinned.directory != model_dir
    _replace(model_dir / "config.json", _config_with_vocab(model_dir, 999))
    (model_dir / "special_tokens_map.json").write_text("{}")  # added: never verified

    with pinned:
        listed = sorted(p.name for p in pinned.directory.iterdir())
        assert listed == sorted(entry.path for entry in mv.manifest.files)
        assert (pinned.directory / "config.json").read_bytes() == original
        with pytest.raises(IntegrityError) as caught:
            pinned.check_unchanged()
        assert caught.value.problems == (
            "'config.json' was written or replaced while it was loaded; stop whatever "
            "changes the model's files, then load it again",
        )
        links = pinned.directory
    assert not links.exists() and _open_fds() == before


def test_a_file_written_in_place_after_it_was_hashed_is_named(
    sqlite_registry: ModelRegistry, model_dir: Path
) -> None:
    mv = sqlite_registry.add("glm", model_dir, "1")
    with sqlite_registry.verify(mv, pin=True).pinned as pinned:
        pinned.check_unchanged()  # nothing changed yet
        time.sleep(0.05)  # past the file system's coarsest clock tick
        weights = model_dir / "model.safetensors"
        with open(weights, "r+b") as file:  # the same bytes, rewritten in the same inode
            file.write(weights.read_bytes()[:16])
        with pytest.raises(IntegrityError, match="'model.safetensors' was written or replaced"):
            pinned.check_unchanged()


def test_a_failed_check_leaves_no_descriptor_open(
    sqlite_registry: ModelRegistry, model_dir: Path
) -> None:
    mv = sqlite_registry.add("glm", model_dir, "1")
    (model_dir / "tokenizer.json").write_text("{}")
    before = _open_fds()
    with pytest.raises(IntegrityError, match="'tokenizer.json' has 2 bytes"):
        sqlite_registry.verify(mv, pin=True)
    assert _open_fds() == before


def _swapping_load(model_dir: Path, seen: list[int]) -> Callable:
    """``load_model`` that first replaces config.json (another vocabulary) and records the
    vocabulary it actually loaded."""
    load_model = sources.load_model

    def load(path: str, **options):
        _replace(model_dir / "config.json", _config_with_vocab(model_dir, 999))
        loaded = load_model(path, **options)
        seen.append(loaded.hf_config.vocab_size)
        return loaded

    return load


@pytest.mark.parametrize("engine_process", [False, True], ids=["in_process", "engine_process"])
def test_a_file_replaced_during_the_load_is_not_loaded_and_the_load_is_refused(
    sqlite_registry: ModelRegistry,
    make_checkpoint: MakeCheckpoint,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    engine_process: bool,
) -> None:
    mv = sqlite_registry.add("glm", make_checkpoint("Glm4ForCausalLM"), "1", copy=True)
    vocab = json.loads((mv.path / "config.json").read_text())["vocab_size"]
    settings = LoadSettings(device="cpu", dtype="float32", engine_process=engine_process)
    source = RegisteredSource(sqlite_registry, mv, settings)
    before = _open_fds()

    if not engine_process:  # the swap happens inside this process's load
        seen: list[int] = []
        monkeypatch.setattr(sources, "load_model", _swapping_load(mv.path, seen))
        with pytest.raises(IntegrityError, match="'config.json' was written or replaced"):
            source.load(mv.ref, KV)
        assert seen == [vocab]  # the verified config, not the one swapped in
    else:  # the child loads: the parent swaps the file as the child starts
        seen = []
        start = ProcessEngineClient.start.__func__

        def swap_then_start(cls, build, name, fds=()):
            _replace(mv.path / "config.json", _config_with_vocab(mv.path, 999))
            engine = start(cls, build, name, fds)
            seen.append(engine.vocab_size)
            return engine

        monkeypatch.setattr(ProcessEngineClient, "start", classmethod(swap_then_start))
        with pytest.raises(IntegrityError, match="'config.json' was written or replaced"):
            source.load(mv.ref, KV)
        assert seen == [vocab]
    assert _open_fds() == before


@pytest.mark.parametrize("engine_process", [False, True], ids=["in_process", "engine_process"])
def test_an_untouched_version_loads_from_its_pinned_files_and_lets_them_go(
    sqlite_registry: ModelRegistry, make_checkpoint: MakeCheckpoint, engine_process: bool
) -> None:
    mv = sqlite_registry.add("glm", make_checkpoint("Glm4ForCausalLM"), "1", copy=True)
    settings = LoadSettings(device="cpu", dtype="float32", engine_process=engine_process)
    before = _open_fds()
    engine = RegisteredSource(sqlite_registry, mv, settings).load(mv.ref, KV)
    try:
        assert Path(engine.loaded.path) == mv.path  # named as registered, not as pinned
        assert not list(Path(tempfile.gettempdir()).glob("autoglm-verified-glm@1-*"))
    finally:
        engine.shutdown()
    assert _open_fds() == before  # none of the model's files is held any more
