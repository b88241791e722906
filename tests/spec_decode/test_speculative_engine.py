"""Speculative decoding changes when tokens come, never which: greedy outputs equal no speculation's."""

import pytest
import torch

from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.layers.attention import Attention
from tokenmill.sampling import SamplingParams

# Not adaptive: drafting then depends on the text alone, not on this machine's step times, so every path is
# taken on any CPU.
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5,
         "adaptive": False}
TEXTS = [
    "The river Thames flows through London, past the Houses of Parliament and under Tower Bridge, before it "
    "widens into an estuary and meets the North Sea.",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n",
    "Mix the flour with the butter, add two eggs, stir in the milk slowly, and bake for forty minutes.",
    "Alice sent the report to Bob on Monday; Bob read the report on Tuesday and sent it back to Alice.",
]


def _prompts(engine: LLMEngine) -> list[list[int]]:
    """Input-grounded prompts (repeat, edit) where lookup drafts get accepted, and open ones where they miss."""
    asks = [f"Repeat this text exactly:\n\n{t}" for t in TEXTS]
    asks += [f"Rewrite this text, changing only the names:\n\n{TEXTS[3]}", "Write a short poem about rain."]
    return [engine.tokenizer.encode_chat([{"role": "user", "content": a}]) for a in asks]


def _run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[tuple[list[int], str]]:
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] = tokens.get(out.request_id, []) + out.outputs[0].token_ids
            reasons[out.request_id] = out.outputs[0].finish_reason or reasons.get(out.request_id, "")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks  # no draft block leaked
    return [(tokens[str(i)], reasons[str(i)]) for i in range(len(prompts))]


def _params(count: int) -> list[SamplingParams]:
    """Cuts at odd max_tokens, and a stop string in the middle of the repeated text, where drafts run."""
    # The answers run 23 to 31 tokens; the poem runs on, repeating lines, to its max_tokens.
    base = [SamplingParams(temperature=0, max_tokens=m) for m in (61, 17, 50, 13, 21, 40)][:count]
    base[2] = SamplingParams(temperature=0, max_tokens=50, stop=["two eggs"])
    base[0] = SamplingParams(temperature=0, max_tokens=61, stop=["Tower"], include_stop_str_in_output=True)
    return base


@pytest.fixture(scope="module")
def reference(make_engine):
    engine = make_engine()
    prompts = _prompts(engine)
    params = _params(len(prompts))
    return prompts, params, [_run(engine, [p], [q])[0] for p, q in zip(prompts, params)]


def test_ngram_alone_and_batched_equals_no_speculation(make_engine, reference):
    prompts, params, expected = reference
    engine = make_engine(speculative_config=NGRAM)
    assert [_run(engine, [p], [q])[0] for p, q in zip(prompts, params)] == expected
    assert _run(engine, prompts, params) == expected
    counts = engine.drafter.counters
    # Drafts ran, most were accepted, and some were not: both paths of verification were taken.
    assert counts.num_accepted_tokens > counts.num_draft_tokens / 2
    assert counts.num_accepted_tokens < counts.num_draft_tokens
    assert [reason for _, reason in expected] == ["stop", "length", "stop", "length", "length", "length"]


def test_ngram_preempted_and_chunked_equals_no_speculation(make_engine, reference):
    prompts, params, expected = reference
    block_bytes = make_engine(kv_cache_memory=0.01).runner.kv_cache.block_bytes
    # 12 blocks of 16 tokens: two of these sequences at once, so drafts and preemption meet.
    engine = make_engine(speculative_config=NGRAM, kv_cache_memory=12 * block_bytes / 2**30,
                         max_num_batched_tokens=32, max_num_seqs=8)
    assert _run(engine, prompts, params) == expected
    assert engine.scheduler.num_preemptions > 0 and engine.drafter.counters.num_accepted_tokens > 0


def test_a_predicted_output_is_accepted_and_changes_nothing(make_engine, reference):
    prompts, params, expected = reference
    engine = make_engine()
    text = engine.tokenizer.decode(expected[1][0])
    predicted = SamplingParams(temperature=0, max_tokens=17, prediction=text)
    assert _run(engine, [prompts[1]], [predicted]) == [expected[1]]
    # Its own answer as the prediction: nearly every draft holds.
    counts = engine.drafter.counters
    assert counts.num_accepted_tokens >= 0.9 * counts.num_draft_tokens > 0
    # A prediction of another text drafts too, and still changes nothing.
    wrong = SamplingParams(temperature=0, max_tokens=17, prediction=TEXTS[2])
    assert _run(engine, [prompts[1]], [wrong]) == [expected[1]]


@pytest.mark.parametrize("method", ["draft_model", "early_exit"])
def test_model_drafts_batched_chunked_and_preempted_equal_no_speculation(make_engine, reference, smollm2_source,
                                                                          method):
    prompts, params, expected = reference
    config = {"method": method, "num_speculative_tokens": 3, "adaptive": False}
    # The default model drafts for itself (its own KV pool, int4 either way): every draft holds. Early exit
    # at layer 20 of 30 is mostly wrong: rejections on every path.
    config |= {"model": str(smollm2_source.path)} if method == "draft_model" else {"exit_layer": 20}
    block_bytes = make_engine(kv_cache_memory=0.01).runner.kv_cache.block_bytes
    # The target keeps 12 blocks either way: a draft model's pool of the same size shares the budget.
    blocks = 24 if method == "draft_model" else 12
    engine = make_engine(speculative_config=config, kv_cache_memory=blocks * block_bytes / 2**30,
                         max_num_batched_tokens=32, max_num_seqs=8)
    assert engine.runner.num_blocks == 12
    assert _run(engine, prompts, params) == expected
    counts = engine.drafter.counters
    assert engine.scheduler.num_preemptions > 0 and counts.num_accepted_tokens > 0
    if method == "early_exit":
        assert counts.num_accepted_tokens < counts.num_draft_tokens


def test_a_draft_models_pool_and_the_targets_fit_the_kv_budget_together(make_engine, smollm2_source):
    budget = 0.004  # GiB
    engine = make_engine(kv_cache_memory=budget, speculative_config={
        "method": "draft_model", "model": str(smollm2_source.path), "num_speculative_tokens": 2})
    pools = [engine.runner.model, engine.drafter.proposer.model]
    held = sum(layer.k_cache.nbytes + layer.v_cache.nbytes for model in pools for layer in model.modules()
               if isinstance(layer, Attention))
    assert budget * 2**30 - engine.runner.kv_cache.block_bytes * 2 < held <= budget * 2**30


def test_a_draft_model_loads_on_the_configured_threads(make_engine, smollm2_source, monkeypatch):
    from tokenmill.spec_decode import model_proposer

    seen = []

    def load_model(config, source):
        seen.append(torch.get_num_threads())
        return loaded(config, source)

    loaded = model_proposer.load_model
    monkeypatch.setattr(model_proposer, "load_model", load_model)
    threads = torch.get_num_threads()
    try:
        make_engine(num_threads=threads + 1, kv_cache_memory=0.004, speculative_config={
            "method": "draft_model", "model": str(smollm2_source.path), "num_speculative_tokens": 2})
    finally:
        torch.set_num_threads(threads)
    assert seen == [threads + 1]
