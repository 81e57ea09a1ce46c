"""The pipe between a server and its engine process: how the child starts, and how
messages cross.

The child is a fresh interpreter (``python -m auto_glm.cluster.process_main``), not a fork:
CUDA cannot be forked, and a fresh interpreter does not import the caller's main module.
The two ends are a socket pair; every message is one pickle (protocol 5, so that tensors of
image inputs travel by value) written with ``send_bytes``.
"""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from collections.abc import Callable
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import auto_glm
from auto_glm.engine.core import EngineDeadError

__all__ = ["dumps", "portable", "spawn"]

_POLL_S = 0.5


def dumps(message: Any) -> bytes:
    return pickle.dumps(message, protocol=5)


def portable(exc: BaseException) -> BaseException:
    """``exc`` if it pickles (its type and message cross the pipe as they are), else a
    RuntimeError that names it."""
    try:
        pickle.loads(dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def spawn(
    build: Callable[[], Any], name: str, fds: tuple[int, ...] = ()
) -> tuple[subprocess.Popen, Connection, dict[str, Any]]:
    """Start the engine process of ``name`` and wait until ``build()`` (a picklable callable
    from a module the child can import: it crosses to the child) has built its engine there;
    the process, the parent's end of the pipe and the engine's description. The child
    inherits ``fds`` under the same numbers. Raises what the build raised."""
    inner = build.func if isinstance(build, partial) else build
    if getattr(inner, "__module__", None) == "__main__":
        raise ValueError(
            f"{getattr(inner, '__qualname__', inner)!r} is defined in the script run as "
            "__main__, which the engine process does not import: define it in a module"
        )
    ours, theirs = socket.socketpair()
    conn = Connection(ours.detach())
    # the child imports this very auto_glm, wherever the parent found it
    root = str(Path(auto_glm.__file__).resolve().parents[1])
    paths = [root, *filter(None, [os.environ.get("PYTHONPATH")])]
    process = subprocess.Popen(
        [sys.executable, "-m", "auto_glm.cluster.process_main", str(theirs.fileno())],
        pass_fds=(theirs.fileno(), *fds),
        env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
    )
    theirs.close()
    # the path first (unpickling build may need it), and the logging to set up there; the
    # observability package (opentelemetry) only here: a GPU image may run engines without it
    from auto_glm.observability.logging import installed_logging

    conn.send_bytes(dumps((sys.path, installed_logging(), dumps(build))))
    while not conn.poll(_POLL_S) and process.poll() is None:
        pass
    try:
        kind, body = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        code = process.wait(timeout=30)
        raise EngineDeadError(
            f"the engine process for {name} exited with code {code} while loading; "
            "its log above says why"
        ) from None
    if kind == "failed":
        process.wait(timeout=30)
        raise body
    return process, conn, body
