"""Prefix affinity without Ray: which replica a key prefers, and when load overrides it."""

from __future__ import annotations

from collections import Counter

from auto_glm.cluster.remote import affinity_key
from auto_glm.cluster.router import rank

REPLICAS = ["r1", "r2", "r3"]


def test_a_key_always_prefers_the_same_replica_and_keys_spread() -> None:
    keys = [affinity_key("tenant:a", [i, 1, 2, 3], 64) for i in range(300)]
    first = [rank(k, REPLICAS, {}, 4)[0] for k in keys]
    assert first == [rank(k, list(reversed(REPLICAS)), {}, 4)[0] for k in keys]  # order-free
    share = Counter(first)
    assert set(share) == set(REPLICAS) and min(share.values()) > 60


def test_losing_a_replica_moves_only_its_keys() -> None:
    keys = [affinity_key(None, [i], 64) for i in range(300)]
    before = {k: rank(k, REPLICAS, {}, 4)[0] for k in keys}
    after = {k: rank(k, ["r1", "r2"], {}, 4)[0] for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "r3")


def test_the_key_covers_the_tenant_and_the_first_blocks_only() -> None:
    prompt = list(range(100))
    assert affinity_key("t", prompt, 64) == affinity_key("t", prompt[:64] + [7] * 30, 64)
    assert affinity_key("t", prompt, 64) != affinity_key("u", prompt, 64)
    assert affinity_key("t", prompt, 64) != affinity_key("t", [1, *prompt[1:]], 64)


def test_a_busy_preferred_replica_gives_way_to_the_least_loaded() -> None:
    key = affinity_key(None, [1, 2, 3], 64)
    preferred = rank(key, REPLICAS, {}, 4)
    queues = {preferred[0]: 4, preferred[1]: 0, preferred[2]: 2}
    assert rank(key, REPLICAS, queues, 4) == preferred  # 4 more is within the allowance
    queues[preferred[0]] = 5
    assert rank(key, REPLICAS, queues, 4) == [preferred[1], preferred[2], preferred[0]]
