"""Sliding-window KV: blocks that fall out of the window go back to their pool, none leak, and the budget grows."""

from types import SimpleNamespace

import pytest
import torch
import transformers

from tokenmill import LLM, SamplingParams
from tokenmill.engine.block_manager import RELEASED, BlockManager, block_hash

BLOCK, WINDOW = 4, 8  # a window of two blocks: a table holds at most 3 (the window straddles a block edge)


def _seq(tokens: list[int]) -> SimpleNamespace:
    seq = SimpleNamespace(token_ids=list(tokens), block_table=[], sliding_table=[], block_hashes=[],
                          num_computed_tokens=0, num_cached_tokens=0, draft_computed=0, params=SamplingParams())
    seq.num_tokens = len(tokens)
    return seq


def _step(bm: BlockManager, seq, n: int) -> None:
    """Compute n tokens of seq as a scheduler step would; a decode step first appends the token it sampled."""
    if seq.num_computed_tokens + n > seq.num_tokens:
        seq.token_ids.append(len(seq.token_ids))
        seq.num_tokens += 1
    assert bm.can_allocate(seq, n)
    bm.allocate(seq, n)
    seq.num_computed_tokens += n
    bm.cache_full_blocks(seq)
    bm.trim(seq)


def _all_free(bm: BlockManager) -> bool:
    pools = [bm.pool] + ([bm.sliding_pool] if bm.sliding_pool else [])
    return all(len(p.free_blocks) == p.num_blocks and all(b.ref_count == 0 for b in p.blocks) for p in pools)


def test_all_sliding_table_returns_blocks_as_the_sequence_grows():
    bm = BlockManager(num_blocks=8, block_size=BLOCK, sliding_window=WINDOW)
    seq = _seq(list(range(10)))
    _step(bm, seq, 10)
    # The next token (position 10) reads keys 3..10: block 0 is still read, nothing released yet.
    assert bm.held_blocks(seq) == [3]
    for _ in range(30):
        _step(bm, seq, 1)
        start = bm.window_start_block(seq.num_computed_tokens)
        assert seq.block_table[:start] == [RELEASED] * start and RELEASED not in seq.block_table[start:]
        assert bm.held_blocks(seq)[0] <= bm.max_window_blocks() == 3
    # 40 tokens computed: 10 blocks of context, more than the pool's 8, of which it holds only the window's.
    assert len(seq.block_table) == 10 and bm.num_free_blocks == 8 - bm.held_blocks(seq)[0]
    bm.free(seq)
    assert _all_free(bm)


def test_chunked_prefill_releases_behind_each_chunk():
    bm = BlockManager(num_blocks=6, block_size=BLOCK, sliding_window=WINDOW)
    seq = _seq(list(range(40)))  # 10 blocks of prompt through a pool of 6: only possible if chunks release
    for _ in range(5):
        _step(bm, seq, 8)
    assert seq.num_computed_tokens == 40 and bm.held_blocks(seq) == [2]  # blocks 8, 9: keys 33 on
    bm.free(seq)
    assert _all_free(bm)


def test_hybrid_keeps_the_full_table_and_bounds_the_sliding_one():
    bm = BlockManager(num_blocks=16, block_size=BLOCK, sliding_window=WINDOW, num_sliding_blocks=4)
    seq = _seq(list(range(20)))
    _step(bm, seq, 8)
    _step(bm, seq, 8)  # the sliding pool of 4 fits 20 tokens' window, not their 5 blocks
    _step(bm, seq, 4)
    for _ in range(20):
        _step(bm, seq, 1)
        full, sliding = bm.held_blocks(seq)
        assert full == len(seq.block_table) == bm.blocks_needed(seq.num_tokens) and sliding <= 3
    assert len(bm.sliding_pool.free_blocks) == 4 - sliding and bm.num_free_blocks == 16 - full
    bm.free(seq)
    assert _all_free(bm) and seq.sliding_table == [] and seq.block_table == []


