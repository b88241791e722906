"""LLMEngine behaviour on the real model: aborts free blocks, stops, parallel samples, logprobs, limits."""

import os

import pytest

from tokenmill import LLM
from tokenmill.errors import InvalidRequestError, PromptTooLongError
from tokenmill.outputs import accumulate
from tokenmill.sampling import SamplingParams


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine(max_num_batched_tokens=64)


def test_abort_mid_prefill_and_mid_decode_returns_every_block(engine):
    bm = engine.block_manager
    start = bm.num_free_blocks
    long_prompt = list(range(300, 600))  # 300 tokens: five chunks of 64
    engine.add_request("prefilling", long_prompt, SamplingParams(max_tokens=50))
    engine.add_request("decoding", "Hello there", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.abort("prefilling")  # only its first chunk was computed
    for _ in range(3):
        engine.step()
    engine.abort("decoding")
    assert not engine.has_unfinished()
    assert bm.num_free_blocks == start
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_stop_string_ends_output_and_never_leaks_into_the_stream(engine):
    params = SamplingParams(temperature=0, max_tokens=64, stop=["Paris"])
    engine.add_request("s", "Q: What is the capital of France?\nA: The capital of France is", params)
    seen, whole = [], None
    while engine.has_unfinished():
        for out in engine.step():
            whole = accumulate(whole, out)
            seen.append(whole.outputs[0].text)
    final = seen[-1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == "Paris"
    assert "Paris" not in final
    # Every streamed text is a prefix of the final one, so no partial "P", "Pa"... ever showed.
    assert all(final.startswith(t) for t in seen)


@pytest.mark.parametrize("include", [False, True])
def test_a_stop_tokens_text_is_left_out_unless_asked_for(engine, drain, include):
    newline = engine.tokenizer.encode("\n", add_special_tokens=False)[0]
    prompt = "List the numbers one per line:\n1\n2\n3\n"
    params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[newline], include_stop_str_in_output=include)
    engine.add_request("ids", prompt, params)
    sample = drain(engine)["ids"].outputs[0]
    assert sample.finish_reason == "stop" and sample.stop_reason == newline and sample.token_ids[-1] == newline
    assert sample.text.endswith("\n") == include and "\n" not in sample.text[:-1]


def test_stop_strings_wait_for_min_tokens(engine, drain):
    prompt = "List the numbers one per line:\n1\n2\n3\n"
    engine.add_request("early", prompt, SamplingParams(temperature=0, max_tokens=30, stop=["\n"]))
    engine.add_request("late", prompt, SamplingParams(temperature=0, max_tokens=30, stop=["\n"], min_tokens=6))
    finals = drain(engine)
    early, late = finals["early"].outputs[0], finals["late"].outputs[0]
    assert early.finish_reason == late.finish_reason == "stop"
    assert len(early.token_ids) < 6 <= len(late.token_ids)
    # Newlines before min_tokens stay in the text; the first one after it ends the output.
    assert "\n" in late.text and late.text.startswith(early.text) and not late.text.endswith("\n")


def test_min_tokens_holds_back_stop_strings_as_long_as_stop_ids(engine, drain):
    # Greedy "4\n5\n...": the newline is token 2. A stop string ended the output there under min_tokens 2, where vLLM
    # goes on, as a stop id does (masked for the first 2 tokens).
    prompt = "List the numbers one per line:\n1\n2\n3\n"
    newline = engine.tokenizer.encode("\n", add_special_tokens=False)[0]
    engine.add_request("str", prompt, SamplingParams(temperature=0, max_tokens=12, stop=["\n"], min_tokens=2))
    engine.add_request("ids", prompt, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[newline],
                                                     min_tokens=2))
    finals = drain(engine)
    by_string, by_id = finals["str"].outputs[0], finals["ids"].outputs[0]
    assert by_string.token_ids[1] == newline and len(by_string.token_ids) > 2 and len(by_id.token_ids) > 2
    assert by_string.text.startswith("4\n") and by_string.finish_reason == "stop"


def test_offline_generate_stops_a_max_tokens_past_the_context_there_as_vllm_offline(smollm2_path):
    # The whole batch was refused for one prompt within max_tokens of the context; the engine (as vLLM's server)
    # still refuses such a request.
    llm = LLM(str(smollm2_path), max_model_len=64, kv_cache_memory=0.02)
    near, short = list(range(1000, 1060)), list(range(1000, 1010))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": near}, {"prompt_token_ids": short}], params)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4, 16]
    assert [o.outputs[0].finish_reason for o in outputs] == ["length", "length"]
    with pytest.raises(PromptTooLongError, match=r"requested 76 tokens \(60 in the prompt, 16 in the completion\)"):
        llm.engine.add_request("server", near, params)
    with pytest.raises(PromptTooLongError, match="no room for a token"):
        llm.generate([{"prompt_token_ids": list(range(1000, 1064))}], params)
    # max_tokens unset is the room left (4): a min_tokens past it ran to 4 tokens, "length", where vLLM refuses it.
    with pytest.raises(InvalidRequestError, match="min_tokens=10 is more than the 4 tokens"):
        llm.engine.add_request("server", near, SamplingParams(max_tokens=None, min_tokens=10))
    assert not llm.engine.has_unfinished()


def test_parallel_samples_share_prompt_blocks_and_follow_their_seeds(engine, drain):
    prompt = "Write one sentence about autumn leaves falling in a quiet park near the river."
    base = dict(temperature=1.0, max_tokens=12, ignore_eos=True)
    engine.add_request("n3", prompt, SamplingParams(n=3, seed=10, **base))
    finals = drain(engine)
    samples = [o.token_ids for o in finals["n3"].outputs]
    assert len(samples) == 3 and len({tuple(s) for s in samples}) == 3
    for i in range(3):  # sample i uses seed + i, exactly as a separate request would
        engine.add_request(f"single{i}", prompt, SamplingParams(seed=10 + i, **base))
    singles = drain(engine)
    assert [singles[f"single{i}"].outputs[0].token_ids for i in range(3)] == samples


