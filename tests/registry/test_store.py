"""The registry's versions in the shared database: add, read, remove, copies, and migrations."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, inspect, text

import auto_glm.tenants
from auto_glm.registry import ModelRegistry, RegistryError, default_registry_dir
from auto_glm.tenants import TenantStore
from auto_glm.tenants.database import open_engine


def test_add_get_versions_names_and_remove(
    registry: ModelRegistry, model_dir: Path, database_url: str
) -> None:
    first = registry.add("glm", model_dir, "1", source="https://hub.example/org/glm")
    assert (first.ref, first.path, first.copied) == ("glm@1", model_dir.resolve(), False)
    assert (first.architecture, first.dtype) == ("Glm4ForCausalLM", "float32")
    assert first.source == "https://hub.example/org/glm"
    assert first.total_bytes == first.manifest.total_bytes
    registry.add("glm", model_dir, "2")
    registry.add("alpha", model_dir, "v1")
    assert registry.names() == ["alpha", "glm"]
    assert [mv.version for mv in registry.versions("glm")] == ["1", "2"]
    assert registry.get("glm").version == "2"
    assert registry.get("glm", "1") == first
    with ModelRegistry(database_url) as reopened:
        assert reopened.get("glm", "1") == first
    removed = registry.remove("glm", "2")
    assert removed.version == "2" and model_dir.is_dir()
    assert registry.get("glm").version == "1"


def test_unknown_models_and_versions_list_the_known_ones(
    registry: ModelRegistry, model_dir: Path
) -> None:
    with pytest.raises(RegistryError, match="unknown model 'glm': none is registered yet; add"):
        registry.get("glm")
    registry.add("glm", model_dir, "1")
    registry.add("qwen", model_dir, "1")
    with pytest.raises(RegistryError, match="unknown model 'llama': the registered models are glm"):
        registry.get("llama")
    with pytest.raises(
        RegistryError, match="unknown version '9' of model 'glm': its versions are 1"
    ):
        registry.remove("glm", "9")


def test_an_existing_version_is_refused(registry: ModelRegistry, model_dir: Path) -> None:
    registry.add("glm", model_dir, "1")
    with pytest.raises(RegistryError, match="glm@1 is already registered: versions never change"):
        registry.add("glm", model_dir, "1", copy=True)
    assert not (registry.registry_dir / "glm" / "1").exists()


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "a@b", "x" * 65, "spa ce"])
def test_names_and_versions_follow_the_rule(
    sqlite_registry: ModelRegistry, model_dir: Path, bad: str
) -> None:
    rule = "use 1 to 64 characters from A-Z, a-z, 0-9, '.', '_' and '-'"
    with pytest.raises(RegistryError, match=f"invalid model name {bad!r}: {rule}"):
        sqlite_registry.add(bad, model_dir, "1")
    with pytest.raises(RegistryError, match=f"invalid model version {bad!r}: {rule}"):
        sqlite_registry.add("glm", model_dir, bad)


def test_a_directory_without_config_is_refused(
    sqlite_registry: ModelRegistry, tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match=r"is not a model directory \(no config.json\)"):
        sqlite_registry.add("glm", tmp_path / "empty", "1", copy=True)
    assert not sqlite_registry.registry_dir.exists()


def test_copies_are_made_hashed_and_removed_but_sources_never(
    registry: ModelRegistry, model_dir: Path
) -> None:
    before = sorted(p.name for p in model_dir.iterdir())
    copied = registry.add("glm", model_dir, "1", copy=True)
    assert copied.path == registry.registry_dir / "glm" / "1" and copied.copied
    assert sorted(p.name for p in copied.path.iterdir()) == before
    assert copied.source == str(model_dir.resolve())
    assert registry.verify(copied).files == len(before)
    registry.add("glm", model_dir, "2")
    assert registry.remove("glm", "1").copied
    assert not copied.path.exists() and not (registry.registry_dir / "glm").exists()
    registry.remove("glm", "2")
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_a_failed_copy_leaves_nothing_behind(
    sqlite_registry: ModelRegistry, model_dir: Path
) -> None:
    (model_dir / "link").symlink_to(model_dir / "config.json")
    with pytest.raises(RegistryError, match="'link' is a symbolic link"):
        sqlite_registry.add("glm", model_dir, "1", copy=True)
    assert not (sqlite_registry.registry_dir / "glm" / "1").exists()
    assert sqlite_registry.names() == []


def test_the_copy_is_what_gets_hashed(sqlite_registry: ModelRegistry, model_dir: Path) -> None:
    copied = sqlite_registry.add("glm", model_dir, "1", copy=True)
    shutil.rmtree(model_dir)  # the source may go away: the copy is the model now
    assert sqlite_registry.verify(copied).bytes == copied.total_bytes


def test_the_registry_shares_the_tenant_database(
    database_url: str, raw: Engine, model_dir: Path, tmp_path: Path
) -> None:
    """A database from before the registry (schema 0001) gets the table and keeps tenants."""
    engine, _ = open_engine(database_url)
    config = Config()
    config.set_main_option(
        "script_location", str(Path(auto_glm.tenants.__file__).with_name("migrations"))
    )
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    engine.dispose()
    with raw.begin() as db:
        db.execute(
            text(
                "INSERT INTO tenants (name, weight, created_at) VALUES ('acme', 1.0, "
                "CURRENT_TIMESTAMP)"
            )
        )
    assert "model_versions" not in inspect(raw).get_table_names()
    with ModelRegistry(database_url, tmp_path / "registry") as registry:
        registry.add("glm", model_dir, "1")
    assert "model_versions" in inspect(raw).get_table_names()
    with TenantStore(database_url) as store:
        assert [t.name for t in store.list_tenants()] == ["acme"]


def test_default_locations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTOGLM_REGISTRY_DIR", raising=False)
    monkeypatch.setenv("AUTOGLM_HOME", str(tmp_path / "home"))
    assert default_registry_dir() == tmp_path / "home" / "models"
    with ModelRegistry() as registry:
        assert registry.registry_dir == tmp_path / "home" / "models"
        assert registry.url.database == str(tmp_path / "home" / "autoglm.db")
    monkeypatch.setenv("AUTOGLM_REGISTRY_DIR", str(tmp_path / "elsewhere"))
    assert default_registry_dir() == tmp_path / "elsewhere"


def test_an_unusable_database_is_a_registry_error(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="check that its directory exists and is writable"):
        ModelRegistry(f"sqlite:///{tmp_path / 'missing' / 'x.db'}")
    with pytest.raises(RegistryError, match="unsupported database URL mysql://h/db"):
        ModelRegistry("mysql://h/db")
    with socket.socket() as probe:  # a port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RegistryError) as caught:
        ModelRegistry(f"postgresql://alice:hunter2@127.0.0.1:{port}/autoglm")
    assert f"postgresql+psycopg://alice:***@127.0.0.1:{port}/autoglm" in str(caught.value)
    assert "hunter2" not in str(caught.value)
