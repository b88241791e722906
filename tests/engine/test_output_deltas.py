"""The engine streams deltas: each output carries only what is new, and they add up to the whole output."""

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob, accumulate

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    # No prefix cache: the streamed run then computes exactly what the whole run computed.
    return LLM(str(smollm2_path), enable_prefix_caching=False)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(n=3, temperature=0.9, seed=5, max_tokens=24, logprobs=2),
        # Greedy, the reply is "The capital of France is Paris."; the stop string spans three tokens.
        SamplingParams(n=2, temperature=0, max_tokens=30, logprobs=1, stop=["France is Paris"]),
    ],
    ids=["seeded-n3", "greedy-n2-stop-across-tokens"],
)
def test_deltas_concatenate_to_the_whole_output(llm, params):
    prompt = llm.tokenizer.encode_chat(QUESTION)
    (whole,) = llm.generate([prompt], params)
    engine = llm.engine
    engine.add_request("streamed", prompt, params)
    deltas: list[CompletionOutput] = []
    while engine.has_unfinished():
        for output in engine.step():
            deltas += output.outputs
    assert all(d.text or d.finish_reason for d in deltas)  # no empty delta before the last
    for sample in whole.outputs:
        mine = [d for d in deltas if d.index == sample.index]
        assert "".join(d.text for d in mine) == sample.text
        assert [t for d in mine for t in d.token_ids] == sample.token_ids
        assert [lp for d in mine for lp in d.logprobs] == sample.logprobs
        assert [d.finish_reason for d in mine] == [None] * (len(mine) - 1) + [sample.finish_reason]
    if params.stop:
        assert len(llm.tokenizer.encode(" France is Paris", add_special_tokens=False)) == 3
        assert [s.text for s in whole.outputs] == ["The capital of "] * 2
        assert all(s.stop_reason == "France is Paris" for s in whole.outputs)


def test_accumulate_appends_each_sample_and_keeps_the_first_prompt_logprobs():
    prompt_logprobs = [TokenLogprob(5, -1.0)]
    first = RequestOutput("r", None, [1, 5], [CompletionOutput(1, "a", [7], None, logprobs=[TokenLogprob(7, -0.5)])],
                          False, 0, RequestMetrics(0.0), prompt_logprobs)
    second = RequestOutput("r", None, [1, 5], [CompletionOutput(0, "b", [8], "stop", "x"),
                                               CompletionOutput(1, "c", [9], "length",
                                                                logprobs=[TokenLogprob(9, -0.25)])],
                           True, 0, RequestMetrics(0.0))
    whole = accumulate(accumulate(None, first), second)
    assert [(s.index, s.text, s.token_ids, s.finish_reason) for s in whole.outputs] == [
        (0, "b", [8], "stop"), (1, "ac", [7, 9], "length")]
    assert [lp.token_id for lp in whole.outputs[1].logprobs] == [7, 9]
    assert whole.outputs[0].stop_reason == "x" and whole.finished
    assert whole.prompt_logprobs is prompt_logprobs
