"""Reference-counted KV block ids with an LRU free queue and a content-hash index."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

__all__ = ["BlockPool"]


class BlockPool:
    """Owns the ``num_blocks`` block ids; the model runner owns the tensors they index.

    A block is either referenced by running requests (ref count >= 1) or sits in the free
    queue. Free blocks that still hold a registered hash keep their content: a prefix-cache
    hit takes them back out of the queue. Allocation takes from the head of the queue, so
    the head is the block whose loss costs least.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(
                f"num_blocks={num_blocks} is invalid: the KV cache needs at "
                "least one block; give it more memory"
            )
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks  # [num_blocks]
        self._hashes: list[int | None] = [None] * num_blocks  # [num_blocks] content hash
        self._by_hash: dict[int, int] = {}  # content hash -> block id
        # Ordered dict as a linked list: O(1) pop at the head and removal from the middle.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> int | None:
        return self._hashes[block_id]

    def free_queue(self) -> list[int]:
        """Free block ids, next to be allocated first (for tests and debugging)."""
        return list(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Take ``num_blocks`` blocks from the head, evicting whatever they cached."""
        if num_blocks > len(self._free):
            raise RuntimeError(
                f"asked for {num_blocks} blocks but only {len(self._free)} "
                "are free; check num_free_blocks before allocating"
            )
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            block_hash = self._hashes[block_id]
            if block_hash is not None:
                del self._by_hash[block_hash]
                self._hashes[block_id] = None
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add a reference to cached blocks, taking idle ones out of the free queue."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop a reference; pass blocks in the order they should be evicted.

        Blocks that reach zero and hold a registered hash go to the tail (most recently
        used); blocks without one hold nothing reusable, so they go to the head and are
        handed out again before any cached content is evicted.
        """
        for block_id in block_ids:
            count = self._ref_counts[block_id]
            if count == 0:
                raise RuntimeError(f"block {block_id} was released more often than taken")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                self._free[block_id] = None
                if self._hashes[block_id] is None:
                    self._free.move_to_end(block_id, last=False)

    def lookup(self, block_hash: int) -> int | None:
        return self._by_hash.get(block_hash)

    def forget(self, block_ids: Iterable[int]) -> None:
        """Drop the hash of each of these blocks that is free, whose content can no longer
        be trusted: a prefix-cache lookup no longer finds it, and it is handed out again
        first. Blocks still referenced are left as they are."""
        for block_id in block_ids:
            block_hash = self._hashes[block_id]
            if self._ref_counts[block_id] == 0 and block_hash is not None:
                del self._by_hash[block_hash]
                self._hashes[block_id] = None
                self._free.move_to_end(block_id, last=False)

    def register(self, block_id: int, block_hash: int) -> None:
        """Index a full, computed block by its content hash.

        If another block already holds the same content, the index keeps that one: this
        block then stays unindexed and is recycled as plain free space when released.
        """
        if block_hash not in self._by_hash and self._hashes[block_id] is None:
            self._by_hash[block_hash] = block_id
            self._hashes[block_id] = block_hash
