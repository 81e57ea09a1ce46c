"""A verified version's files, held open from before they are hashed until its load ends.

Verifying by path and then loading by path leaves a window: a file replaced (renamed over)
or written between the two is loaded unverified, and so is a file added to the directory
after the check (a chat template, a tokenizer file). :class:`PinnedFiles` closes it: each
file is opened once, hashed through that descriptor, and loaded through it too, from
``directory``, which holds a link per manifest file to its descriptor (``/proc/self/fd/N``)
and nothing else. What is loaded is then what was hashed, whatever happens to the model's
directory meanwhile. A write into the same file (same inode) cannot be kept out, but it
changes the file's ctime, which no one can set back: :meth:`PinnedFiles.check_unchanged`
compares it, after the load, with its value before hashing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

from auto_glm.registry.errors import IntegrityError

__all__ = ["PinnedFiles"]

_FD_LINKS = Path("/proc/self/fd")  # Linux: a link here opens the descriptor's own file
_AGAIN = "stop whatever changes the model's files, then load it again"


def _identity(info: os.stat_result) -> tuple[int, ...]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class PinnedFiles:
    """Open descriptors of ``source``'s files (relative path: descriptor), and a directory to
    load them from. A context manager: leaving it closes them and removes the directory.

    Descriptors are inherited by an engine process as they are (``fds``), so the links work
    there too. Where ``/proc/self/fd`` does not exist, ``directory`` is ``source`` itself and
    only :meth:`check_unchanged` guards the load."""

    def __init__(self, source: Path, label: str) -> None:
        self.source, self.label = source, label
        self.directory = source
        self._held: dict[str, tuple[int, os.stat_result]] = {}
        self._lock = threading.Lock()
        self._links: Path | None = None

    def hold(self, relative: str, fd: int, before: os.stat_result) -> None:
        """Keep ``fd``, opened on ``relative`` whose status before hashing was ``before``
        (called from the hashing threads)."""
        with self._lock:
            self._held[relative] = (fd, before)

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(fd for fd, _ in self._held.values())

    def link(self) -> None:
        """Make ``directory``: a private one with a link per held file to its descriptor."""
        if not _FD_LINKS.is_dir():
            return
        links = Path(tempfile.mkdtemp(prefix=f"autoglm-verified-{Path(self.label).name}-"))
        self._links = links
        for relative, (fd, _) in self._held.items():
            (links / relative).parent.mkdir(parents=True, exist_ok=True)
            (links / relative).symlink_to(_FD_LINKS / str(fd))
        self.directory = links

    def check_unchanged(self) -> None:
        """Raise :class:`IntegrityError` naming every file written, or replaced in
        ``source``, since it was hashed."""
        problems = []
        for relative, (fd, before) in sorted(self._held.items()):
            try:
                now = os.stat(self.source / relative, follow_symlinks=False)
            except OSError as error:
                problems.append(
                    f"'{relative}' was removed while it was loaded ({error.strerror}); {_AGAIN}"
                )
                continue
            replaced = (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino)
            if replaced or _identity(os.fstat(fd)) != _identity(before):
                problems.append(
                    f"'{relative}' was written or replaced while it was loaded; {_AGAIN}"
                )
        if problems:
            raise IntegrityError(self.label, problems)

    def close(self) -> None:
        with self._lock:
            held, self._held = self._held, {}
        for fd, _ in held.values():
            os.close(fd)
        if self._links is not None:
            shutil.rmtree(self._links, ignore_errors=True)
            self._links = None
        self.directory = self.source

    def __enter__(self) -> PinnedFiles:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
