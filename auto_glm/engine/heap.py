"""The cyclic garbage collector and the engine loop: an engine freezes the heap it starts on.

CPython's full collection walks every tracked object of the process while it holds the
GIL, so every engine loop and output thread waits for it, whichever thread set it off.
After an engine starts, most of those objects are what it was built from (the modules
torch, triton and transformers import, the model, its tokenizer), which live as long as it
does: on this project's 2-vCPU machine 373,000 objects, and one full collection during a
decode run at batch 256 took 178 ms, 40 times the step it landed in. So an engine, once
built, moves what the process holds out of the collector's sight (:func:`freeze_heap`,
``gc.freeze``); later collections walk only what came since (requests and their outputs).

A stopped engine's objects may sit in reference cycles (the core hands the runner a bound
method of its own), which only a collection of the whole heap frees, with its cache and
CUDA graphs: shutting down thaws the heap (:func:`thaw_heap`), and whoever drops a stopped
engine while others run collects it and freezes again (:func:`collect_and_freeze`).

:func:`gc_pause_seconds` is the time spent in collections since the first freeze, in all
threads: the benchmarks report it per decode step.
"""

from __future__ import annotations

import atexit
import gc
import time

__all__ = ["collect_and_freeze", "freeze_heap", "gc_pause_seconds", "thaw_heap"]

_pauses = {"total": 0.0, "start": 0.0}  # the process's collections; never nested


def _time_collection(phase: str, info: dict[str, int]) -> None:
    now = time.perf_counter()
    if phase == "start":
        _pauses["start"] = now
    else:
        _pauses["total"] += now - _pauses["start"]


def freeze_heap() -> None:
    """Move every object the process holds now out of the collector's sight (an engine has
    just been built); starts timing collections."""
    if _time_collection not in gc.callbacks:
        gc.callbacks.append(_time_collection)
        # an engine never shut down: the exit's last collection must still see everything,
        # or extension modules (triton's) report what it did not free as leaks
        atexit.register(thaw_heap)
    gc.freeze()


def thaw_heap() -> None:
    """Let the collector see every object again (an engine has stopped: its cycles can be
    freed now)."""
    gc.unfreeze()


def collect_and_freeze() -> None:
    """Free what stopped engines left in cycles, then freeze what is left (for the engines
    still running)."""
    gc.collect()
    freeze_heap()


def gc_pause_seconds() -> float:
    """Seconds spent in garbage collections, in every thread, since the first freeze."""
    return _pauses["total"]
