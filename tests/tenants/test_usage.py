"""Usage counts: upserts that add up exactly, also from concurrent threads and stores."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import date

import pytest

from auto_glm.tenants import TenantStore, TenantStoreError, UsageDelta, UsageRow

DAY = date(2026, 5, 6)


def _in_threads(count: int, work: Callable[[int], None]) -> None:
    failures: list[BaseException] = []

    def run(index: int) -> None:
        try:
            work(index)
        except BaseException as error:  # reported below
            failures.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_usage_is_added_to_its_tenant_model_and_day(store: TenantStore) -> None:
    store.add_usage(
        [
            UsageDelta("acme", "glm", DAY, requests=1, prompt_tokens=10, completion_tokens=5),
            UsageDelta("acme", "glm", DAY, requests=1, prompt_tokens=7, cached_tokens=3),
            UsageDelta("acme", "qwen", DAY, requests=1, errors=1),
        ]
    )
    store.add_usage([UsageDelta("acme", "glm", DAY, requests=2, completion_tokens=1)])
    assert store.usage() == [
        UsageRow("acme", "glm", DAY, 4, 17, 3, 6, 0),
        UsageRow("acme", "qwen", DAY, 1, 0, 0, 0, 1),
    ]
    assert store.tokens_used("acme", DAY) == 23
    assert store.tokens_used("acme", date(2026, 5, 7)) == 0
    assert store.tokens_used("nobody", DAY) == 0


def test_usage_filters_by_tenant_and_first_day(store: TenantStore) -> None:
    days = [date(2026, 5, d) for d in (1, 2, 3)]
    store.add_usage([UsageDelta(t, "m", d, requests=1) for t in ("b", "a") for d in days])
    assert [(r.day.day, r.tenant) for r in store.usage()] == [
        (1, "a"), (1, "b"), (2, "a"), (2, "b"), (3, "a"), (3, "b"),
    ]  # fmt: skip
    assert [r.day.day for r in store.usage("a", since=days[1])] == [2, 3]
    assert store.usage("c") == []


def test_nothing_to_add_is_a_no_op(store: TenantStore) -> None:
    store.add_usage([])
    assert store.usage() == []


def test_counts_beyond_32_bits_are_kept(store: TenantStore) -> None:
    store.add_usage([UsageDelta("acme", "m", DAY, prompt_tokens=3_000_000_000)] * 2)
    assert store.tokens_used("acme", DAY) == 6_000_000_000


def test_negative_counts_are_refused() -> None:
    with pytest.raises(TenantStoreError, match="usage errors=-1 is invalid"):
        UsageDelta("acme", "m", DAY, errors=-1)


def test_two_threads_adding_at_once_sum_exactly(store: TenantStore) -> None:
    def add(index: int) -> None:
        for _ in range(40):
            store.add_usage(
                [
                    UsageDelta("acme", "glm", DAY, requests=1, prompt_tokens=3),
                    UsageDelta("acme", "qwen", DAY, requests=1, completion_tokens=index + 1),
                ]
            )

    _in_threads(2, add)
    assert store.usage() == [
        UsageRow("acme", "glm", DAY, 80, 240, 0, 0, 0),
        UsageRow("acme", "qwen", DAY, 80, 0, 0, 120, 0),
    ]


def test_two_stores_adding_at_once_sum_exactly(database_url: str) -> None:
    # Two stores are two connection pools: what two server processes do.
    stores = [TenantStore(database_url), TenantStore(database_url)]

    def add(index: int) -> None:
        for round in range(40):
            # opposite row orders in the two stores: the store must order its writes
            models = ["a", "b", "c"] if index == 0 else ["c", "b", "a"]
            stores[index].add_usage(
                [UsageDelta("acme", m, DAY, requests=1, prompt_tokens=round) for m in models]
            )

    try:
        _in_threads(2, add)
        expected = [UsageRow("acme", m, DAY, 80, 2 * sum(range(40)), 0, 0, 0) for m in "abc"]
        assert stores[0].usage() == expected
    finally:
        for store in stores:
            store.close()
