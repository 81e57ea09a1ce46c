"""Per-request view of the paged KV cache: block tables, slots and prefix caching."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

from auto_glm.engine.block_pool import BlockPool
from auto_glm.engine.request import Request

__all__ = ["KVCacheManager", "hash_block"]


def hash_block(
    parent_hash: int | None,
    token_ids: Sequence[int],
    cache_salt: str | None,
    image_hashes: Sequence[int] = (),
) -> int:
    """128-bit content hash of one full block, chained on the blocks before it.

    The salt enters only the first block (``parent_hash is None``); since every later hash
    depends on it, requests with different salts, or salt vs none, never share a block. A
    cryptographic digest makes a collision, which would serve another prompt's K/V,
    practically impossible. ``image_hashes`` are the content hashes of the images whose
    placeholder tokens overlap the block: their placeholders are identical token ids, so
    only these tell two different images apart.
    """
    digest = hashlib.blake2b(digest_size=16)
    if parent_hash is not None:
        digest.update(b"next" + parent_hash.to_bytes(16, "little"))
    elif cache_salt is None:
        digest.update(b"root")
    else:
        salt = cache_salt.encode()
        digest.update(b"salt" + len(salt).to_bytes(8, "little") + salt)
    digest.update(array("q", token_ids).tobytes())
    for image_hash in image_hashes:
        digest.update(b"image" + image_hash.to_bytes(16, "little"))
    return int.from_bytes(digest.digest(), "little")


class KVCacheManager:
    """Maps requests to block ids of a ``BlockPool`` and shares full blocks by content.

    The slot of token position ``p`` is ``block_ids[p // block_size] * block_size +
    p % block_size``. A block joins the prefix cache once all its tokens are computed.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size={block_size} is invalid: it must be >= 1")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._num_indexed: dict[str, int] = {}  # request id -> leading blocks in the index
        self.prefix_cache_queries = 0  # tokens looked up at admission
        self.prefix_cache_hits = 0  # of those, tokens found in the cache

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by requests; idle cached blocks count as free."""
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_blocks(self, request: Request) -> list[int]:
        """Block ids of the longest cached run of the request's leading full blocks.

        Only blocks inside the first ``num_tokens - 1`` tokens match: the last token must
        be computed to produce the logits of the next one. Takes no reference.
        """
        if not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        self._extend_hashes(request, max_blocks)
        hits = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def admit(self, request: Request, cached_blocks: list[int], num_new_tokens: int) -> bool:
        """Give a request without blocks ``cached_blocks`` plus room for the next tokens.

        ``cached_blocks`` comes from ``find_cached_blocks`` in the same step; the caller
        sets ``num_computed_tokens`` to ``len(cached_blocks) * block_size`` on success.
        Returns False, changing nothing, when the free blocks do not suffice.
        """
        if request.block_ids:
            raise RuntimeError(
                f"request {request.request_id!r} already holds blocks; "
                "free it before admitting it again"
            )
        pool = self.pool
        num_cached_tokens = len(cached_blocks) * self.block_size
        num_new_blocks = self.blocks_for(num_cached_tokens + num_new_tokens) - len(cached_blocks)
        num_idle_hits = sum(1 for block_id in cached_blocks if pool.ref_count(block_id) == 0)
        if num_new_blocks + num_idle_hits > pool.num_free_blocks:
            return False
        # Touch first so that allocate() cannot evict the very blocks being reused.
        pool.touch(cached_blocks)
        request.block_ids = list(cached_blocks) + pool.allocate(num_new_blocks)
        self._num_indexed[request.request_id] = len(cached_blocks)
        if self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_cached_tokens
        return True

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Make room for the tokens after ``num_computed_tokens``; False if blocks run out."""
        needed = self.blocks_for(request.num_computed_tokens + num_new_tokens) - len(
            request.block_ids
        )
        if needed <= 0:
            return True
        if needed > self.pool.num_free_blocks:
            return False
        request.block_ids.extend(self.pool.allocate(needed))
        return True

    def append_slots(self, request: Request, start: int, num_tokens: int, out: list[int]) -> None:
        """Append to ``out`` the slots of positions ``start .. start + num_tokens - 1``."""
        block_size = self.block_size
        block_ids = request.block_ids
        if num_tokens == 1:  # the decode fast path
            out.append(block_ids[start // block_size] * block_size + start % block_size)
            return
        pos, end = start, start + num_tokens
        while pos < end:
            index = pos // block_size
            stop = min(end, (index + 1) * block_size)
            offset = (block_ids[index] - index) * block_size  # slot = offset + position
            out.extend(range(offset + pos, offset + stop))
            pos = stop

    def cache_full_blocks(self, request: Request) -> None:
        """Index the request's blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        done = self._num_indexed[request.request_id]
        if num_full <= done:
            return
        self._extend_hashes(request, num_full)
        for index in range(done, num_full):
            self.pool.register(request.block_ids[index], request.block_hashes[index])
        self._num_indexed[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks; safe to call on a request that holds none."""
        # Last blocks first: they are evicted before the shared, more valuable prefix.
        self.pool.release(reversed(request.block_ids))
        request.block_ids = []
        self._num_indexed.pop(request.request_id, None)

    def _extend_hashes(self, request: Request, num_blocks: int) -> None:
        """Hash the request's full blocks up to ``num_blocks``; earlier hashes are kept."""
        hashes = request.block_hashes
        tokens = request.all_token_ids
        block_size = self.block_size
        parent = hashes[-1] if hashes else None
        images = request.images
        for index in range(len(hashes), num_blocks):
            start, end = index * block_size, (index + 1) * block_size
            block = tokens[start:end]
            if images:
                overlapping = [
                    image.content_hash
                    for offset, image in zip(request.image_offsets, images, strict=True)
                    if offset < end and offset + image.num_tokens > start
                ]
                parent = hash_block(parent, block, request.cache_salt, overlapping)
            else:
                parent = hash_block(parent, block, request.cache_salt)
            hashes.append(parent)
