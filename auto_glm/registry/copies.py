"""Model files that the registry owns: copies made by ``add --copy``, deleted with the version.

A copy is written into a hidden staging directory next to ``NAME/VERSION`` and renamed into
place when complete, so an interrupted copy never looks like a finished one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from auto_glm.registry.errors import RegistryError
from auto_glm.registry.hashing import scan_directory
from auto_glm.registry.models import ModelVersion

__all__ = ["copy_model", "default_registry_dir", "delete_copy"]


def default_registry_dir() -> Path:
    """``$AUTOGLM_REGISTRY_DIR``, else ``$AUTOGLM_HOME/models`` (home: ``~/.cache/autoglm``)."""
    if os.environ.get("AUTOGLM_REGISTRY_DIR"):
        return Path(os.environ["AUTOGLM_REGISTRY_DIR"])
    home = Path(os.environ.get("AUTOGLM_HOME") or Path.home() / ".cache" / "autoglm")
    return home / "models"


def copy_model(origin: Path, registry_dir: Path, name: str, version: str) -> Path:
    """Copy every file of ``origin`` into ``registry_dir/NAME/VERSION``; returns that path."""
    target = registry_dir / name / version
    if target.exists():
        raise RegistryError(
            f"{target} already exists but {name}@{version} is not registered (left by an "
            "interrupted add?); delete that directory and add again"
        )
    scan = scan_directory(origin)
    if scan.refused:
        raise RegistryError(f"{origin} cannot be registered: " + "; ".join(scan.refused))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}.partial-", dir=target.parent))
    except OSError as error:
        raise RegistryError(
            f"cannot create {target.parent}: {error.strerror}; pass a writable --registry DIR "
            "(or set $AUTOGLM_REGISTRY_DIR)"
        ) from None
    try:
        for relative in scan.files:
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(origin / relative, staging / relative, follow_symlinks=False)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from a server's user
        staging.rename(target)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError):
            raise RegistryError(
                f"cannot copy {origin} into {target}: {error.strerror or error}; check the "
                "free space and permissions there"
            ) from None
        raise
    return target


def delete_copy(removed: ModelVersion) -> None:
    """Delete the files of ``removed``, a version whose files the registry copied."""
    if removed.path.name != removed.version or removed.path.parent.name != removed.name:
        raise RegistryError(
            f"removed {removed.ref}, but not its files: {removed.path} is not a registry copy "
            "(NAME/VERSION); delete it by hand if you no longer need it"
        )
    try:
        shutil.rmtree(removed.path)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise RegistryError(
            f"removed {removed.ref}, but deleting its copied files in {removed.path} failed "
            f"({error.strerror}); delete that directory by hand"
        ) from None
    with contextlib.suppress(OSError):  # the model's directory, once it is empty
        removed.path.parent.rmdir()
