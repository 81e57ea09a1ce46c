"""The model registry: versions of models kept in the tenant store's database.

A version records where its files are, their manifest (every file's SHA-256 and size) and,
if signed, the signature. :meth:`ModelRegistry.verify` checks both before a load.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Row, exc, select

from auto_glm.registry.copies import copy_model, default_registry_dir, delete_copy
from auto_glm.registry.errors import RegistryError
from auto_glm.registry.hashing import Progress, VerifyReport, verify_files
from auto_glm.registry.manifest import Manifest, build_manifest
from auto_glm.registry.models import ModelVersion, check_name
from auto_glm.registry.schema import model_versions
from auto_glm.registry.signing import check_signature, load_private_key, sign_manifest
from auto_glm.tenants.database import Database

__all__ = ["ModelRegistry"]

_ADD = "`autoglm models add NAME PATH --version V`"


def _utc(moment: datetime) -> datetime:
    # SQLite returns the stored UTC times without a zone, PostgreSQL in the session's zone.
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


def _version(row: Row[Any]) -> ModelVersion:
    return ModelVersion(
        name=row.name,
        version=row.version,
        path=Path(row.path),
        source=row.source,
        copied=bool(row.copied),
        architecture=row.architecture,
        dtype=row.dtype,
        manifest=Manifest.from_json(row.manifest),
        signature=row.signature,
        signer=row.signer,
        total_bytes=int(row.total_bytes),
        created_at=_utc(row.created_at).astimezone(timezone.utc),
    )


class ModelRegistry(Database):
    """Model versions in the database at ``database_url`` (default: the tenant store's,
    ``$AUTOGLM_HOME/autoglm.db``); copies go to ``registry_dir`` (default:
    :func:`default_registry_dir`). Safe to share between threads and processes.
    """

    def __init__(
        self, database_url: str | None = None, registry_dir: str | Path | None = None
    ) -> None:
        super().__init__(database_url, RegistryError)
        self.registry_dir = Path(registry_dir) if registry_dir else default_registry_dir()

    def _rows(self, db: Connection, name: str) -> list[Row[Any]]:
        query = select(model_versions).where(model_versions.c.name == name)
        rows = db.execute(query.order_by(model_versions.c.id)).all()
        if rows:
            return rows
        known = db.execute(select(model_versions.c.name).distinct()).scalars().all()
        if not known:
            raise RegistryError(
                f"unknown model {name!r}: none is registered yet; add one with {_ADD}"
            )
        raise RegistryError(
            f"unknown model {name!r}: the registered models are {', '.join(sorted(known))}"
        )

    # Reading

    def names(self) -> list[str]:
        """The names of the registered models, sorted."""
        with self.transaction() as db:
            query = select(model_versions.c.name).distinct().order_by(model_versions.c.name)
            return list(db.execute(query).scalars())

    def versions(self, name: str) -> list[ModelVersion]:
        """The versions of model ``name``, oldest first."""
        check_name("name", name)
        with self.transaction() as db:
            return [_version(row) for row in self._rows(db, name)]

    def get(self, name: str, version: str | None = None) -> ModelVersion:
        """Version ``version`` of model ``name``; None: the one added last."""
        versions = self.versions(name)
        if version is None:
            return versions[-1]
        for found in versions:
            if found.version == version:
                return found
        raise RegistryError(
            f"unknown version {version!r} of model {name!r}: its versions are "
            f"{', '.join(v.version for v in versions)}"
        )

    # Changing

    def add(
        self,
        name: str,
        path: str | Path,
        version: str,
        *,
        sign_key: Path | None = None,
        copy: bool = False,
        source: str | None = None,
        progress: Progress | None = None,
    ) -> ModelVersion:
        """Register the model directory ``path`` as ``name@version``, hashing every file.

        ``copy``: copy the files into ``registry_dir/NAME/VERSION`` first and hash the copy;
        ``sign_key``: sign the manifest with this EC private key (PEM); ``source``: where
        the model came from (default: ``path``, made absolute).
        """
        ref = f"{check_name('name', name)}@{check_name('version', version)}"
        origin = Path(path).expanduser().resolve()
        if not origin.is_dir():
            raise RegistryError(f"{origin} is not a directory: give the model's directory")
        if not (origin / "config.json").is_file():
            raise RegistryError(
                f"{origin} is not a model directory (no config.json): give the directory of "
                "a Hugging Face checkpoint, the one holding config.json and the weights"
            )
        if sign_key is not None:
            load_private_key(sign_key)
        with self.transaction() as db:
            if db.execute(
                select(model_versions.c.id).where(
                    model_versions.c.name == name, model_versions.c.version == version
                )
            ).first():
                raise _exists(ref)
        directory = copy_model(origin, self.registry_dir, name, version) if copy else origin
        try:
            manifest = build_manifest(directory, source or str(origin), progress=progress)
            signature, signer = (None, None)
            if sign_key is not None:
                signature, signer = sign_manifest(manifest, ref, sign_key)
            added = ModelVersion(
                name=name,
                version=version,
                path=directory,
                source=manifest.source,
                copied=copy,
                architecture=manifest.architecture,
                dtype=manifest.dtype,
                manifest=manifest,
                signature=signature,
                signer=signer,
                total_bytes=manifest.total_bytes,
                created_at=datetime.now(timezone.utc),
            )
            values = {**vars(added), "path": str(directory), "manifest": manifest.to_json()}
            try:
                with self.transaction() as db:
                    db.execute(model_versions.insert().values(**values))
            except exc.IntegrityError:
                raise _exists(ref) from None
        except BaseException:
            if copy:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        return added

    def remove(self, name: str, version: str) -> ModelVersion:
        """Forget ``name@version``; delete its files only if the registry copied them."""
        removed = self.get(name, version)
        with self.transaction() as db:
            db.execute(
                model_versions.delete().where(
                    model_versions.c.name == name, model_versions.c.version == version
                )
            )
        if removed.copied:
            delete_copy(removed)
        return removed

    def sign(
        self, name: str, version: str, sign_key: Path, *, progress: Progress | None = None
    ) -> ModelVersion:
        """Sign an existing version (replacing any signature), after checking its files."""
        load_private_key(sign_key)
        found = self.get(name, version)
        verify_files(found.path, found.manifest, label=found.ref, progress=progress)
        signature, signer = sign_manifest(found.manifest, found.ref, sign_key)
        with self.transaction() as db:
            db.execute(
                model_versions.update()
                .where(model_versions.c.name == name, model_versions.c.version == version)
                .values(signature=signature, signer=signer)
            )
        return replace(found, signature=signature, signer=signer)

    # Checking

    def verify(
        self,
        mv: ModelVersion,
        *,
        signatures: str = "optional",
        trusted_keys: Sequence[str | Path] = (),
        progress: Progress | None = None,
        workers: int | None = None,
        pin: bool = False,
    ) -> VerifyReport:
        """Check ``mv``'s signature under policy ``signatures`` (off, optional or required),
        then its files against its manifest (each file hashed once); with ``pin``, the
        report holds them open to load from (see :func:`verify_files`).

        Raises :class:`SignatureError` or :class:`IntegrityError` naming every problem.
        """
        signed_by = check_signature(
            mv.ref, mv.signature, mv.signer, mv.manifest, signatures, trusted_keys
        )
        report = verify_files(
            mv.path, mv.manifest, label=mv.ref, workers=workers, progress=progress, pin=pin
        )
        return replace(report, signed_by=signed_by)


def _exists(ref: str) -> RegistryError:
    return RegistryError(
        f"{ref} is already registered: versions never change; add a new version, or remove "
        f"this one first with `autoglm models remove {ref}`"
    )
