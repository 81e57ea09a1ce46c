"""Registry fixtures: a fresh copy of a tiny checkpoint, registries on SQLite and PostgreSQL,
and real signing key pairs.

``database_url`` and ``raw`` are the tenant tests' fixtures (an empty SQLite file, and a
fresh PostgreSQL database when ``AUTOGLM_TEST_POSTGRES_URL`` is set), since the registry
shares their database.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from auto_glm.registry import ModelRegistry, generate_key_pair
from tests.conftest import MakeCheckpoint
from tests.tenants.conftest import database_url, raw

__all__ = ["database_url", "raw"]


@pytest.fixture
def model_dir(make_checkpoint: MakeCheckpoint, tmp_path: Path) -> Path:
    """A private copy of a tiny GLM-4 checkpoint, free to damage."""
    return Path(shutil.copytree(make_checkpoint("Glm4ForCausalLM"), tmp_path / "model"))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """An empty SQLite database, for tests that do not depend on the database kind."""
    return f"sqlite:///{tmp_path / 'autoglm.db'}"


@pytest.fixture
def registry(database_url: str, tmp_path: Path) -> Iterator[ModelRegistry]:
    """A registry on a fresh database of each kind, copying into ``tmp_path/registry``."""
    with ModelRegistry(database_url, tmp_path / "registry") as opened:
        yield opened


@pytest.fixture
def sqlite_registry(sqlite_url: str, tmp_path: Path) -> Iterator[ModelRegistry]:
    """A registry on a SQLite file only."""
    with ModelRegistry(sqlite_url, tmp_path / "registry") as opened:
        yield opened


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A signing key pair: (private PEM, public PEM)."""
    return generate_key_pair(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def other_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A second, unrelated key pair."""
    return generate_key_pair(tmp_path_factory.mktemp("other-keys"))
