"""Paged KV cache bookkeeping: a block pool with ref counts, an LRU free queue and
automatic prefix caching keyed by chained block hashes. Owns blocks, not policy."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pagedserve.engine.request import Request

BlockHash = bytes


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int],
                      extra: bytes = b"") -> BlockHash:
    """Hash of one full block, chained over its parent's hash so equal hashes mean equal
    prefixes. `extra` carries anything else that changes the KV (e.g. an adapter id)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent_hash or b"\0" * 16)
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    h.update(extra)
    return h.digest()


class KVCacheBlock:
    __slots__ = ("block_id", "ref_cnt", "block_hash", "prev_free", "next_free")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.prev_free: KVCacheBlock | None = None
        self.next_free: KVCacheBlock | None = None

    def __repr__(self) -> str:
        return f"KVCacheBlock({self.block_id}, ref_cnt={self.ref_cnt})"


class FreeBlockQueue:
    """Doubly linked list of free blocks, least recently used at the front. O(1) popleft,
    append and remove from the middle (when a cached free block gets a hit)."""

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._head = KVCacheBlock(-1)  # sentinels
        self._tail = KVCacheBlock(-1)
        self._head.next_free, self._tail.prev_free = self._tail, self._head
        self.num_free_blocks = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVCacheBlock:
        block = self._head.next_free
        if block is self._tail:
            raise ValueError("no free blocks left")
        self.remove(block)
        return block

    def remove(self, block: KVCacheBlock) -> None:
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        last = self._tail.prev_free
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self.num_free_blocks += 1

    def block_ids(self) -> list[int]:
        ids, block = [], self._head.next_free
        while block is not self._tail:
            ids.append(block.block_id)
            block = block.next_free
        return ids


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        self.cached_blocks: dict[BlockHash, KVCacheBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.free_block_queue.num_free_blocks

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        if num_blocks > self.num_free_blocks:
            raise ValueError(f"asked for {num_blocks} blocks, {self.num_free_blocks} free")
        blocks = []
        for _ in range(num_blocks):
            block = self.free_block_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            blocks.append(block)
        return blocks

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self.cached_blocks.get(block.block_hash) is block:
                del self.cached_blocks[block.block_hash]
            block.block_hash = None

    def get_cached_block(self, block_hash: BlockHash) -> KVCacheBlock | None:
        return self.cached_blocks.get(block_hash)

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on cache hits; a hit on a free block takes it off the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_block_queue.remove(block)
            block.ref_cnt += 1

    def cache_block(self, block: KVCacheBlock, block_hash: BlockHash) -> None:
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        # The first block computed for a hash stays the canonical one; a twin computed
        # concurrently keeps the hash only so that eviction stays consistent.
        self.cached_blocks.setdefault(block_hash, block)

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference each; blocks reaching zero join the free queue in the given
        order (first given is evicted first)."""
        for block in ordered_blocks:
            block.ref_cnt -= 1
            if block.ref_cnt < 0:
                raise RuntimeError(f"block {block.block_id} freed more often than allocated")
            if block.ref_cnt == 0:
                if not self.enable_caching:
                    block.block_hash = None
                self.free_block_queue.append(block)


@dataclass(slots=True)
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens served from the cache

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class KVCacheManager:
    """Per-request block tables over a BlockPool. The scheduler asks; this answers."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.block_pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        self.req_to_hashes: dict[str, list[BlockHash]] = {}
        # How many of a request's leading blocks are already published in the cache, so
        # each step publishes only the blocks it filled (not every full block again).
        self.req_to_num_cached_blocks: dict[str, int] = {}
        self.prefix_cache_stats = PrefixCacheStats()

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        pool = self.block_pool
        return 1.0 - pool.num_free_blocks / pool.num_blocks

    def _block_hashes(self, request: Request) -> list[BlockHash]:
        """Hashes of the request's full blocks, extended as tokens arrive."""
        hashes = self.req_to_hashes.setdefault(request.request_id, [])
        bs, tokens = self.block_size, request.all_token_ids
        for i in range(len(hashes), len(tokens) // bs):
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None,
                                            tokens[i * bs:(i + 1) * bs]))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of the request, as (blocks, num_tokens). The last token is
        always left to compute so its logits exist; prompt_logprobs needs every position."""
        if not self.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        hashes = self._block_hashes(request)
        max_hit_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in hashes[:max_hit_blocks]:
            block = self.block_pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed_blocks: Sequence[KVCacheBlock] = (),
                       ) -> list[KVCacheBlock] | None:
        """Give the request room for `num_new_tokens` more tokens past its computed ones
        (and past `new_computed_blocks`, prefix hits found at admission). Returns the newly
        allocated blocks, or None, changing nothing, when the pool cannot supply them."""
        blocks = self.req_to_blocks.get(request.request_id)
        bs = self.block_size
        if blocks is not None and not new_computed_blocks:
            num_tokens = request.num_computed_tokens + num_new_tokens
            if num_tokens <= len(blocks) * bs:
                # Most decode steps: the blocks held have room (publish one just filled).
                if self.enable_caching and num_tokens // bs > self.req_to_num_cached_blocks.get(
                        request.request_id, 0):
                    self._cache_full_blocks(request, blocks, num_tokens)
                return []
        if blocks is None:
            blocks = self.req_to_blocks[request.request_id] = []
        num_computed = request.num_computed_tokens + len(new_computed_blocks) * bs
        num_tokens = num_computed + num_new_tokens
        num_new_blocks = -(-num_tokens // bs) - len(blocks) - len(new_computed_blocks)
        # Hits on free blocks take them off the free queue, so they are not spare capacity.
        num_evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new_blocks > self.block_pool.num_free_blocks - num_evictable_hits:
            return None
        if not blocks and self.enable_caching:  # admission: count the lookup once
            self.prefix_cache_stats.queries += request.num_tokens
            self.prefix_cache_stats.hits += len(new_computed_blocks) * self.block_size
        self.block_pool.touch(new_computed_blocks)
        blocks.extend(new_computed_blocks)
        new_blocks = self.block_pool.get_new_blocks(max(num_new_blocks, 0))
        blocks.extend(new_blocks)
        if self.enable_caching:
            self._cache_full_blocks(request, blocks, num_tokens)
        return new_blocks

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock],
                           num_tokens: int) -> None:
        # Safe to publish before the step runs: each attention layer writes every new
        # token's KV before any query of the batch reads the cache.
        start = self.req_to_num_cached_blocks.get(request.request_id, 0)
        if num_tokens // self.block_size <= start:
            return  # no block filled since the last call
        hashes = self._block_hashes(request)
        end = min(num_tokens // self.block_size, len(hashes))
        for i in range(start, end):
            self.block_pool.cache_block(blocks[i], hashes[i])
        self.req_to_num_cached_blocks[request.request_id] = max(start, end)

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so that a prefix's last blocks are
        evicted before its first ones (which more requests are likely to share)."""
        blocks = self.req_to_blocks.pop(request.request_id, [])
        self.req_to_hashes.pop(request.request_id, None)
        self.req_to_num_cached_blocks.pop(request.request_id, None)
        self.block_pool.free_blocks(reversed(blocks))

    def get_block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(request_id, [])]

    def reset_prefix_cache(self) -> bool:
        """Forget all cached hashes; only possible while no request holds blocks."""
        if self.block_pool.num_free_blocks != self.block_pool.num_blocks:
            return False
        for block in self.block_pool.blocks:
            block.block_hash = None
        self.block_pool.cached_blocks.clear()
        return True