@pytest.mark.parametrize("num_sliding_blocks, limit", [(2, 8), (8, 64)])
def test_a_sliding_pool_smaller_than_a_window_and_a_step_caps_the_context(num_sliding_blocks, limit):
    bm = BlockManager(num_blocks=16, block_size=BLOCK, sliding_window=WINDOW, num_sliding_blocks=num_sliding_blocks)
    assert bm.context_limit(step_tokens=BLOCK) == limit
    seq = _seq(list(range(limit)))  # the longest prompt the engine accepts goes through in steps of BLOCK
    for _ in range(limit // BLOCK):
        _step(bm, seq, BLOCK)
    assert seq.num_computed_tokens == limit


@pytest.mark.parametrize("num_sliding_blocks", [None, 6], ids=["all-sliding", "hybrid"])
def test_rejected_draft_blocks_and_preemption_leak_nothing(num_sliding_blocks):
    bm = BlockManager(num_blocks=12, block_size=BLOCK, sliding_window=WINDOW, num_sliding_blocks=num_sliding_blocks)
    seq = _seq(list(range(22)))
    _step(bm, seq, 22)
    seq.token_ids.append(0)
    seq.num_tokens += 1
    bm.allocate(seq, 1 + 7)  # the sampled token and 7 drafts: two blocks past the sequence's tokens
    seq.num_computed_tokens += 1 + 2  # two drafts accepted
    seq.token_ids += [1, 2, 3]
    seq.num_tokens += 3
    bm.cache_full_blocks(seq)
    bm.trim(seq)  # the rejected drafts' block goes back
    assert len(seq.block_table) == bm.blocks_needed(seq.num_tokens)
    assert all(h <= bm.max_window_blocks() for h in bm.held_blocks(seq)[-1:])
    bm.free(seq)  # as preemption and abort do
    assert _all_free(bm) and seq.num_computed_tokens == 0


def _chain(n: int) -> list[bytes]:
    """Prefix-cache hashes of the first n blocks of a list(range(...)) prompt."""
    hashes, parent = [], None
    for i in range(n):
        parent = block_hash(parent, tuple(range(i * BLOCK, (i + 1) * BLOCK)))
        hashes.append(parent)
    return hashes


def test_prefix_hit_needs_only_the_window_of_the_sliding_table():
    bm = BlockManager(num_blocks=16, block_size=BLOCK, sliding_window=WINDOW, num_sliding_blocks=8)
    first = _seq(list(range(25)))
    _step(bm, first, 25)
    bm.free(first)
    second = _seq(list(range(25)))
    bm.allocate_prefix(second)
    # 6 full blocks hit: the global table takes all six, the sliding one only blocks 4 and 5 (position 24, the
    # first to compute, reads keys from 17 on); blocks 0-3 need no KV, only their hashes.
    assert second.num_computed_tokens == 24
    assert second.block_table == [bm.cached[h] for h in _chain(6)]
    assert second.sliding_table == [RELEASED] * 4 + [bm.sliding_pool.cached[h] for h in _chain(6)[4:]]
    bm.free(second)
    assert _all_free(bm)


def test_evicted_sliding_block_inside_the_window_shortens_the_hit():
    bm = BlockManager(num_blocks=16, block_size=BLOCK, sliding_window=WINDOW, num_sliding_blocks=8)
    first = _seq(list(range(25)))
    _step(bm, first, 25)
    bm.free(first)
    # Evict the sliding pool's copy of block 5 (tokens 20..23), which a hit of 6 blocks would read.
    victim = bm.sliding_pool.cached.pop(_chain(6)[5])
    bm.sliding_pool.blocks[victim].hash = None
    second = _seq(list(range(25)))
    bm.allocate_prefix(second)
    assert second.num_computed_tokens == 20  # 5 blocks: the window before position 20 (blocks 3, 4) is cached
    bm.free(second)
    assert _all_free(bm)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory, smollm2_source):
    """A random Gemma 3: two sliding layers (window 8) and one global, with the default model's tokenizer."""
    path = tmp_path_factory.mktemp("gemma3_sliding")
    config = transformers.Gemma3TextConfig(
        architectures=["Gemma3ForCausalLM"], vocab_size=smollm2_source.config.vocab_size, hidden_size=64,
        intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], sliding_window=8,
        max_position_embeddings=512, initializer_range=0.2, eos_token_id=2, bos_token_id=1, pad_token_id=0,
    )
    torch.manual_seed(0)
    transformers.Gemma3ForCausalLM(config).eval().save_pretrained(path)
    smollm2_source.tokenizer.backend.save(str(path / "tokenizer.json"))
    return path


