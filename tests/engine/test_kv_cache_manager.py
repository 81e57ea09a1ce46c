"""Block pool and KV cache manager: exact block ids, slots, sharing and eviction."""

from __future__ import annotations

import pytest

from auto_glm.engine.block_pool import BlockPool
from auto_glm.engine.kv_cache_manager import KVCacheManager, hash_block
from auto_glm.engine.request import Request
from auto_glm.sampling_params import SamplingParams

BS = 4


def make_request(request_id: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(request_id, tokens, SamplingParams(), cache_salt=salt, arrival_time=0.0)


def admit(kv: KVCacheManager, request: Request) -> list[int]:
    """Admit the whole request in one chunk and mark it computed, as the scheduler would."""
    cached = kv.find_cached_blocks(request)
    num_cached = len(cached) * kv.block_size
    assert kv.admit(request, cached, request.num_tokens - num_cached)
    request.num_computed_tokens = request.num_tokens
    kv.cache_full_blocks(request)
    return cached


def slots(kv: KVCacheManager, request: Request, start: int, n: int) -> list[int]:
    out: list[int] = []
    kv.append_slots(request, start, n, out)
    return out


def test_allocation_and_slot_mapping_across_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_request("a", [1, 2, 3])
    b = make_request("b", list(range(10, 16)))
    assert kv.admit(a, [], 3) and a.block_ids == [0]
    assert kv.admit(b, [], 6) and b.block_ids == [1, 2]
    assert slots(kv, b, 0, 6) == [4, 5, 6, 7, 8, 9]
    kv.free(a)  # block 0 is uncached, so it is the next one handed out
    assert kv.pool.free_queue()[0] == 0
    b.num_computed_tokens = 6
    b.all_token_ids.extend([16, 17, 18])
    assert kv.allocate_slots(b, 3)
    assert b.block_ids == [1, 2, 0]
    assert slots(kv, b, 6, 3) == [10, 11, 0]
    assert slots(kv, b, 7, 1) == [11]
    assert slots(kv, b, 8, 1) == [0]
    assert kv.allocate_slots(b, 1)  # position 9 still fits in block 0
    assert b.block_ids == [1, 2, 0]


def test_allocation_failure_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=2, block_size=BS)
    a = make_request("a", list(range(6)))
    assert kv.admit(a, [], 6)
    b = make_request("b", [9])
    assert not kv.admit(b, [], 1)
    assert b.block_ids == [] and kv.num_free_blocks == 0
    a.num_computed_tokens = 6
    assert not kv.allocate_slots(a, 3)
    assert a.block_ids == [0, 1]


def test_common_prefix_is_shared() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(10)))
    assert admit(kv, a) == []
    assert a.block_ids == [0, 1, 2]
    b = make_request("b", [*range(8), 50, 51, 52])
    assert admit(kv, b) == [0, 1]
    assert b.block_ids == [0, 1, 3]
    assert [kv.pool.ref_count(i) for i in range(4)] == [2, 2, 1, 1]
    assert kv.prefix_cache_queries == 10 + 11
    assert kv.prefix_cache_hits == 8
    kv.free(a)
    assert [kv.pool.ref_count(i) for i in range(4)] == [1, 1, 0, 1]
    assert kv.usage == pytest.approx(3 / 8)


def test_salt_separates_caches() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    tokens = list(range(9))
    admit(kv, make_request("x1", tokens, salt="x"))
    assert kv.find_cached_blocks(make_request("y", tokens, salt="y")) == []
    assert kv.find_cached_blocks(make_request("none", tokens)) == []
    assert kv.find_cached_blocks(make_request("empty", tokens, salt="")) == []
    assert kv.find_cached_blocks(make_request("x2", tokens, salt="x")) == [0, 1]
    admit(kv, make_request("plain", tokens))
    assert kv.find_cached_blocks(make_request("plain2", tokens)) == [3, 4]


def test_hash_block_is_chained_and_stable() -> None:
    root = hash_block(None, [1, 2, 3, 4], None)
    assert root == hash_block(None, [1, 2, 3, 4], None)
    assert root != hash_block(None, [1, 2, 3, 4], "s")
    assert hash_block(root, [5, 6, 7, 8], None) != hash_block(None, [5, 6, 7, 8], None)
    assert hash_block(root, [5, 6, 7, 8], None) == hash_block(root, [5, 6, 7, 8], "ignored")
    assert 0 <= root < 2**128


