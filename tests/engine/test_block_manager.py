"""Block manager: reference counts, prefix-cache hits only on computed blocks, LRU eviction, no leaks."""

from types import SimpleNamespace

from tokenmill.engine.block_manager import BlockManager, block_hash
from tokenmill.sampling import SamplingParams


def _seq(tokens: list[int], cache_salt: str | None = None) -> SimpleNamespace:
    seq = SimpleNamespace(token_ids=list(tokens), block_table=[], block_hashes=[], num_computed_tokens=0,
                          num_cached_tokens=0, params=SamplingParams(cache_salt=cache_salt))
    seq.num_tokens = len(tokens)
    return seq


def _compute_all(bm: BlockManager, seq) -> None:
    bm.allocate(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = _seq(list(range(10)))
    assert bm.can_allocate(seq, 10)
    bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []


def test_shared_prefix_hits_only_after_it_is_computed():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = _seq(list(range(13)))
    bm.allocate_prefix(first)
    bm.allocate(first, 13)
    second = _seq(list(range(12)) + [99])
    bm.allocate_prefix(second)  # first's blocks are allocated but not computed yet: no hit
    assert second.num_computed_tokens == 0
    bm.free(second)
    first.num_computed_tokens = 13
    bm.cache_full_blocks(first)
    third = _seq(list(range(12)) + [99])
    bm.allocate_prefix(third)
    assert third.num_computed_tokens == 12 and third.block_table == first.block_table[:3]
    assert all(bm.blocks[b].ref_count == 2 for b in third.block_table)
    assert bm.prefix_hits == 0  # counted once a sequence is admitted, not at each lookup
    bm.count_prefix_hit(third)
    assert (third.num_cached_tokens, bm.prefix_queries, bm.prefix_hits) == (12, 12, 12)


def test_full_prompt_hit_still_leaves_the_last_token_to_compute():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = _seq(list(range(8)))
    _compute_all(bm, first)
    again = _seq(list(range(8)))
    bm.allocate_prefix(again)
    assert again.num_computed_tokens == 4  # the last block is recomputed to get logits


def test_freed_cached_blocks_are_reused_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = _seq([1, 2, 3, 4, 5])
    _compute_all(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.cached) == 2
    b = _seq([1, 2, 3, 4, 9])
    bm.allocate_prefix(b)
    assert b.num_computed_tokens == 4
    bm.free(b)
    # Filling the whole pool evicts the cached blocks, and their hashes disappear with them.
    c = _seq(list(range(100, 108)))
    bm.allocate(c, 8)
    assert bm.num_free_blocks == 0 and bm.cached == {}
    bm.free(c)
    d = _seq([1, 2, 3, 4, 9])
    bm.allocate_prefix(d)
    assert d.num_computed_tokens == 0


def test_different_parents_do_not_share_equal_blocks():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = _seq([1, 2, 3, 4, 0])
    _compute_all(bm, a)
    b = _seq([9, 9, 3, 4, 0])  # same second block, different first block
    bm.allocate_prefix(b)
    assert b.num_computed_tokens == 0


def test_freed_uncached_blocks_are_reused_before_untouched_or_cached_ones():
    bm = BlockManager(num_blocks=16, block_size=4)
    cached = _seq(list(range(8)))  # two full blocks, published in the prefix cache
    _compute_all(bm, cached)
    partial = _seq([50, 51, 52])  # one partial block: nothing to cache
    _compute_all(bm, partial)
    cached_blocks, reused_block = set(cached.block_table), partial.block_table[0]
    bm.free(cached)
    bm.free(partial)
    nxt = _seq([60, 61])
    bm.allocate(nxt, 2)
    assert nxt.block_table == [reused_block]  # warm, and worth nothing to the cache
    later = _seq(list(range(100, 152)))
    bm.allocate(later, 52)  # 13 blocks: exactly the untouched ones, so the cached prefix survives
    assert not cached_blocks & set(later.block_table) and len(bm.cached) == 2


def test_block_hashes_are_digests_that_no_crafted_prefix_can_reach():
    # Python's hash() of ints is public arithmetic (mod 2**61 - 1, and hash(-1) == hash(-2)): a prompt built so
    # that its chain reached another's parent hash was served that prompt's next block, KV and all.
    parent = block_hash(None, (1, 2))
    assert isinstance(parent, bytes) and len(parent) == 16
    assert block_hash(parent, (3, 4)) != block_hash(bytes(reversed(parent)), (3, 4)) != block_hash(None, (3, 4))


def test_a_cache_salt_shares_cached_blocks_only_with_requests_of_the_same_salt():
    # vLLM's cache_salt: one tenant must not hit (and time) another's cached prompt.
    bm = BlockManager(num_blocks=16, block_size=4)
    first = _seq(list(range(13)), cache_salt="tenant-a")
    bm.allocate_prefix(first)
    _compute_all(bm, first)
    hits = {}
    for salt in ("tenant-a", "tenant-b", None):
        seq = _seq(list(range(13)), cache_salt=salt)
        bm.allocate_prefix(seq)
        hits[salt] = seq.num_computed_tokens
        bm.free(seq)
    assert hits == {"tenant-a": 12, "tenant-b": 0, None: 0}
