"""Hashing a model's files: streaming SHA-256, several files at once, and checking a manifest.

Each file is read in :data:`CHUNK_BYTES` chunks into one reused buffer; hashlib releases the
GIL while it hashes a chunk, so a thread pool hashes as many files at once as there are
cores (a whole file per worker: a model's weights are usually several shards).
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from auto_glm.registry.errors import IntegrityError
from auto_glm.registry.pinning import PinnedFiles

if TYPE_CHECKING:
    from auto_glm.registry.manifest import Manifest

__all__ = [
    "CHUNK_BYTES",
    "Progress",
    "Scan",
    "VerifyReport",
    "hash_files",
    "scan_directory",
    "verify_files",
]

CHUNK_BYTES = 1 << 20
"""Bytes read and hashed at a time: big enough to make per-call costs vanish, small enough
for the buffer to stay in a core's L2 cache between the read and the hash."""

Progress = Callable[[int, int], None]
"""``progress(bytes_done, bytes_total)``, called from the hashing threads, one call at a time."""

_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)  # a file swapped for a link after the scan is refused
_Keep = Callable[[int, os.stat_result], None]


@dataclass(frozen=True)
class Scan:
    """A directory's regular files (relative POSIX path: size) and the entries it refuses."""

    files: dict[str, int]
    refused: tuple[str, ...]


@dataclass(frozen=True)
class VerifyReport:
    """A passed check: the bytes hashed, the seconds it took, the files, and who signed."""

    bytes: int
    seconds: float
    files: int
    signed_by: str | None = None
    """The fingerprint of the trusted key whose signature verified, None if none was checked."""
    pinned: PinnedFiles | None = None
    """With ``pin=True``: the files as hashed, to load from (the caller closes them)."""


def _refusal(directory: Path, entry: os.DirEntry[str], relative: str) -> str:
    if not entry.is_symlink():
        return (
            f"'{relative}' is not a regular file (a device, socket or pipe); move it out of "
            "the model directory"
        )
    target = os.readlink(entry.path)
    resolved = Path(entry.path).resolve()
    where = "" if resolved.is_relative_to(directory.resolve()) else ", outside the directory"
    return (
        f"'{relative}' is a symbolic link (to '{target}'{where}); links are refused because "
        "what they point to can change after registration: replace it with the file itself "
        f"(cp -L), or copy the whole directory with `cp -rL {directory} NEW_DIR` and add that"
    )


def scan_directory(directory: Path) -> Scan:
    """Every regular file below ``directory``; links and special files go to ``refused``."""
    files: dict[str, int] = {}
    refused: list[str] = []
    pending = [("", Path(directory))]
    while pending:
        prefix, folder = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as error:
            refused.append(
                f"cannot list '{prefix or '.'}': {error.strerror}; check its permissions"
            )
            continue
        for entry in entries:
            relative = prefix + entry.name
            if entry.is_symlink():
                refused.append(_refusal(Path(directory), entry, relative))
            elif entry.is_dir(follow_symlinks=False):
                pending.append((relative + "/", Path(entry.path)))
            elif entry.is_file(follow_symlinks=False):
                files[relative] = entry.stat(follow_symlinks=False).st_size
            else:
                refused.append(_refusal(Path(directory), entry, relative))
    return Scan(dict(sorted(files.items())), tuple(sorted(refused)))


class _Counter:
    def __init__(self, total: int, callback: Progress | None) -> None:
        self._lock = threading.Lock()
        self._done = 0
        self._total = total
        self._callback = callback
        if callback is not None:
            callback(0, total)

    def add(self, count: int) -> None:
        if self._callback is None:
            return
        with self._lock:
            self._done += count
            self._callback(self._done, self._total)


def _hash_file(path: Path, counter: _Counter, keep: _Keep | None) -> tuple[str, int]:
    """SHA-256 and size of ``path``; ``keep(fd, status before hashing)`` takes the open
    descriptor once it is hashed, which is otherwise closed."""
    digest = hashlib.sha256()
    view = memoryview(bytearray(CHUNK_BYTES))
    size = 0
    fd = os.open(path, os.O_RDONLY | _NO_FOLLOW)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise OSError(f"{path} is not a regular file")
        with open(fd, "rb", buffering=0, closefd=False) as file:
            while count := file.readinto(view):
                digest.update(view[:count])
                size += count
                counter.add(count)
    except BaseException:
        os.close(fd)
        raise
    if keep is None:
        os.close(fd)
    else:
        keep(fd, before)
    return digest.hexdigest(), size