def test_full_prompt_hit_leaves_one_token_to_compute() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    admit(kv, make_request("a", list(range(8))))
    same = make_request("same", list(range(8)))
    assert kv.find_cached_blocks(same) == [0]  # block 1 would cover the last token
    longer = make_request("longer", list(range(9)))
    assert kv.find_cached_blocks(longer) == [0, 1]


def test_generated_tokens_fill_and_cache_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", [7, 8, 9])
    admit(kv, a)
    assert kv.pool.block_hash(0) is None  # 3 of 4 slots: not full yet
    a.append_output_token(10)
    assert kv.allocate_slots(a, 1)
    a.num_computed_tokens = 4
    kv.cache_full_blocks(a)
    assert kv.pool.block_hash(0) == a.block_hashes[0]
    assert kv.find_cached_blocks(make_request("b", [7, 8, 9, 10, 11])) == [0]


def test_hit_on_idle_block_takes_it_out_of_free_queue() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(6)))
    admit(kv, a)
    kv.free(a)
    # Block 1 held 2 tokens (uncached) and went to the head; block 0 is cached at the tail.
    assert kv.pool.free_queue() == [1, 2, 3, 0]
    b = make_request("b", list(range(5)))
    assert admit(kv, b) == [0]
    assert b.block_ids == [0, 1]
    assert kv.pool.ref_count(0) == 1
    assert kv.pool.free_queue() == [2, 3]


def test_idle_hits_count_against_free_blocks() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", list(range(9)))
    admit(kv, a)
    kv.free(a)
    b = make_request("b", [*range(8), 99, 99, 99, 99, 99])  # 2 hits + 2 new blocks > 3 free
    cached = kv.find_cached_blocks(b)
    assert cached == [0, 1]
    assert not kv.admit(b, cached, 5)
    assert kv.num_free_blocks == 3 and kv.pool.block_hash(0) is not None


def test_lru_eviction_order() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_request("a", list(range(8)))
    b = make_request("b", list(range(100, 108)))
    admit(kv, a)
    admit(kv, b)
    assert (a.block_ids, b.block_ids) == ([0, 1], [2, 3])
    kv.free(a)
    kv.free(b)
    # Never-used blocks first, then A before B, each request's last block before its first.
    assert kv.pool.free_queue() == [4, 5, 1, 0, 3, 2]
    c = make_request("c", list(range(200, 212)))
    admit(kv, c)
    assert c.block_ids == [4, 5, 1]
    assert kv.pool.block_hash(1) == c.block_hashes[2]
    assert kv.find_cached_blocks(make_request("a2", list(range(9)))) == [0]
    assert kv.find_cached_blocks(make_request("b2", list(range(100, 109)))) == [2, 3]


def test_duplicate_content_is_not_indexed_twice() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(5)))
    b = make_request("b", list(range(5)))
    assert kv.admit(a, [], 5) and kv.admit(b, [], 5)  # same step: no hit yet
    for request in (a, b):
        request.num_computed_tokens = 5
        kv.cache_full_blocks(request)
    assert kv.pool.block_hash(0) == a.block_hashes[0]
    assert kv.pool.block_hash(2) is None
    kv.free(b)
    assert kv.pool.free_queue()[:2] == [2, 3]
    assert kv.find_cached_blocks(make_request("c", list(range(5)))) == [0]


def test_free_returns_usage_to_zero() -> None:
    kv = KVCacheManager(num_blocks=5, block_size=BS)
    requests = [make_request(str(i), list(range(i, i + 7))) for i in range(2)]
    for request in requests:
        admit(kv, request)
    assert kv.usage == pytest.approx(4 / 5)
    for request in requests:
        kv.free(request)
        kv.free(request)  # a second free is harmless
    assert kv.usage == 0.0 and kv.num_free_blocks == 5


def test_disabled_prefix_caching() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    admit(kv, make_request("a", list(range(9))))
    b = make_request("b", list(range(9)))
    assert admit(kv, b) == [] and b.block_ids == [3, 4, 5]
    assert b.block_hashes == []
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (0, 0)


def test_pool_rejects_misuse() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)
    with pytest.raises(ValueError) as caught:
        KVCacheManager(num_blocks=4, block_size=0)
    assert str(caught.value) == "block_size=0 is invalid: it must be >= 1"
    pool = BlockPool(2)
    with pytest.raises(RuntimeError, match="only 2 are free"):
        pool.allocate(3)
    pool.allocate(1)
    pool.release([0])
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release([0])


