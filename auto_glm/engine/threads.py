"""Where an engine's torch work runs: one OpenMP team per process, when it can be.

torch's CPU kernels and oneDNN parallelise with OpenMP, and libgomp keeps a team of worker
threads for every thread that has run parallel work, for as long as that thread lives. Once
the process holds more of those threads than it has CPUs, libgomp stops letting idle
workers spin and puts them to sleep at once, so every parallel region (every norm, matmul or
activation) pays a futex wake-up: measured on a 2-vCPU VM, a 10 us op took 75-90 us on the
engine's loop thread after the main thread had run torch work, and a w8a8 decode step lost
its whole INT8 gain.

So an engine is built (weights loaded, quantized, checked, its cache allocated) on a thread
of its own that ends when the build does, taking its team with it; the engine loop's thread
is then the one torch thread of a process whose main thread runs no torch work (a server).
A process that computes on several threads at once (a script that also runs torch itself,
or several engines) still works, only at that cost.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

__all__ = ["on_own_thread"]

T = TypeVar("T")


def on_own_thread(fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """``fn(*args, **kwargs)`` run on a new thread that ends with it; its result, or its
    exception raised here."""
    outcome: list[tuple[bool, object]] = []

    def target() -> None:
        try:
            outcome.append((True, fn(*args, **kwargs)))
        except BaseException as exc:  # handed to the caller, who raises it
            outcome.append((False, exc))

    name = f"autoglm-build-{getattr(fn, '__name__', 'fn')}"
    # a daemon: Ctrl-C in the caller (waiting below) ends the process without waiting for it
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value  # type: ignore[misc]
    return value  # type: ignore[return-value]
