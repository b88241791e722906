"""Batched, chunked, preempted and prefix-cached runs give the same greedy tokens as each prompt alone."""

import random

import pytest
import torch

from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
WORDS = "the river mountain quietly seven engine cloud paper market orange history sings under bright".split()


def _prompts(count: int, seed: int, shared_prefix: str = "") -> list[str]:
    rng = random.Random(seed)
    return [shared_prefix + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) for _ in range(count)]


@pytest.fixture(scope="module")
def run(run_prompts):
    """run_prompts, greedy unless given other sampling params."""
    return lambda engine, prompts, params=GREEDY: run_prompts(engine, prompts, params)


def _alone(run, engine: LLMEngine, prompts: list[str]) -> list[list[int]]:
    return [run(engine, [p])[0] for p in prompts]


@pytest.fixture(scope="module")
def reference(make_engine, run):
    """Each of 32 mixed-length prompts run alone, prefix caching off."""
    prompts = _prompts(32, seed=1)
    return prompts, _alone(run, make_engine(enable_prefix_caching=False), prompts)


def test_32_prompts_batched_match_alone(make_engine, reference, run):
    prompts, alone = reference
    assert run(make_engine(enable_prefix_caching=False), prompts) == alone


def test_chunked_prefill_matches_alone(make_engine, reference, run):
    prompts, alone = reference
    engine = make_engine(enable_prefix_caching=False, max_num_batched_tokens=24, max_num_seqs=16)
    assert run(engine, prompts) == alone


def test_preempted_sequences_resume_with_same_tokens(make_engine, reference, run):
    prompts, alone = reference
    # 48 blocks of 16 tokens: room for a handful of these sequences at once, not 32.
    block_bytes = make_engine(kv_cache_memory=0.01).runner.kv_cache.block_bytes
    engine = make_engine(enable_prefix_caching=False, kv_cache_memory=48 * block_bytes / 2**30)
    assert engine.block_manager.num_blocks == 48
    assert run(engine, prompts) == alone
    assert engine.scheduler.num_preemptions > 0


def test_preempted_cached_runs_match_alone_and_count_each_prompt_once(make_engine, reference, drain):
    prompts, alone = reference
    block_bytes = make_engine(kv_cache_memory=0.01).runner.kv_cache.block_bytes
    engine = make_engine(kv_cache_memory=48 * block_bytes / 2**30)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    finals = [out for _, out in sorted(drain(engine).items(), key=lambda item: int(item[0]))]
    assert [out.outputs[0].token_ids for out in finals] == alone and engine.scheduler.num_preemptions > 0
    # A prompt is looked up once, its full blocks but the last token's: not again at each admission the pool
    # refused, nor after a preemption, when the hits are of the sequence's own output as well.
    block = engine.config.block_size
    assert engine.block_manager.prefix_queries == sum((len(out.prompt_token_ids) - 1) // block * block
                                                      for out in finals)
    assert all(out.num_cached_tokens < len(out.prompt_token_ids) for out in finals)


def test_prefix_cached_runs_match_alone(make_engine, run):
    prefix = "You are a careful assistant. Answer in one sentence, using plain words. " * 6
    prompts = _prompts(12, seed=2, shared_prefix=prefix)
    alone = _alone(run, make_engine(enable_prefix_caching=False), prompts)
    engine = make_engine(enable_prefix_caching=True)
    assert run(engine, prompts) == alone
    assert engine.block_manager.prefix_hits > 0


@pytest.mark.parametrize("kv_cache_dtype", ["bfloat16", "float16", "int8"])
def test_narrow_kv_batched_chunked_and_cached_runs_match_alone(make_engine, kv_cache_dtype, run):
    # A prompt's own keys go through the cache's rounding in prefill too, so chunking and prefix hits,
    # which read earlier keys back from the cache, see the values a whole prefill saw.
    prompts = _prompts(8, seed=3, shared_prefix="You are a careful assistant. Answer in plain words. " * 4)
    alone = _alone(run, make_engine(enable_prefix_caching=False, kv_cache_dtype=kv_cache_dtype), prompts)
    engine = make_engine(kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=24, max_num_seqs=16)
    assert engine.runner.kv_cache.pool.dtype == getattr(torch, kv_cache_dtype)
    assert run(engine, prompts) == alone
    assert engine.block_manager.prefix_hits > 0