def test_smallest_pool_and_block_work() -> None:
    pool = BlockPool(1)
    assert pool.ref_count(0) == 0 and pool.free_queue() == [0]
    kv = KVCacheManager(num_blocks=3, block_size=1)
    assert [kv.pool.ref_count(i) for i in range(3)] == [0, 0, 0]
    a = make_request("a", [5, 6])
    assert admit(kv, a) == [] and a.block_ids == [0, 1]
    assert slots(kv, a, 0, 2) == [0, 1]
    assert kv.find_cached_blocks(make_request("b", [5, 6, 7])) == [0, 1]


def test_admitting_a_request_that_holds_blocks_is_refused() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", [1, 2])
    admit(kv, a)
    with pytest.raises(RuntimeError) as caught:
        kv.admit(a, [], 2)
    assert str(caught.value) == (
        "request 'a' already holds blocks; free it before admitting it again"
    )
    assert a.block_ids == [0] and kv.num_free_blocks == 3


def test_prefix_cache_counters_accumulate() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    for i, n in enumerate((9, 9, 13)):
        admit(kv, make_request(str(i), list(range(n))))
    assert kv.prefix_cache_queries == 9 + 9 + 13
    assert kv.prefix_cache_hits == 0 + 8 + 8


def test_allocate_slots_may_take_the_last_free_blocks() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", [1, 2, 3, 4])
    admit(kv, a)
    assert kv.allocate_slots(a, 8)  # positions 4..11: exactly the two free blocks
    assert a.block_ids == [0, 1, 2] and kv.num_free_blocks == 0
    assert not kv.allocate_slots(a, 9)


def test_chained_hashes_never_serve_a_block_with_another_prefix() -> None:
    """A block's K/V depend on every token before it, not only on its own tokens."""
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    admit(kv, make_request("a", [1, 2, 3, 4, 50, 51]))  # indexes [1, 2, 3, 4] only
    admit(kv, make_request("c", [9, 9, 9, 9, 5, 6, 7, 8, 60]))  # [5, 6, 7, 8] after 9s
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 70])
    assert kv.find_cached_blocks(b) == [0]  # c's second block is not b's


def test_a_duplicate_block_stays_unindexed() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a, b = make_request("a", list(range(5))), make_request("b", list(range(5)))
    assert kv.admit(a, [], 5) and kv.admit(b, [], 5)  # same step: b duplicates a's block 0
    for request in (a, b):
        request.num_computed_tokens = 5
        kv.cache_full_blocks(request)
    kv.free(a)
    kv.pool.allocate(kv.num_free_blocks)  # evicts a's block 0 and its hash
    assert kv.pool.lookup(b.block_hashes[0]) is None
    for token in (5, 6, 7):  # b fills its second block
        b.append_output_token(token)
    b.num_computed_tokens = 8
    kv.cache_full_blocks(b)
    # only the newly full block is indexed; b's first block stays plain (as registered)
    assert kv.pool.block_hash(b.block_ids[0]) is None
    assert kv.pool.block_hash(b.block_ids[1]) == b.block_hashes[1]


def test_free_forgets_the_request() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    requests = [make_request(str(i), list(range(i, i + 6))) for i in range(3)]
    for request in requests:
        admit(kv, request)
    for request in requests:
        kv.free(request)
    assert kv._num_indexed == {}  # no per-request state outlives the request


def test_forget_drops_idle_blocks_from_the_index_and_hands_them_out_first() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a, b = make_request("a", list(range(8))), make_request("b", list(range(100, 109)))
    admit(kv, a)
    admit(kv, b)
    kv.free(a)
    assert kv.pool.free_queue() == [5, 1, 0]  # b still holds 2, 3 and 4
    kv.pool.forget([1, 2, 5])  # 2 is held: it stays indexed; 5 holds no hash
    assert kv.pool.free_queue() == [1, 5, 0]
    assert kv.pool.block_hash(1) is None and kv.pool.block_hash(2) == b.block_hashes[0]
    assert kv.find_cached_blocks(make_request("a2", list(range(9)))) == [0]
    assert kv.find_cached_blocks(make_request("b2", list(range(100, 109)))) == [2, 3]
    kv.free(b)
    kv.pool.forget([2])  # its descendant, block 3, is unreachable without it
    assert kv.find_cached_blocks(make_request("b3", list(range(100, 109)))) == []
