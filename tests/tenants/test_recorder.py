"""UsageRecorder: cheap thread-safe adds, batched background writes, retries on failure."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from datetime import date

import pytest

from auto_glm.tenants import TenantStore, UsageDelta, UsageRecorder, UsageRow

DAY = date(2026, 7, 8)


class FlakyStore:
    """Passes ``add_usage`` on to a real store after failing the first ``failures`` calls."""

    def __init__(self, store: TenantStore, failures: int) -> None:
        self.store, self.failures, self.batches = store, failures, 0

    def add_usage(self, deltas: Sequence[UsageDelta]) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("database went away")
        self.batches += 1
        self.store.add_usage(deltas)


def test_adds_from_many_threads_are_merged_and_written_exactly(store: TenantStore) -> None:
    counted = FlakyStore(store, failures=0)
    recorder = UsageRecorder(counted, flush_interval=60)  # type: ignore[arg-type]

    def add() -> None:
        for _ in range(200):
            recorder.add(UsageDelta("acme", "m", DAY, requests=1, prompt_tokens=2))

    threads = [threading.Thread(target=add) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.usage() == []  # nothing written before a flush
    assert recorder.flush()
    recorder.close()
    assert store.usage() == [UsageRow("acme", "m", DAY, 800, 1600, 0, 0, 0)]
    assert counted.batches == 1  # 800 adds, one merged write


def test_the_background_thread_writes_every_interval(store: TenantStore) -> None:
    recorder = UsageRecorder(store, flush_interval=0.05)
    try:
        recorder.add(UsageDelta("acme", "m", DAY, requests=1))
        deadline = time.monotonic() + 10
        while not store.usage() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [row.requests for row in store.usage()] == [1]
    finally:
        recorder.close()


def test_a_failed_write_is_logged_and_retried(
    store: TenantStore, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = FlakyStore(store, failures=1)
    recorder = UsageRecorder(flaky, flush_interval=60)  # type: ignore[arg-type]
    recorder.add(UsageDelta("acme", "m", DAY, requests=1, completion_tokens=4))
    assert not recorder.flush()
    assert "could not write usage for 1 tenant/model/day rows (will retry)" in caplog.text
    assert "database went away" in caplog.text
    recorder.add(UsageDelta("acme", "m", DAY, requests=2, completion_tokens=1))
    recorder.close()  # flushes the failed batch and the new delta together
    assert store.usage() == [UsageRow("acme", "m", DAY, 3, 0, 0, 5, 0)]


def test_close_writes_what_is_left_and_refuses_more(store: TenantStore) -> None:
    recorder = UsageRecorder(store, flush_interval=60)
    recorder.add(UsageDelta("acme", "m", DAY, errors=1))
    recorder.close()
    assert [row.errors for row in store.usage()] == [1]
    with pytest.raises(RuntimeError, match="closed"):
        recorder.add(UsageDelta("acme", "m", DAY, errors=1))
