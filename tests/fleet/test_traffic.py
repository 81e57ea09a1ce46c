"""Traffic splitting and rollback rules, without a model: shares, stickiness, least-loaded
variants, and when a canary's outcomes break its rule."""

from __future__ import annotations

import math
import re
from collections import Counter

import pytest

from auto_glm.fleet.canary import OutcomeWindow, breach
from auto_glm.fleet.spec import ServeSpec, parse_duration
from auto_glm.fleet.traffic import Load, RollbackRule, Traffic, TrafficError

USERS = [f"user-{i}" for i in range(200)]


def test_weights_become_shares_and_the_largest_is_stable() -> None:
    traffic = Traffic({"v2": 1, "v1": 3, "v3": 0})
    assert traffic.weights == {"v1": 0.75, "v2": 0.25}  # zero weights are dropped
    assert traffic.stable == "v1" and traffic.canaries == ["v2"]
    assert Traffic({"a": 1, "b": 1}, stable="a").stable == "a"
    assert Traffic({"a": 1, "b": 1}, stable="gone").stable == "b"  # ties: by name


def test_weights_whose_sum_overflows_still_split_the_traffic() -> None:
    # 1e308 + 1e308 is inf: every share was 0.0, and every pick a ZeroDivisionError (sticky)
    # or a ValueError (weighted), a 500 for each request to the model
    huge = Traffic({"v1": 1e308, "v2": 1e308}, sticky="user")
    assert huge.weights == {"v1": 0.5, "v2": 0.5}
    assert set(huge.pick(user) for user in USERS) == {"v1", "v2"}
    assert Traffic({"v1": 3e307, "v2": 1e308}).weights == pytest.approx(
        {"v1": 0.3 / 1.3, "v2": 1 / 1.3}
    )
    assert Traffic({"v1": 5e-324, "v2": 5e-324}).weights == {"v1": 0.5, "v2": 0.5}


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({}, "weights: give at least one version a weight above 0"),
        ({"v1": 0}, "weights: give at least one version a weight above 0"),
        ({"v1": -1}, "weights.v1=-1 is invalid: use a number >= 0"),
        ({"v1": float("nan")}, "weights.v1=nan is invalid"),
        ({"v1": float("inf")}, "weights.v1=inf is invalid"),
    ],
)
def test_bad_weights_are_refused_by_name(weights: dict, message: str) -> None:
    with pytest.raises(TrafficError) as caught:
        Traffic(weights)
    assert str(caught.value).startswith(message.split(" is invalid")[0])
    assert message in str(caught.value)


def test_sticky_split_is_close_to_the_weights_and_stable_per_user() -> None:
    traffic = Traffic({"v1": 0.8, "v2": 0.2}, sticky="user")
    first = {user: traffic.pick(user) for user in USERS}
    assert all(traffic.pick(user) == first[user] for user in USERS for _ in range(3))
    share = Counter(first.values())["v2"] / len(USERS)
    assert abs(share - 0.2) <= 0.05
    many = Counter(traffic.pick(f"u{i}") for i in range(20_000))
    assert abs(many["v2"] / 20_000 - 0.2) < 0.01


def test_raising_the_canary_moves_users_only_towards_it() -> None:
    before = Traffic({"v1": 0.9, "v2": 0.1}, sticky="user")
    after = Traffic({"v1": 0.5, "v2": 0.5}, sticky="user")
    moved = [u for u in USERS if before.pick(u) != after.pick(u)]
    assert moved and all(before.pick(u) == "v1" and after.pick(u) == "v2" for u in moved)


def test_one_version_takes_every_request() -> None:
    traffic = Traffic.single("v7")
    assert (traffic.weights, traffic.stable, traffic.canaries) == ({"v7": 1.0}, "v7", [])
    assert {traffic.pick(key) for key in (None, "a", "b")} == {"v7"}


def test_weighted_traffic_ignores_load() -> None:
    traffic = Traffic({"v1": 0.8, "v2": 0.2}, sticky="user")
    busy = {"v1": Load(waiting=50, kv_usage=1.0), "v2": Load(waiting=0, kv_usage=0.0)}
    assert [traffic.pick(u, busy.__getitem__) for u in USERS] == [traffic.pick(u) for u in USERS]


def test_unsticky_picks_follow_the_weights() -> None:
    traffic = Traffic({"v1": 0.7, "v2": 0.3})
    picks = Counter(traffic.pick(None) for _ in range(20_000))
    assert abs(picks["v2"] / 20_000 - 0.3) < 0.02


def test_least_loaded_prefers_the_shorter_queue_then_free_cache() -> None:
    traffic = Traffic({"int8": 1, "bf16": 1}, policy="least_loaded")
    loads = {"int8": Load(waiting=3, kv_usage=0.1), "bf16": Load(waiting=0, kv_usage=0.9)}
    assert {traffic.pick(None, loads.__getitem__) for _ in range(50)} == {"bf16"}
    loads["bf16"] = Load(waiting=3, kv_usage=0.9)
    assert {traffic.pick(None, loads.__getitem__) for _ in range(50)} == {"int8"}