def test_second_request_recomputes_at_most_one_block_of_a_shared_256_token_prefix(make_engine, drain):
    engine = make_engine(enable_prefix_caching=True)
    prefix = list(range(1000, 1256))  # 256 tokens = 16 full blocks
    two = SamplingParams(temperature=0, max_tokens=2)
    engine.add_request("first", prefix + [5, 6, 7], two)
    drain(engine)
    hits_before = engine.block_manager.prefix_hits
    engine.add_request("second", prefix + [8, 9], two)
    out = drain(engine)["second"]
    assert out.num_cached_tokens >= 256 - engine.config.block_size
    assert engine.block_manager.prefix_hits - hits_before == out.num_cached_tokens


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(make_engine, run):
    engine = make_engine()
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=42, max_tokens=24, ignore_eos=True)
    alone = run(engine, ["Tell me a story about a fox."], seeded)[0]
    others = [SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)] * 7
    for i, params in enumerate([seeded] + others):
        engine.add_request(f"b{i}", "Tell me a story about a fox." if i == 0 else f"Other prompt {i}", params)
    batched = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == "b0":
                batched += out.outputs[0].token_ids
    assert batched == alone
    # And a different seed samples something else, so the seed is what fixed the result.
    other = run(engine, ["Tell me a story about a fox."], SamplingParams(temperature=0.9, top_p=0.95, seed=43,
                                                                            max_tokens=24, ignore_eos=True))[0]
    assert other != alone


def test_prompt_logprobs_are_computed_once_whatever_the_preemptions(make_engine, drain, monkeypatch):
    prompts = _prompts(12, seed=1)
    block_bytes = make_engine(kv_cache_memory=0.01).runner.kv_cache.block_bytes
    engine = make_engine(enable_prefix_caching=False, kv_cache_memory=48 * block_bytes / 2**30)
    rows = []
    scored = engine.sampler.prompt_logprobs
    monkeypatch.setattr(engine.sampler, "prompt_logprobs", lambda logits, *args: rows.append(len(logits))
                        or scored(logits, *args))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, prompt_logprobs=0)
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    finals = drain(engine).values()
    assert engine.scheduler.num_preemptions > 0
    # Lined up with the prompt's tokens as vLLM does (a zip of the two paired each token with its neighbour's).
    assert all(len(out.prompt_logprobs) == len(out.prompt_token_ids) and out.prompt_logprobs[0] is None
               for out in finals)
    # A preempted sequence recomputed its prompt's logits (a vocabulary-wide row per token) and scored them again.
    assert sum(rows) == sum(len(out.prompt_token_ids) - 1 for out in finals)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_n_samples_score_the_prompt_once_and_share_its_blocks(make_engine, drain, monkeypatch, prefix_caching):
    engine = make_engine(enable_prefix_caching=prefix_caching)
    rows = []
    scored = engine.sampler.prompt_logprobs
    monkeypatch.setattr(engine.sampler, "prompt_logprobs", lambda logits, *args: rows.append(len(logits))
                        or scored(logits, *args))
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 6)  # four 16-token blocks
    alone = make_engine(enable_prefix_caching=prefix_caching)
    alone.add_request("one", prompt, SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1))
    expected = drain(alone)["one"].prompt_logprobs
    engine.add_request("n", prompt, SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=1, n=4))
    final = drain(engine)["n"]
    # Each of the 4 samples computed and scored the whole prompt again: a 6.7 KB request (n 16, a 1,000-token prompt,
    # logprobs 20) held the engine 185 s.
    assert sum(rows) == len(prompt) - 1 and final.prompt_logprobs == expected
    if prefix_caching:  # the siblings took the first sample's prompt blocks
        assert final.num_cached_tokens == 0 and engine.block_manager.prefix_hits >= 3 * 48
    assert len({tuple(s.token_ids) for s in final.outputs}) == 1  # greedy: every sample alike
