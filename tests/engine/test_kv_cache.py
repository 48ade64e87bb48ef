"""Exact bookkeeping of the block pool, free queue order and prefix-cache hits."""

import pytest

from pagedserve.engine.kv_cache import (
    FreeBlockQueue,
    KVCacheBlock,
    KVCacheManager,
    hash_block_tokens,
)
from pagedserve.engine.request import Request
from pagedserve.engine.sampling_params import SamplingParams


def make_request(request_id: str, tokens: list[int], **params) -> Request:
    return Request(request_id, tokens, SamplingParams(**params), max_tokens=16)


def test_free_queue_is_lru_with_o1_removal():
    blocks = [KVCacheBlock(i) for i in range(5)]
    queue = FreeBlockQueue(blocks)
    assert queue.block_ids() == [0, 1, 2, 3, 4]
    queue.remove(blocks[2])
    assert queue.popleft() is blocks[0]
    queue.append(blocks[0])
    assert queue.block_ids() == [1, 3, 4, 0]
    assert queue.num_free_blocks == 4


def test_allocate_exact_block_ids_and_free_order():
    kvm = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    req = make_request("a", list(range(10)))
    new = kvm.allocate_slots(req, 10)
    assert [b.block_id for b in new] == [0, 1, 2]
    assert [b.ref_cnt for b in new] == [1, 1, 1]
    assert kvm.num_free_blocks == 5
    # Two more tokens fit in block 2 (10 -> 12 slots); the 13th needs block 3.
    req.num_computed_tokens = 10
    assert kvm.allocate_slots(req, 2) == []
    assert [b.block_id for b in kvm.allocate_slots(req, 3)] == [3]
    kvm.free(req)
    # Freed tail first: block 3 is the first to be reused, block 0 the last.
    assert kvm.block_pool.free_block_queue.block_ids() == [4, 5, 6, 7, 3, 2, 1, 0]
    assert kvm.num_free_blocks == 8


def test_allocate_returns_none_without_side_effects():
    kvm = KVCacheManager(num_blocks=2, block_size=4)
    req = make_request("a", list(range(12)))
    assert kvm.allocate_slots(req, 12) is None
    assert kvm.num_free_blocks == 2
    assert kvm.get_block_ids("a") == []


def test_prefix_cache_hit_shares_blocks_and_keeps_last_token():
    kvm = KVCacheManager(num_blocks=10, block_size=4)
    a = make_request("a", list(range(10)))
    hits, num = kvm.get_computed_blocks(a)
    assert (hits, num) == ([], 0)
    kvm.allocate_slots(a, 10)
    # Same 8-token prefix (two full blocks), different tail.
    b = make_request("b", list(range(8)) + [99, 98])
    hits, num = kvm.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and num == 8
    new = kvm.allocate_slots(b, 2, hits)
    assert [x.block_id for x in new] == [3]
    assert [kvm.block_pool.blocks[i].ref_cnt for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    # A prompt that is exactly the cached blocks still recomputes its last token.
    c = make_request("c", list(range(8)))
    hits, num = kvm.get_computed_blocks(c)
    assert [h.block_id for h in hits] == [0] and num == 4
    # Stats count admissions (allocations), not lookups: a and b only.
    assert (kvm.prefix_cache_stats.queries, kvm.prefix_cache_stats.hits) == (20, 8)


def test_freed_blocks_stay_cached_until_evicted_lru():
    kvm = KVCacheManager(num_blocks=4, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])
    kvm.allocate_slots(a, 5)  # blocks 0, 1, 2 (block 2 partial: not cached)
    kvm.free(a)
    assert kvm.block_pool.free_block_queue.block_ids() == [3, 2, 1, 0]
    b = make_request("b", [1, 2, 3, 4, 9])
    hits, num = kvm.get_computed_blocks(b)
    assert [h.block_id for h in hits] == [0, 1] and num == 4
    kvm.allocate_slots(b, 1, hits)  # hits leave the free queue; new block is LRU head (3)
    assert kvm.get_block_ids("b") == [0, 1, 3]
    assert kvm.block_pool.free_block_queue.block_ids() == [2]
    kvm.free(b)
    # Evicting reuses the LRU block and drops its hash.
    c = make_request("c", [7, 7, 7, 7, 7, 7, 7])
    kvm.allocate_slots(c, 7)
    assert kvm.get_block_ids("c") == [2, 3, 1, 0]
    assert kvm.get_computed_blocks(make_request("d", [1, 2, 3, 4, 5]))[1] == 0


def test_hit_on_free_block_counts_against_capacity():
    kvm = KVCacheManager(num_blocks=3, block_size=2)
    a = make_request("a", [1, 2, 3, 4])
    kvm.allocate_slots(a, 4)
    kvm.free(a)
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7])
    hits, _ = kvm.get_computed_blocks(b)
    assert len(hits) == 2
    # 2 hits (free) + 2 new blocks needed > 3 blocks in all.
    assert kvm.allocate_slots(b, 3, hits) is None
    assert kvm.num_free_blocks == 3


def test_prompt_logprobs_disable_cache_hits():
    kvm = KVCacheManager(num_blocks=8, block_size=2)
    kvm.allocate_slots(make_request("a", [1, 2, 3, 4, 5]), 5)
    b = make_request("b", [1, 2, 3, 4, 5], prompt_logprobs=1)
    assert kvm.get_computed_blocks(b) == ([], 0)


def test_block_hash_chains_over_parent():
    h1 = hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(h1, [3, 4]) != hash_block_tokens(None, [3, 4])
    assert hash_block_tokens(h1, [3, 4]) == hash_block_tokens(h1, [3, 4])
    assert hash_block_tokens(None, [1, 2], b"adapter") != h1


def test_double_free_is_detected():
    kvm = KVCacheManager(num_blocks=2, block_size=2)
    block = kvm.block_pool.get_new_blocks(1)[0]
    kvm.block_pool.free_blocks([block])
    with pytest.raises(RuntimeError):
        kvm.block_pool.free_blocks([block])
