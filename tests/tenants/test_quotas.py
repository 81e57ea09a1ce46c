"""Per-tenant budgets with a controlled clock: windows, reservations, refunds, days."""

from __future__ import annotations

from datetime import date, datetime, timezone

import pytest

from auto_glm.tenants import Tenant, TenantLimits
from auto_glm.tenants.quotas import QuotaExceeded, Quotas, RateState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.day = date(2026, 11, 28)


def tenant(**limits) -> Tenant:
    return Tenant("t", TenantLimits(**limits), datetime(2026, 1, 1, tzinfo=timezone.utc))


@pytest.fixture
def clock() -> Clock:
    return Clock()


def quotas(clock: Clock, recorded: int = 0) -> Quotas:
    return Quotas(lambda name, day: recorded, clock=lambda: clock.now, today=lambda: clock.day)


def test_rpm_counts_a_sliding_minute(clock: Clock) -> None:
    q, t = quotas(clock), tenant(rpm=2)
    q.reserve(t, 1)
    clock.now += 30
    q.reserve(t, 1)
    with pytest.raises(QuotaExceeded) as caught:
        q.reserve(t, 1)
    assert caught.value.limit == "rpm" and caught.value.retry_after == 30
    clock.now += 30  # the first request leaves the window
    q.reserve(t, 1)


def test_tpm_reserves_then_refunds_what_was_not_used(clock: Clock) -> None:
    q, t = quotas(clock), tenant(tpm=100)
    first = q.reserve(t, 60)
    with pytest.raises(QuotaExceeded) as caught:
        q.reserve(t, 50)
    assert caught.value.limit == "tpm" and "60 used or reserved" in str(caught.value)
    q.settle(first, 20)
    q.settle(first, 0)  # a second settle changes nothing
    assert q.state(t).remaining_tokens == 80
    q.reserve(t, 50)
    with pytest.raises(QuotaExceeded, match="more than tenant 't'"):
        q.reserve(t, 101)  # could never fit


def test_daily_budget_starts_from_the_store_and_renews_each_day(clock: Clock) -> None:
    q, t = quotas(clock, recorded=90), tenant(daily_tokens=100)
    with pytest.raises(QuotaExceeded) as caught:
        q.reserve(t, 20)
    assert caught.value.limit == "daily_tokens" and "10 of its daily budget" in str(caught.value)
    held = q.reserve(t, 10)
    with pytest.raises(QuotaExceeded):
        q.check_requests(t)  # spent: refused before any work
    q.settle(held, 4)
    q.check_requests(t)
    clock.day = date(2026, 11, 29)
    assert quotas(clock).reserve(t, 100).tokens == 100


def test_a_refund_after_midnight_leaves_the_new_day_alone(clock: Clock) -> None:
    q, t = quotas(clock), tenant(daily_tokens=100)
    held = q.reserve(t, 80)
    clock.day = date(2026, 11, 29)
    q.reserve(t, 90)
    q.settle(held, 0)
    with pytest.raises(QuotaExceeded):
        q.reserve(t, 20)


def test_headers_in_openais_format(clock: Clock) -> None:
    q, t = quotas(clock), tenant(rpm=10, tpm=1000)
    q.reserve(t, 100)
    clock.now += 0.5
    headers = q.state(t).headers()
    assert headers == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900",
        "x-ratelimit-reset-tokens": "1m0s",
    }
    assert RateState(None, None, 0, 5, 5, 0.25).headers() == {
        "x-ratelimit-limit-tokens": "5",
        "x-ratelimit-remaining-tokens": "5",
        "x-ratelimit-reset-tokens": "250ms",
    }
    assert RateState(3, 0, 6.2, None, None, 0).headers()["x-ratelimit-reset-requests"] == "7s"


def test_unlimited_tenants_are_never_refused(clock: Clock) -> None:
    q, t = quotas(clock), tenant()
    for _ in range(1000):
        q.reserve(t, 10**6)
    assert q.state(t).headers() == {}