@pytest.mark.parametrize(
    ("rule", "words"),
    [
        ({}, "rollback checks nothing: set rollback.max_error_rate"),
        ({"max_error_rate": 0.1, "window_s": 3600}, "kept for 600 s"),
        ({"max_error_rate": 0.1, "window_s": 0}, "rollback.window_s=0 is invalid"),
        ({"max_p95_ttft_s": math.inf}, "rollback.max_p95_ttft_s=inf is invalid"),
        ({"max_error_rate": math.nan}, "rollback.max_error_rate=nan is invalid"),
    ],
)
def test_a_rule_that_cannot_judge_as_written_is_refused(rule: dict, words: str) -> None:
    """A window longer than the outcomes kept used to be cut to them without a word, and a
    rule without a check, or with an infinite limit, was taken."""
    with pytest.raises(TrafficError, match=re.escape(words)):
        RollbackRule(**rule)


def test_breach_needs_enough_requests_in_the_window() -> None:
    rule = RollbackRule(max_error_rate=0.05, window_s=60, min_requests=20)
    window = OutcomeWindow()
    for i in range(19):
        window.add(failed=True, ttft=None, now=100.0 + i)
    assert breach(rule, window, now=120.0) is None  # 19 < min_requests
    window.add(failed=True, ttft=None, now=120.0)
    reason = breach(rule, window, now=120.0)
    assert reason == (
        "error rate 1.000 over the last 60 s (20 of 20 requests) is above max_error_rate=0.05"
    )
    assert breach(rule, window, now=181.0) is None  # they left the window


def test_breach_by_error_rate_is_strictly_above_the_limit() -> None:
    rule = RollbackRule(max_error_rate=0.1, min_requests=10)
    window = OutcomeWindow()
    for i in range(10):
        window.add(failed=i == 0, ttft=0.01, now=1.0)
    assert breach(rule, window, now=1.0) is None  # exactly 0.1 is allowed
    window.add(failed=True, ttft=None, now=1.0)
    assert "error rate 0.182" in breach(rule, window, now=1.0)


def test_breach_by_p95_ttft() -> None:
    rule = RollbackRule(max_p95_ttft_s=2.0, min_requests=20)
    window = OutcomeWindow()
    for i in range(20):
        window.add(failed=False, ttft=0.5 if i < 19 else 3.0, now=1.0)
    assert breach(rule, window, now=1.0) is None  # the 95th percentile of 20 is the 19th
    window.add(failed=False, ttft=3.0, now=1.0)
    assert breach(rule, window, now=1.0) == (
        "p95 time to first token 3.000 s over the last 60 s (21 requests) is above max_p95_ttft_s=2"
    )


def test_the_window_keeps_its_horizon_and_its_boundaries() -> None:
    window = OutcomeWindow(horizon_s=600)
    window.add(failed=False, ttft=0.1, now=1000.0)
    window.add(failed=False, ttft=0.2, now=1600.0)  # exactly the horizon later: kept
    assert window.summary(1000, now=1600.0).requests == 2
    window.add(failed=False, ttft=0.3, now=1600.5)  # now the first is past the horizon
    assert window.summary(1000, now=1600.5).requests == 2
    assert window.summary(0.5, now=1600.5).requests == 2  # the window's edge is inclusive
    assert OutcomeWindow().horizon_s == 600


def test_the_window_reads_the_clock_when_not_told_the_time() -> None:
    window = OutcomeWindow()
    window.add(failed=True, ttft=None)
    assert window.summary(60).requests == 1 and window.summary(60).errors == 1


def test_p95_counts_successes_only_and_needs_one_of_them() -> None:
    window = OutcomeWindow()
    window.add(failed=False, ttft=0.25, now=1.0)
    assert window.summary(60, now=1.0).p95_ttft_s == 0.25
    window.add(failed=True, ttft=9.0, now=1.0)  # a failed request's first token is not judged
    assert window.summary(60, now=1.0).p95_ttft_s == 0.25
    empty = OutcomeWindow().summary(60, now=1.0)
    assert (empty.requests, empty.p95_ttft_s, empty.error_rate) == (0, None, 0.0)


def test_p95_exactly_at_the_limit_is_allowed() -> None:
    rule = RollbackRule(max_p95_ttft_s=2.0, min_requests=1)
    window = OutcomeWindow()
    window.add(failed=False, ttft=2.0, now=1.0)
    assert breach(rule, window, now=1.0) is None


def test_serve_entries_and_durations() -> None:
    assert ServeSpec.parse("chat@v2,keep_alive=10m,kv_share=2") == ServeSpec("chat", "v2", 600, 2)
    assert ServeSpec.parse({"name": "a", "keep_alive": 30}) == ServeSpec("a", None, 30.0)
    assert ServeSpec.parse("a").ref == "a" and ServeSpec.parse("a@b").ref == "a@b"
    assert [parse_duration(t, "x") for t in ("90", "30s", "1.5m", "2h")] == [90, 30, 90, 7200]
    for bad, words in [
        ("a b", "is not NAME or NAME@VERSION"),
        ("a,foo=1", "unknown option 'foo=1'"),
        ("a,kv_share=0", "kv_share='0' must be a number > 0"),
        ("a,keep_alive=soon", "keep_alive='soon' is not a duration"),
        ({"version": "v1"}, "needs name"),
    ]:
        with pytest.raises(ValueError, match=words):
            ServeSpec.parse(bad)