# 32 float32 blocks of every layer (3 layers, K and V, 16 tokens, 2 KV heads of 32).
BUDGET_BLOCKS = 32
BLOCK_BYTES = 3 * 2 * 16 * 2 * 32 * 4


def test_hybrid_pool_sizes_count_the_saving(tiny_gemma3, caplog):
    with caplog.at_level("INFO"):
        llm = LLM(str(tiny_gemma3), kv_cache_dtype="float32", kv_cache_memory=BUDGET_BLOCKS * BLOCK_BYTES / 2**30,
                  max_num_seqs=2, max_num_batched_tokens=16)
    kv = llm.engine.runner.kv_cache
    # Per sequence the sliding layers hold at most 2 blocks (window 8 in blocks of 16); 2 sequences with a step's
    # slack need 2 * 3 + 1 = 7. The 2 sliding layers' saved 2 * (32 - 7) blocks go to the one global layer.
    assert kv.max_window_blocks == 2 and kv.num_sliding_blocks == 7
    assert kv.num_blocks_without_release == 32 and kv.num_blocks == 32 + 2 * (32 - 7)
    assert kv.sliding_pool.shape[:3] == (2, 2, 7) and kv.pool.shape[:3] == (2, 1, 82)
    assert "KV budget fits 1312 tokens instead of 512" in caplog.text


def test_a_hybrid_engines_kv_usage_is_its_fullest_pools(tiny_gemma3):
    # The gauge counted the global layer's pool alone (82 blocks here), where the window pool (7) runs out first.
    llm = LLM(str(tiny_gemma3), kv_cache_dtype="float32", kv_cache_memory=BUDGET_BLOCKS * BLOCK_BYTES / 2**30,
              max_num_seqs=2, max_num_batched_tokens=16)
    engine, sliding = llm.engine, llm.engine.block_manager.sliding_pool
    engine.add_request("0", list(range(100, 132)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.step()
    held = sliding.num_blocks - len(sliding.free_blocks)
    assert held > 0 and engine.stats().kv_cache_usage == pytest.approx(held / sliding.num_blocks)
    assert llm.engine.abort("0") is not None and engine.stats().kv_cache_usage == 0


def test_hybrid_engine_returns_every_block_after_finish_abort_and_preemption(tiny_gemma3):
    # 6 blocks per layer: three 56-token sequences (4 blocks each) cannot all be in the global layer's pool.
    llm = LLM(str(tiny_gemma3), kv_cache_dtype="float32", kv_cache_memory=6 * BLOCK_BYTES / 2**30,
              max_num_seqs=3, max_num_batched_tokens=16)
    engine, bm = llm.engine, llm.engine.block_manager
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for i in range(4):
        engine.add_request(str(i), [100 + i] * 8 + list(range(200, 232)), params)
    most_sliding = 0
    for _ in range(8):
        engine.step()
        most_sliding = max([most_sliding] + [bm.held_blocks(s)[1] for s in engine.scheduler.running])
    assert engine.abort("0") is not None  # still running (or preempted): its blocks go back now
    while engine.has_unfinished():
        engine.step()
        most_sliding = max([most_sliding] + [bm.held_blocks(s)[1] for s in engine.scheduler.running])
    assert engine.scheduler.num_preemptions > 0
    assert 0 < most_sliding <= bm.max_window_blocks()  # between steps: only the window's blocks
    assert _all_free(bm)
