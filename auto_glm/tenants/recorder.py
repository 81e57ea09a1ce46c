"""UsageRecorder: collects usage in memory and writes it to the store in batches."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from datetime import date

from auto_glm.tenants.models import UsageDelta
from auto_glm.tenants.store import TenantStore

__all__ = ["UsageRecorder"]

logger = logging.getLogger(__name__)


class UsageRecorder:
    """``add`` merges a delta in memory (cheap: the event loop calls it per request); a
    background thread writes the merged deltas with ``store.add_usage`` every
    ``flush_interval`` seconds. A failed write is logged and retried at the next flush, so
    nothing is lost while the process lives.
    """

    def __init__(self, store: TenantStore, flush_interval: float = 1.0) -> None:
        if flush_interval <= 0:
            raise ValueError(f"flush_interval must be positive, got {flush_interval}")
        self._store = store
        self._interval = flush_interval
        self._pending: dict[tuple[str, str, date], UsageDelta] = {}
        self._pending_lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one write at a time, in order
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="usage-recorder", daemon=True)
        self._thread.start()

    def add(self, delta: UsageDelta) -> None:
        """Count ``delta``; it reaches the database at the next flush."""
        if self._closed.is_set():
            raise RuntimeError("the usage recorder is closed: add usage before closing it")
        self._merge([delta])

    def flush(self) -> bool:
        """Write what has been added so far; False (and logged) if the write failed."""
        with self._flush_lock:
            with self._pending_lock:
                batch, self._pending = self._pending, {}
            if not batch:
                return True
            try:
                self._store.add_usage(list(batch.values()))
            except Exception as error:  # any failure: keep the counts for the next try
                self._merge(batch.values())
                logger.warning(
                    "could not write usage for %d tenant/model/day rows (will retry): %s",
                    len(batch),
                    error,
                )
                return False
            return True

    def close(self) -> None:
        """Stop the background thread and write what is left."""
        self._closed.set()
        self._thread.join()
        if not self.flush():
            logger.error(
                "usage not written at shutdown, lost: %s",
                ", ".join(f"{d.tenant}/{d.model}/{d.day}" for d in self._pending.values()),
            )

    def _merge(self, deltas: Iterable[UsageDelta]) -> None:
        with self._pending_lock:
            for delta in deltas:
                known = self._pending.get(delta.key)
                self._pending[delta.key] = delta if known is None else known + delta

    def _run(self) -> None:
        while not self._closed.wait(self._interval):
            self.flush()
