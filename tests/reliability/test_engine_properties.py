"""Random add / abort / step sequences over a tiny KV pool keep the block manager's invariants, and every request
that survives gives the same greedy tokens as when run alone."""

from collections import Counter

import pytest
import torch
import transformers
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tokenmill.config import EngineConfig
from tokenmill.engine.block_manager import RELEASED, block_hash
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.sampling import SamplingParams

# Two shared prefixes (a full block and more) so requests hit, share and evict prefix-cache blocks.
PREFIXES = [(), tuple(range(200, 221)), tuple(range(300, 334))]
NUM_BLOCKS = 6  # 96 tokens: the longest request (34 + 16 + 12 tokens, 4 blocks) fits alone, two of them do not


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm2_source) -> str:
    """A 2-layer random Llama with SmolLM2's tokenizer, saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(
        architectures=["LlamaForCausalLM"], vocab_size=smollm2_source.config.vocab_size, hidden_size=64,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, rope_theta=10000.0, eos_token_id=2, bos_token_id=1,
        initializer_range=0.2,  # large weights give peaked logits, so greedy choices are not near-ties
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
    smollm2_source.tokenizer.backend.save(str(path / "tokenizer.json"))
    return str(path)


def _engine(model: str, num_blocks: int, **options) -> LLMEngine:
    block_bytes = LLMEngine(EngineConfig(model=model, kv_cache_memory=0.001, kv_cache_dtype="float32")
                            ).runner.kv_cache.block_bytes
    engine = LLMEngine(EngineConfig(model=model, kv_cache_memory=num_blocks * block_bytes / 2**30,
                                    kv_cache_dtype="float32", **options))
    assert engine.block_manager.num_blocks == num_blocks
    return engine


@pytest.fixture(scope="module")
def engines(tiny_model):
    """A tiny-pool engine that chunks prompts (the one under test) and a roomy one that runs requests alone."""
    return _engine(tiny_model, NUM_BLOCKS, max_num_seqs=4, max_num_batched_tokens=24), _engine(tiny_model, 64)


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _check_blocks(engine: LLMEngine) -> None:
    """Reference counts equal holders, free means unheld, only cached blocks are shared, the cache matches tokens."""
    bm, pool = engine.block_manager, engine.block_manager.pool
    seqs = [seq for request in engine.requests.values() for seq in request.seqs]
    tables = {seq.seq_id: [b for b in seq.block_table if b != RELEASED] for seq in seqs}
    holders = Counter(b for table in tables.values() for b in table)
    for block in pool.blocks:
        assert block.ref_count == holders[block.block_id], f"block {block.block_id}"
        assert (block.ref_count == 0) == (block.block_id in pool.free_blocks), f"block {block.block_id}"
    for seq in seqs:
        table = tables[seq.seq_id]
        assert len(set(table)) == len(table), "a block twice in one table"
        if seq.is_finished or seq in engine.scheduler.waiting:
            assert not table, "a finished or waiting sequence holds blocks"
        parent = None
        for i, h in enumerate(seq.block_hashes):
            tokens = tuple(seq.token_ids[i * bm.block_size : (i + 1) * bm.block_size])
            assert h == block_hash(parent, tokens), "a block hash does not chain over the sequence's tokens"
            block = pool.blocks[seq.block_table[i]]
            assert block.hash in (None, h) and (block.hash is None or block.token_ids == tokens)
            parent = h
    for block_id, count in holders.items():
        assert count == 1 or pool.blocks[block_id].hash is not None, f"uncached block {block_id} is shared"
    for h, block_id in pool.cached.items():
        assert pool.blocks[block_id].hash == h
        assert len(pool.blocks[block_id].token_ids) == bm.block_size


_alone_cache: dict[tuple, list[int]] = {}


def _alone(engine: LLMEngine, prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    if (prompt, max_tokens) not in _alone_cache:
        engine.add_request("alone", list(prompt), _params(max_tokens))
        tokens: list[int] = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.outputs[0].token_ids
        _alone_cache[prompt, max_tokens] = tokens
    return _alone_cache[prompt, max_tokens]


prompts = st.tuples(st.sampled_from(PREFIXES), st.lists(st.integers(100, 120), min_size=1, max_size=16)).map(
    lambda parts: parts[0] + tuple(parts[1]))
ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), prompts, st.integers(1, 12)),
        st.tuples(st.just("abort"), st.integers(0, 11)),
        st.tuples(st.just("step"), st.integers(1, 4)),
    ),
    min_size=3, max_size=12,
)
preemptions: list[int] = []


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=ops)
# Always run: three long requests outgrow the pool (preemption), one is aborted mid-run, a fourth shares a prefix.
@example(ops=[("add", PREFIXES[2] + (100,) * 14, 12), ("add", PREFIXES[2] + (101,) * 14, 12),
              ("add", PREFIXES[2] + (102,) * 14, 12), ("step", 4), ("abort", 1), ("add", PREFIXES[2] + (103,), 5),
              ("step", 3)])
def test_random_add_abort_step_keep_blocks_consistent_and_outputs_equal_alone(engines, ops):
    engine, alone_engine = engines
    added: list[tuple[str, tuple[int, ...], int]] = []
    aborted: set[str] = set()
    outputs: dict[str, list[int]] = {}

    def step() -> None:
        for out in engine.step():
            outputs[out.request_id] = outputs.get(out.request_id, []) + out.outputs[0].token_ids

    before = engine.scheduler.num_preemptions
    for op in ops:
        if op[0] == "add":
            request_id = f"r{len(added)}"
            engine.add_request(request_id, list(op[1]), _params(op[2]))
            added.append((request_id, op[1], op[2]))
        elif op[0] == "abort" and added:
            request_id = added[op[1] % len(added)][0]
            engine.abort(request_id)
            aborted.add(request_id)
        elif op[0] == "step":
            for _ in range(op[1]):
                step()
        _check_blocks(engine)
    for _ in range(1000):  # drain; a scheduler that stops making progress fails below
        if not engine.has_unfinished():
            break
        step()
        _check_blocks(engine)
    assert not engine.has_unfinished() and not engine.requests
    assert engine.block_manager.num_free_blocks == NUM_BLOCKS, "blocks leaked"
    preemptions.append(engine.scheduler.num_preemptions - before)
    for request_id, prompt, max_tokens in added:
        if request_id not in aborted:
            assert outputs[request_id] == _alone(alone_engine, prompt, max_tokens), request_id


def test_the_random_sequences_preempted(engines):
    # NOTE: runs after the property test (file order); without preemption the tiny pool would test nothing.
    assert sum(preemptions) > 0
