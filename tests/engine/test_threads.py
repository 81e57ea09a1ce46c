"""on_own_thread: the caller gets the function's result or its exception, and the thread
(with whatever per-thread state it built, such as an OpenMP team) is gone afterwards."""

from __future__ import annotations

import threading

import pytest

from auto_glm.engine.threads import on_own_thread


def test_returns_the_result_from_another_thread_that_has_ended():
    seen: list[threading.Thread] = []

    def work(a: int, b: int = 0) -> int:
        seen.append(threading.current_thread())
        return a + b

    assert on_own_thread(work, 2, b=3) == 5
    assert seen[0] is not threading.current_thread()
    assert not seen[0].is_alive()


def test_raises_the_functions_own_exception():
    def fail() -> None:
        raise ValueError("kv_cache_memory=1 holds no KV block")

    with pytest.raises(ValueError, match="holds no KV block"):
        on_own_thread(fail)
