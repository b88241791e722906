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


@pytest.fixture
def tokens(run_prompts):
    """Each prompt's 32 greedy tokens."""
    return lambda engine, prompts: run_prompts(engine, prompts, GREEDY)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batched_chunked_preempted_cached_and_eager_runs_match_alone(make_engine, tokens, dtype):
    alone = [tokens(make_engine(device="cuda", dtype=dtype, enable_prefix_caching=False), [p])[0] for p in PROMPTS]
    assert tokens(make_engine(device="cuda", dtype=dtype), PROMPTS) == alone  # batched, decodes replayed as graphs
    assert tokens(make_engine(device="cuda", dtype=dtype, enforce_eager=True), PROMPTS) == alone
    chunked = make_engine(device="cuda", dtype=dtype, max_num_batched_tokens=8, max_num_seqs=8)
    assert tokens(chunked, PROMPTS) == alone
    # About 14 blocks (bf16) for 8 sequences of 3 blocks each: some are preempted and recomputed.
    preempting = make_engine(device="cuda", dtype=dtype, kv_cache_memory=0.01)
    assert tokens(preempting, PROMPTS) == alone
    cached = make_engine(device="cuda", dtype=dtype)
    tokens(cached, PROMPTS)
    assert tokens(cached, PROMPTS) == alone  # the second time, every prompt's full blocks come from the cache


def test_an_int8_kv_pool_batched_and_replayed_as_graphs_matches_alone(make_engine, tokens):
    # The Triton kernel reads the int8 pool and its scales in place; a gather would not fit a graph of a long context.
    alone = [tokens(make_engine(device="cuda", dtype="bfloat16", kv_cache_dtype="int8", enable_prefix_caching=False),
                    [p])[0] for p in PROMPTS]
    assert tokens(make_engine(device="cuda", dtype="bfloat16", kv_cache_dtype="int8"), PROMPTS) == alone


def test_float32_greedy_tokens_match_transformers_on_most_prompts(make_engine, tokens, hf_smollm2):
    engine = make_engine(device="cuda", dtype="float32", quantization="none")
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
        llm = LLM(str(smollm2_path), device="cuda", dtype=dtype, quantization="none")
        results[dtype] = perplexity(llm, llm.tokenizer.encode(SAMPLE.read_text()), context=512, stride=256).perplexity
    assert results["bfloat16"] == pytest.approx(results["float32"], rel=0.01)
