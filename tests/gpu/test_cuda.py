"""The CUDA path: batched/chunked/preempted/cached = alone, greedy tokens against transformers, bf16 perplexity."""

import copy
from pathlib import Path

import pytest
import torch

from tokenmill.perplexity import perplexity
from tokenmill.sampling import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path needs an NVIDIA GPU; CI has none")

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
PROMPTS = ["The capital of France is", "Water boils at", "A short poem about the sea:", "def fibonacci(n):",
           "The three primary colors are", "Once upon a time, in a small village,", "Photosynthesis is the process",
           "The best way to learn a language is"]
SAMPLE = Path(__file__).parent.parent / "data" / "sample.txt"
LONG_CONTEXT = ("Here is some background first. The river Thames flows through London, past the Houses of Parliament "
                "and under Tower Bridge, before it widens into an estuary and meets the North Sea.")


@pytest.fixture
def tokens(run_prompts):
    """Each prompt's 32 greedy tokens."""
    return lambda engine, prompts: run_prompts(engine, prompts, GREEDY)


@pytest.fixture
def cuda_engine(make_engine):
    """An engine on the GPU with a 2 GiB KV pool unless told: sized from free memory, each would take 110 GiB."""
    return lambda **options: make_engine(device="cuda", **{"kv_cache_memory": 2, **options})


def _agree(ours: list[list[int]], alone: list[list[int]], dtype: str) -> bool:
    """Exactly in float32; in 16 bits, on most prompts: a batch's matmuls round otherwise than one row's, and a
    near-tie among 32 greedy tokens may flip, where a bug breaks every prompt."""
    same = sum(a == b for a, b in zip(ours, alone))
    return same == len(alone) if dtype == "float32" else same >= len(alone) - 2


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_chunked_preempted_cached_and_eager_runs_match_alone(cuda_engine, tokens, dtype):
    alone = [tokens(cuda_engine(dtype=dtype, enable_prefix_caching=False), [p])[0] for p in PROMPTS]
    assert _agree(tokens(cuda_engine(dtype=dtype), PROMPTS), alone, dtype)  # batched, decodes replayed as graphs
    assert _agree(tokens(cuda_engine(dtype=dtype, enforce_eager=True), PROMPTS), alone, dtype)
    chunked = cuda_engine(dtype=dtype, max_num_batched_tokens=8, max_num_seqs=8)
    assert _agree(tokens(chunked, PROMPTS), alone, dtype)
    # 8 sequences of 3 blocks each (prompts of 3-10 tokens, 32 generated) in 14 blocks: some are preempted.
    block_bytes = cuda_engine(dtype=dtype, kv_cache_memory=0.01).runner.kv_cache.block_bytes
    preempting = cuda_engine(dtype=dtype, kv_cache_memory=14 * block_bytes / 2**30)
    assert _agree(tokens(preempting, PROMPTS), alone, dtype)
    assert preempting.scheduler.num_preemptions > 0
    # Prompts of several blocks, so that the second run reads each one's full blocks from the cache.
    long_prompts = [f"{p} {LONG_CONTEXT}" for p in PROMPTS[:4]]
    long_alone = [tokens(cuda_engine(dtype=dtype, enable_prefix_caching=False), [p])[0] for p in long_prompts]
    cached = cuda_engine(dtype=dtype)
    tokens(cached, long_prompts)
    assert _agree(tokens(cached, long_prompts), long_alone, dtype)
    assert cached.block_manager.prefix_hits > 0


def test_an_int8_kv_pool_batched_and_replayed_as_graphs_matches_alone(cuda_engine, tokens):
    # The Triton kernel reads the int8 pool and its scales in place; a gather would not fit a graph of a long context.
    alone = [tokens(cuda_engine(dtype="bfloat16", kv_cache_dtype="int8", enable_prefix_caching=False), [p])[0]
             for p in PROMPTS]
    assert _agree(tokens(cuda_engine(dtype="bfloat16", kv_cache_dtype="int8"), PROMPTS), alone, "bfloat16")


def test_float32_greedy_tokens_match_transformers_on_most_prompts(make_engine, tokens, hf_smollm2):
    engine = make_engine(device="cuda", dtype="float32", quantization="none", kv_cache_memory=2)
    ours = tokens(engine, PROMPTS)
    reference = copy.deepcopy(hf_smollm2).to("cuda")
    equal = 0
    for prompt, mine in zip(PROMPTS, ours):
        ids = torch.tensor([engine.tokenizer.encode(prompt)], device="cuda")
        with torch.no_grad():
            out = reference.generate(ids, max_new_tokens=32, do_sample=False, min_new_tokens=32)
        equal += out[0, ids.shape[1]:].tolist() == mine
    assert equal >= 6, f"{equal} of {len(PROMPTS)} prompts gave transformers' 32 greedy tokens"


def test_bfloat16_perplexity_is_within_one_percent_of_float32(smollm2_path):
    from tokenmill import LLM

    results = {}
    for dtype in ("float32", "bfloat16"):
        llm = LLM(str(smollm2_path), device="cuda", dtype=dtype, quantization="none", kv_cache_memory=2)
        results[dtype] = perplexity(llm, llm.tokenizer.encode(SAMPLE.read_text()), context=512, stride=256).perplexity
    assert results["bfloat16"] == pytest.approx(results["float32"], rel=0.01)