def test_parallel_samples_compute_their_shared_prompt_once(make_engine, drain):
    engine = make_engine(max_num_batched_tokens=64)
    rows = []
    execute = engine.runner.execute
    engine.runner.execute = lambda scheduled: rows.append(sum(n for _, n in scheduled)) or execute(scheduled)
    prompt = list(range(300, 340))  # 40 tokens: two full blocks of 16 the samples can share
    engine.add_request("n3", prompt, SamplingParams(n=3, seed=10, temperature=1.0, max_tokens=2, ignore_eos=True))
    drain(engine)
    # The prompt's 40 rows once; each other sample its last, partial block's 8, then a decode each.
    assert engine.block_manager.prefix_hits == 2 * 32
    assert sum(rows) == 40 + 2 * 8 + 3


def test_logprobs_are_returned_per_token(engine, drain):
    engine.add_request("lp", "The capital of France is", SamplingParams(temperature=0, max_tokens=4, logprobs=3))
    out = drain(engine)["lp"].outputs[0]
    assert len(out.logprobs) == 4
    for token_id, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token_id and lp.top[0][0] == token_id and len(lp.top) == 3
        assert lp.logprob <= 0
    assert out.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in out.logprobs))


def test_request_that_cannot_fit_the_pool_is_rejected_at_admission(make_engine):
    block_bytes = make_engine(kv_cache_memory=0.01).runner.kv_cache.block_bytes
    small = make_engine(kv_cache_memory=20 * block_bytes / 2**30)  # 20 blocks = 320 tokens
    assert small.max_model_len == 320
    with pytest.raises(PromptTooLongError, match="maximum context length is 320"):
        small.add_request("big", list(range(100, 400)), SamplingParams(max_tokens=100))
    assert not small.has_unfinished()


def test_a_max_model_len_past_the_model_or_the_pool_is_refused_not_shortened(make_engine, monkeypatch):
    from tokenmill.engine import llm_engine

    with monkeypatch.context() as patch:  # refused before the weights load
        patch.setattr(llm_engine, "ModelRunner", lambda *args, **kwargs: pytest.fail("loaded the weights"))
        with pytest.raises(InvalidRequestError, match="max_model_len=100000 is more than the 8192 positions"):
            make_engine(max_model_len=100_000)
    block_bytes = make_engine(kv_cache_memory=0.01).runner.kv_cache.block_bytes
    with pytest.raises(InvalidRequestError, match=r"KV cache holds for one sequence \(320 tokens\)"):
        make_engine(kv_cache_memory=20 * block_bytes / 2**30, max_model_len=8000)
    assert make_engine(kv_cache_memory=20 * block_bytes / 2**30, max_model_len=320).max_model_len == 320


def test_a_kv_budget_below_one_block_is_refused_not_exceeded(make_engine):
    block_bytes = make_engine(kv_cache_memory=0.01).runner.kv_cache.block_bytes
    with pytest.raises(InvalidRequestError, match="is below one KV block"):  # it allocated one block regardless
        make_engine(kv_cache_memory=block_bytes / 2 / 2**30)


@pytest.mark.parametrize("times_ram", [2, 1e12 / 24])
def test_a_kv_budget_beyond_the_machines_memory_is_refused_before_any_mapping(make_engine, times_ram):
    # Twice the RAM was mmap's bare ENOMEM, 1e12 GiB an OverflowError; both tracebacks from LLM(...).
    ram_gib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    with pytest.raises(InvalidRequestError, match="GiB of memory"):
        make_engine(kv_cache_memory=times_ram * ram_gib)


def test_the_default_kv_budget_starts_on_a_machine_with_less_memory(make_engine, monkeypatch):
    # 1 GiB maps lazily (pages as they are written): a 512 MiB machine ran with it, and must still.
    sysconf = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 2**29 // sysconf("SC_PAGE_SIZE") if name == "SC_PHYS_PAGES"
                        else sysconf(name))
    kv = make_engine().runner.kv_cache
    assert kv.num_blocks * kv.block_bytes > 2**29


def test_higher_priority_request_is_admitted_first(make_engine, drain):
    engine = make_engine(max_num_seqs=1)
    engine.add_request("low", "first come", SamplingParams(max_tokens=2, priority=5))
    engine.add_request("high", "second come", SamplingParams(max_tokens=2, priority=0))
    first_out = engine.step()
    assert [o.request_id for o in first_out] == ["high"]
    drain(engine)


def test_the_heap_is_trimmed_once_as_decoding_resumes_after_a_large_prompt_step(make_engine, monkeypatch):
    import tokenmill.engine.model_runner as model_runner

    trims = []
    monkeypatch.setattr(model_runner, "return_freed_heap", lambda: trims.append(len(trims)))
    engine = make_engine(max_num_batched_tokens=256)
    engine.add_request("short", list(range(300, 340)), SamplingParams(max_tokens=3, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert trims == []  # a 40-row prompt step leaves little to return
    engine.add_request("long", list(range(300, 600)), SamplingParams(max_tokens=4, ignore_eos=True))
    engine.step()  # 256 prompt rows
    engine.step()  # the last 44, and the first token: still not decoding alone
    assert trims == []
    engine.step()
    assert trims == [0]  # the first decode step after them
    while engine.has_unfinished():
        engine.step()
    assert trims == [0]  # and no other
