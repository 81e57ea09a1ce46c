"""Prefix-aware replica choice for the engine deployment (a Ray Serve request router).

Requests that share a tenant and the first blocks of their prompt carry the same
``affinity`` key; rendezvous hashing of that key over the live replicas names a preferred
replica, so such requests meet the KV blocks that the first one left in its prefix cache
(and a replica that joins or leaves moves only its own share of keys). When the preferred
replica's queue is longer than the shortest queue by more than ``max_imbalance`` requests,
the request goes to the least loaded replica instead: affinity is worth a cache hit, not a
wait. Serve itself then checks the chosen replica's capacity and backs off if it is full.
"""

from __future__ import annotations

import hashlib
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

__all__ = ["PrefixAffinityRouter", "rank"]


def _score(key: str, replica: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{key}\0{replica}".encode()).digest()[:8], "big")


def rank(key: str, replicas: list[str], queues: dict[str, int], max_imbalance: int) -> list[str]:
    """Replica ids from most to least preferred for a request with affinity ``key``."""
    preferred = sorted(replicas, key=lambda r: _score(key, r), reverse=True)
    shortest = min((queues.get(r, 0) for r in replicas), default=0)
    if queues.get(preferred[0], 0) - shortest > max_imbalance:
        return sorted(preferred, key=lambda r: queues.get(r, 0))  # least loaded first
    return preferred


class PrefixAffinityRouter(RequestRouter):
    def initialize_state(self, max_imbalance: int = 4, **kwargs: Any) -> None:
        self.max_imbalance = max_imbalance

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        key = "" if pending_request is None else pending_request.kwargs.get("affinity", "")
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        cache = self.replica_queue_len_cache
        queues = {unique: cache.get(replica.replica_id) or 0 for unique, replica in by_id.items()}
        order = rank(key, list(by_id), queues, self.max_imbalance)
        return [[by_id[unique]] for unique in order]