def hash_files(
    directory: Path,
    sizes: Mapping[str, int],
    *,
    workers: int | None = None,
    progress: Progress | None = None,
    pinned: PinnedFiles | None = None,
) -> tuple[dict[str, tuple[str, int]], dict[str, str]]:
    """SHA-256 of the files ``sizes`` names (relative path: expected size, for progress).

    Returns ``(hashed, unreadable)``: path to (hex digest, bytes read), and path to the
    reason it could not be read. ``workers`` threads (default: one per core) hash at once,
    the biggest files first so that no worker is left with a big one at the end. With
    ``pinned``, each hashed file's descriptor stays open there.
    """
    counter = _Counter(sum(sizes.values()), progress)
    order = sorted(sizes, key=lambda path: sizes[path], reverse=True)
    threads = max(1, min(workers or os.cpu_count() or 1, len(order) or 1))
    hashed: dict[str, tuple[str, int]] = {}
    unreadable: dict[str, str] = {}
    with ThreadPoolExecutor(threads, thread_name_prefix="autoglm-hash") as pool:
        futures = {
            path: pool.submit(
                _hash_file,
                Path(directory, path),
                counter,
                None if pinned is None else partial(pinned.hold, path),
            )
            for path in order
        }
        for path, future in futures.items():
            try:
                hashed[path] = future.result()
            except OSError as error:
                unreadable[path] = error.strerror or str(error)
    return hashed, unreadable


def _compare(manifest: Manifest, scan: Scan, label: str) -> tuple[list[str], dict[str, int]]:
    problems = list(scan.refused)
    to_hash: dict[str, int] = {}
    for entry in manifest.files:
        size = scan.files.get(entry.path)
        if size is None:
            problems.append(
                f"'{entry.path}' is missing (expected {entry.size} bytes, sha256 "
                f"{entry.sha256}); restore it"
            )
        elif size != entry.size:
            problems.append(
                f"'{entry.path}' has {size} bytes, expected {entry.size}: it changed since it "
                "was registered; restore it or register a new version"
            )
        else:
            to_hash[entry.path] = size
    known = {entry.path for entry in manifest.files}
    for path in scan.files:
        if path not in known:
            problems.append(
                f"unexpected file '{path}' is not in the manifest of {label}; remove it or "
                "register a new version"
            )
    return problems, to_hash


def verify_files(
    directory: str | Path,
    manifest: Manifest,
    *,
    label: str | None = None,
    workers: int | None = None,
    progress: Progress | None = None,
    pin: bool = False,
) -> VerifyReport:
    """Check that ``directory`` holds exactly the manifest's files, with their sizes and digests.

    Raises :class:`IntegrityError` naming every problem: a missing, resized, changed or
    unreadable file, a file the manifest does not list, a link. ``label`` names the model in
    messages (default: the directory). With ``pin``, the report holds the files open as they
    were hashed (:class:`~auto_glm.registry.pinning.PinnedFiles`), for a load from them.
    """
    start = time.perf_counter()
    directory = Path(directory)
    label = label or str(directory)
    if not directory.is_dir():
        raise IntegrityError(
            label,
            [
                f"the model directory {directory} is missing or not a directory; restore the "
                "files there, or remove the version and register it again"
            ],
        )
    problems, to_hash = _compare(manifest, scan_directory(directory), label)
    pinned = PinnedFiles(directory, label) if pin else None
    try:
        hashed, unreadable = hash_files(
            directory, to_hash, workers=workers, progress=progress, pinned=pinned
        )
        _check_digests(manifest, to_hash, hashed, unreadable, problems)
        if problems:
            raise IntegrityError(label, problems)
        if pinned is not None:
            pinned.link()
    except BaseException:
        if pinned is not None:
            pinned.close()
        raise
    return VerifyReport(
        bytes=sum(to_hash.values()),
        seconds=time.perf_counter() - start,
        files=len(manifest.files),
        pinned=pinned,
    )


def _check_digests(
    manifest: Manifest,
    to_hash: Mapping[str, int],
    hashed: Mapping[str, tuple[str, int]],
    unreadable: Mapping[str, str],
    problems: list[str],
) -> None:
    expected = {entry.path: entry for entry in manifest.files}
    for path in to_hash:
        if path in unreadable:
            problems.append(f"cannot read '{path}': {unreadable[path]}; check its permissions")
            continue
        digest, size = hashed[path]
        want = expected[path]
        if size != want.size:
            problems.append(
                f"'{path}' changed size while it was hashed ({size} bytes, expected "
                f"{want.size}); stop whatever writes it and verify again"
            )
        elif digest != want.sha256:
            problems.append(
                f"'{path}' has the wrong content: expected sha256 {want.sha256}, actual "
                f"{digest}; restore the registered file or register a new version"
            )
