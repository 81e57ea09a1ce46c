"""Per-tenant budgets with a controlled clock: windows, reservations, refunds, days."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from auto_glm.tenants import Tenant, TenantLimits
from auto_glm.tenants.quotas import QuotaExceeded, Quotas, RateState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0  # monotonic seconds
        self.utc = datetime(2026, 11, 28, 23, 58, 30, tzinfo=timezone.utc)


def tenant(**limits) -> Tenant:
    return Tenant("t", TenantLimits(**limits), datetime(2026, 1, 1, tzinfo=timezone.utc))


@pytest.fixture
def clock() -> Clock:
    return Clock()


def quotas(clock: Clock, recorded: dict | None = None, asked: list | None = None) -> Quotas:
    def tokens_used(name: str, day: date) -> int:
        if asked is not None:
            asked.append((name, day))
        return (recorded or {}).get(day, 0)

    return Quotas(tokens_used, clock=lambda: clock.now, utc_now=lambda: clock.utc)


def refused(call, *args) -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as caught:
        call(*args)
    return caught.value


def test_rpm_counts_a_sliding_minute(clock: Clock) -> None:
    q, t = quotas(clock), tenant(rpm=2)
    q.reserve(t, 1)
    clock.now += 30
    q.reserve(t, 1)
    error = refused(q.reserve, t, 1)
    assert (error.limit, error.retry_after) == ("rpm", 30)
    assert str(error) == (
        "tenant 't' reached its limit of 2 requests per minute (rpm); retry after 30 s"
    )
    clock.now += 29.9
    assert refused(q.reserve, t, 1).retry_after == 1  # never less than 1 s
    clock.now += 0.1  # exactly a minute after the first: it has left the window
    q.reserve(t, 1)


def test_tpm_reserves_then_refunds_what_was_not_used(clock: Clock) -> None:
    q, t = quotas(clock), tenant(tpm=100)
    first = q.reserve(t, 60)
    clock.now += 20
    error = refused(q.reserve, t, 41)
    assert (error.limit, error.retry_after) == ("tpm", 40)
    assert str(error) == (
        "tenant 't' reached its limit of 100 tokens per minute (tpm): 60 used or reserved, "
        "this request may use 41; retry after 40 s or lower max_tokens"
    )
    q.reserve(t, 40)  # exactly up to the limit
    assert q.state(t).remaining_tokens == 0
    clock.now += 39.5
    assert refused(q.reserve, t, 1).retry_after == 1  # half a second left: never under 1 s
    q.settle(first, 20)
    q.settle(first, 0)  # a second settle changes nothing
    assert q.state(t).remaining_tokens == 40
    clock.now += 0.5  # the first reservation leaves the window, the second stays
    assert q.state(t).remaining_tokens == 60


def test_a_request_larger_than_the_tpm_limit_can_never_fit(clock: Clock) -> None:
    q, t = quotas(clock), tenant(tpm=100)
    q.reserve(t, 100)  # equal to the limit: fits in an empty window
    clock.now += 60
    error = refused(q.reserve, t, 101)
    assert (error.limit, error.retry_after) == ("tpm", None)  # no wait makes it fit
    assert str(error) == (
        "this request may use 101 tokens (prompt + max_tokens per choice), more than tenant "
        "'t''s limit of 100 tokens per minute (tpm), so it can never run; lower max_tokens "
        "or shorten the prompt"
    )
    q.reserve(t, 100)  # the refused request took nothing


def test_a_request_larger_than_the_daily_budget_can_never_fit(clock: Clock) -> None:
    q, t = quotas(clock), tenant(daily_tokens=100, tpm=1000)
    error = refused(q.reserve, t, 101)
    assert (error.limit, error.retry_after) == ("daily_tokens", None)
    assert "limit of 100 tokens a day (daily_tokens), so it can never run" in str(error)
    assert q.state(t).remaining_tokens == 1000


def test_daily_budget_starts_from_the_store_and_renews_at_midnight(clock: Clock) -> None:
    asked: list = []
    recorded = {date(2026, 11, 28): 90}
    q, t = quotas(clock, recorded, asked), tenant(daily_tokens=100)
    error = refused(q.reserve, t, 20)
    assert asked == [("t", date(2026, 11, 28))]
    assert (error.limit, error.retry_after) == ("daily_tokens", 90)  # 23:58:30 -> 00:00
    assert str(error) == (
        "this request may use 20 tokens but tenant 't' has 10 of its daily budget of 100 "
        "left (daily_tokens); lower max_tokens, or wait for 00:00 UTC"
    )
    held = q.reserve(t, 10)
    error = refused(q.check_requests, t)  # spent: refused before any work
    assert (error.limit, error.retry_after) == ("daily_tokens", 90)
    assert str(error) == (
        "tenant 't' used its daily budget of 100 tokens (daily_tokens); it renews at 00:00 UTC"
    )
    q.settle(held, 4)
    q.check_requests(t)
    clock.utc += timedelta(minutes=2)  # a new UTC day: the store is asked again
    assert q.reserve(t, 100).day == date(2026, 11, 29)
    assert asked[-1] == ("t", date(2026, 11, 29))


def test_a_refund_after_midnight_leaves_the_new_day_alone(clock: Clock) -> None:
    q, t = quotas(clock), tenant(daily_tokens=100)
    held = q.reserve(t, 80)
    clock.utc += timedelta(minutes=2)
    q.reserve(t, 90)
    q.settle(held, 0)
    error = refused(q.reserve, t, 20)
    assert "has 10 of its daily budget" in str(error)


def test_a_refund_on_the_same_day_returns_the_tokens(clock: Clock) -> None:
    q, t = quotas(clock), tenant(daily_tokens=100)
    held = q.reserve(t, 80)
    q.settle(held, 30)
    q.reserve(t, 70)  # 30 used + 70: exactly the budget
    assert "used its daily budget of 100" in str(refused(q.reserve, t, 1))


def test_headers_in_openais_format(clock: Clock) -> None:
    q, t = quotas(clock), tenant(rpm=10, tpm=1000)
    idle = q.state(t).headers()  # nothing in the window: nothing to reset
    assert (idle["x-ratelimit-reset-requests"], idle["x-ratelimit-reset-tokens"]) == ("0ms", "0ms")
    q.reserve(t, 100)
    clock.now += 0.5
    assert q.state(t).headers() == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900",
        "x-ratelimit-reset-tokens": "1m0s",
    }
    for _ in range(9):
        q.reserve(t, 1)
    assert q.state(t).remaining_requests == 0
    assert RateState(None, None, 0, 5, 5, 0.25).headers() == {
        "x-ratelimit-limit-tokens": "5",
        "x-ratelimit-remaining-tokens": "5",
        "x-ratelimit-reset-tokens": "250ms",
    }
    formats = {0.999: "999ms", 1.0: "1s", 1.5: "2s", 6.2: "7s", 59.0: "59s", 61.0: "1m1s"}
    for seconds, text in formats.items():
        assert (
            RateState(3, 0, seconds, None, None, 0).headers()["x-ratelimit-reset-requests"] == text
        )


def test_unlimited_tenants_are_never_refused(clock: Clock) -> None:
    q, t = quotas(clock), tenant()
    for _ in range(1000):
        q.reserve(t, 10**6)
    assert q.state(t).headers() == {}
