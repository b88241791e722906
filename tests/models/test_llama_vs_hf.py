"""The Llama model agrees with Hugging Face transformers on the same weights."""

import pytest
import torch
from oracles import greedy

from tokenmill import LLM, SamplingParams
from tokenmill.outputs import accumulate

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a land far away,",
    "Water boils at a temperature of",
    "<|im_start|>user\nList three primary colors.<|im_end|>\n<|im_start|>assistant\n",
    "1, 2, 3, 5, 8, 13,",
]


@pytest.fixture(scope="module")
def llm(smollm2_path):
    """The default engine: int4 weights for this Q4_1 file where the CPU kernel runs, float16 KV on CPU."""
    return LLM(str(smollm2_path))


@pytest.fixture(scope="module")
def float_llm(smollm2_path):
    """Nothing rounded that transformers keeps in float32: the model's math alone."""
    return LLM(str(smollm2_path), quantization="none", kv_cache_dtype="float32")


def test_last_position_logits_match_transformers(llm, float_llm, hf_smollm2, last_logits):
    for prompt in PROMPTS:
        ids = llm.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = hf_smollm2(torch.tensor([ids])).logits[0, -1]
        assert (last_logits(float_llm.engine, ids) - ref).abs().max().item() < 1e-3, prompt
        # The int4 kernel rounds its inputs to 16-bit levels, 0.0048 at most on these prompts with a float32
        # KV cache, and the default float16 KV rounds keys and values, 0.0116 together (measured).
        assert (last_logits(llm.engine, ids) - ref).abs().max().item() < 2e-2, prompt


def test_64_greedy_tokens_match_transformers(llm, hf_smollm2):
    # min_tokens masks EOS exactly as transformers' min_new_tokens does.
    params = SamplingParams(temperature=0, max_tokens=64, min_tokens=64)
    prompt_ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params)
    assert [o.outputs[0].token_ids for o in outputs] == greedy(hf_smollm2, prompt_ids, 64)


def test_prompt_logprobs_match_transformers_across_chunks(make_engine, hf_smollm2):
    # A 16-token budget splits each prompt into chunks, so rows from several steps are stitched together.
    engine = make_engine(max_num_batched_tokens=16, max_num_seqs=16, quantization="none", kv_cache_dtype="float32")
    ids = engine.tokenizer.encode(" ".join(PROMPTS))
    engine.add_request("p", ids, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3))
    whole = None
    while engine.has_unfinished():
        for out in engine.step():
            whole = accumulate(whole, out)
    assert whole.prompt_logprobs[0] is None
    ours = whole.prompt_logprobs[1:]
    with torch.no_grad():
        ref = torch.log_softmax(hf_smollm2(torch.tensor([ids])).logits[0, :-1], dim=-1)
    assert [lp.token_id for lp in ours] == ids[1:]
    expected = ref.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor([lp.logprob for lp in ours]), expected, atol=1e-3)
    assert [[t for t, _ in lp.top] for lp in ours] == ref.topk(3).indices.tolist()
