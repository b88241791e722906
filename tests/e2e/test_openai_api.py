"""The official openai client against a real server: completions and chat, whole and streamed, sync and async."""

import asyncio

import pytest
from openai import AsyncOpenAI, BadRequestError, NotFoundError, OpenAI


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture()
def async_client(server) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_models_lists_and_retrieves_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2-135m"]
    assert client.models.retrieve("smollm2-135m").id == "smollm2-135m"
    with pytest.raises(NotFoundError):
        client.models.retrieve("gpt-9")


def test_greedy_completion_names_paris_with_usage(client, smollm2_source):
    prompt = "The capital of France is"
    result = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=8, temperature=0)
    assert result.choices[0].text.startswith(" Paris")
    assert result.choices[0].finish_reason == "length"
    assert result.usage.prompt_tokens == len(smollm2_source.tokenizer.encode(prompt))
    assert result.usage.completion_tokens == 8
    assert result.usage.total_tokens == result.usage.prompt_tokens + 8


def test_logit_bias_bans_and_forces_tokens_as_openai_defines_it(client, smollm2_source):
    # It was refused with a 400; OpenAI and vLLM take it (biases past +-100 clamped, as vLLM).
    prompt, tokenizer = "The capital of France is", smollm2_source.tokenizer
    (paris,) = tokenizer.encode(" Paris")
    banned = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=1, temperature=0,
                                       logit_bias={str(paris): -100})
    assert banned.choices[0].text and not banned.choices[0].text.startswith(" Paris")
    (rome,) = tokenizer.encode(" Rome")
    forced = client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=3, temperature=1.0, seed=3, logit_bias={str(rome): 500})
    assert forced.choices[0].message.content == " Rome" * 3


def test_a_cache_salt_keeps_cached_prompt_blocks_to_requests_of_that_salt(client):
    # vLLM's cache_salt was ignored: every tenant's prompt blocks were everyone's (and a hit's speed tells).
    prompt = "A story about salt and caches, told twice over by a careful narrator. " * 6

    def cached(salt: str) -> int:
        body = {"cache_salt": salt}
        result = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=1, extra_body=body)
        return result.usage.prompt_tokens_details.cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-a") > 0 and cached("tenant-b") == 0


def test_skip_special_tokens_false_shows_the_control_tokens_the_model_writes(client, smollm2_source):
    # It was ignored: control tokens never reached the text whatever the client asked.
    (start,) = smollm2_source.tokenizer.encode("<|im_start|>")  # a control token, forced by the bias
    args = dict(model="smollm2-135m", prompt="Hi", max_tokens=3, temperature=0)
    shown = client.completions.create(**args, extra_body={"logit_bias": {str(start): 100},
                                                          "skip_special_tokens": False})
    assert shown.choices[0].text == "<|im_start|>" * 3
    hidden = client.completions.create(**args, extra_body={"logit_bias": {str(start): 100}})
    assert hidden.choices[0].text == ""


def test_truncate_prompt_tokens_keeps_the_prompts_last_tokens_as_vllm(client, smollm2_source):
    # It was ignored: the whole prompt ran (and a history past the context was refused rather than cut).
    prompt = "The capital of France is"
    ids = smollm2_source.tokenizer.encode(prompt)
    cut = client.completions.create(model="smollm2-135m", prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                    extra_body={"truncate_prompt_tokens": 2})
    assert cut.usage.prompt_tokens == 2 and cut.choices[0].text.startswith(smollm2_source.tokenizer.decode(ids[-2:]))
    long_chat = [{"role": "user", "content": "word " * 9000}]
    chat = client.chat.completions.create(model="smollm2-135m", messages=long_chat, max_tokens=1,
                                          extra_body={"truncate_prompt_tokens": 100})
    assert chat.usage.prompt_tokens == 100
    # -1 (vLLM's "cut to the context") was refused; it keeps what leaves room for max_tokens.
    context = client.models.retrieve("smollm2-135m").model_extra["max_model_len"]
    fitted = client.chat.completions.create(model="smollm2-135m", messages=long_chat, max_tokens=3,
                                            extra_body={"truncate_prompt_tokens": -1})
    assert fitted.usage.prompt_tokens == context - 3
    with pytest.raises(BadRequestError, match="truncate_prompt_tokens=100000 is more than"):
        client.completions.create(model="smollm2-135m", prompt="hi", extra_body={"truncate_prompt_tokens": 100_000})


def test_streamed_completion_equals_whole_for_same_seed(client):
    args = dict(model="smollm2-135m", prompt="Once upon a time", max_tokens=40, temperature=1.0, seed=11)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_a_streamed_completion_of_n_sends_one_choice_a_chunk(client):
    # vLLM's parallel-streaming test reads choices[0]: several choices in one chunk lost text and finish reasons.
    args = dict(model="smollm2-135m", prompt="Once upon a time", max_tokens=6, temperature=1.0, seed=3, n=3)
    whole = client.completions.create(**args)
    chunks = list(client.completions.create(**args, stream=True))
    assert all(len(chunk.choices) == 1 for chunk in chunks)
    for choice in whole.choices:
        mine = [chunk.choices[0] for chunk in chunks if chunk.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text
        assert mine[-1].finish_reason == choice.finish_reason


def test_async_streamed_chat_equals_whole_for_same_seed(async_client):
    messages = [{"role": "user", "content": "Write one sentence about the sea."}]

    async def run():
        args = dict(model="smollm2-135m", messages=messages, max_completion_tokens=40, temperature=0.8, seed=5)
        whole = await async_client.chat.completions.create(**args)
        stream = await async_client.chat.completions.create(**args, stream=True,
                                                            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        return whole, chunks

    whole, chunks = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content and streamed
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens


def test_sync_chat_answers_with_the_chat_template(client):
    result = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=30, temperature=0, user="tester",
    )
    assert "Paris" in result.choices[0].message.content
    assert result.choices[0].message.role == "assistant"


def test_several_prompts_and_n_number_choices_prompt_by_prompt(client):
    prompts = ["The capital of France is", [504, 3575, 314]]
    result = client.completions.create(model="smollm2-135m", prompt=prompts, n=2, max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert sorted(c.index for c in result.choices) == [0, 1, 2, 3]
    by_index = {c.index: c.text for c in result.choices}
    assert by_index[0] == by_index[1] and by_index[2] == by_index[3]  # greedy samples agree
    assert by_index[0] != by_index[2]
    assert result.usage.completion_tokens == 16


def test_stream_never_sends_empty_deltas_while_a_stop_string_is_held_back(client):
    # Greedy, this reply is "The capital of France is Paris." and the stop string straddles several tokens.
    chunks = list(client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=30, temperature=0, stop=["France is Paris"], stream=True,
    ))
    deltas = [c.choices[0].delta.content for c in chunks[1:]]
    assert all(deltas[:-1])  # after the role chunk, only the finishing chunk may be empty
    assert "".join(d or "" for d in deltas) == "The capital of "
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices[0].stop_reason == "France is Paris"  # vLLM's field: which stop ended it


def test_stop_string_is_not_returned_and_ends_with_stop(client):
    result = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=16,
                                       temperature=0, stop=["."])
    assert result.choices[0].text == " Paris"
    assert result.choices[0].finish_reason == "stop" and result.choices[0].stop_reason == "."


def test_echo_prepends_the_prompt(client):
    result = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=2,
                                       temperature=0, echo=True)
    assert result.choices[0].text.startswith("The capital of France is Paris")


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_0_scores_the_prompt_alone(client, stream):
    # OpenAI's way to get a text's logprobs (as evaluation harnesses do): the prompt back, scored, nothing generated.
    args = dict(model="smollm2-135m", prompt="The capital of France is", max_tokens=0, echo=True, logprobs=1)
    if stream:
        chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
        choices = [c.choices[0] for c in chunks if c.choices]
        text, usage = "".join(c.text for c in choices), chunks[-1].usage
        tokens = [t for c in choices if c.logprobs for t in c.logprobs.tokens]
        token_logprobs = [lp for c in choices if c.logprobs for lp in c.logprobs.token_logprobs]
        finish = choices[-1].finish_reason
    else:
        result = client.completions.create(**args)
        choice, usage = result.choices[0], result.usage
        text, tokens, token_logprobs = choice.text, choice.logprobs.tokens, choice.logprobs.token_logprobs
        finish = choice.finish_reason
    assert text == "The capital of France is" == "".join(tokens) and finish == "length"
    assert token_logprobs[0] is None and all(lp < 0 for lp in token_logprobs[1:])
    assert usage.completion_tokens == 0 and usage.total_tokens == usage.prompt_tokens == len(tokens)


def test_echo_with_max_tokens_0_past_the_context_says_how_long_the_prompt_may_be(client):
    # The refusal said "max_tokens is 1" to a client that sent 0 (the hidden token that scores the prompt).
    context = client.models.retrieve("smollm2-135m").model_extra["max_model_len"]
    with pytest.raises(BadRequestError) as refused:
        client.completions.create(model="smollm2-135m", prompt=[1000] * context, max_tokens=0, echo=True, logprobs=1)
    assert f"may be at most {context - 1}" in refused.value.message and "max_tokens is 1" not in refused.value.message
    assert refused.value.body["message"].startswith(f"This model's maximum context length is {context} tokens.")


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_scores_the_prompt_too(client, stream):
    args = dict(model="smollm2-135m", prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=1)
    plain = client.completions.create(**args).choices[0].logprobs
    result = client.completions.create(**args, echo=True, stream=stream)
    if stream:
        parts = [c.choices[0].logprobs for c in result if c.choices and c.choices[0].logprobs]
        tokens = [t for p in parts for t in p.tokens]
        token_logprobs = [lp for p in parts for lp in p.token_logprobs]
        offsets = [o for p in parts for o in p.text_offset]
    else:
        lp = result.choices[0].logprobs
        tokens, token_logprobs, offsets = lp.tokens, lp.token_logprobs, lp.text_offset
    assert "".join(tokens) == "The capital of France is" + "".join(plain.tokens)
    assert token_logprobs[0] is None and all(p < 0 for p in token_logprobs[1:5])
    assert token_logprobs[-3:] == pytest.approx(plain.token_logprobs, abs=1e-4)
    assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]


def test_completion_logprobs_have_top_alternatives(client):
    result = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=3,
                                       temperature=0, logprobs=2)
    lp = result.choices[0].logprobs
    assert "".join(lp.tokens) == result.choices[0].text
    assert len(lp.token_logprobs) == 3 and all(p <= 0 for p in lp.token_logprobs)
    assert all(len(top) == 2 for top in lp.top_logprobs)
    # Greedy: the chosen token is the most likely one.
    assert max(lp.top_logprobs[0].values()) == pytest.approx(lp.token_logprobs[0], abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_streamed_chat_logprobs_match_whole(client):
    args = dict(model="smollm2-135m", messages=[{"role": "user", "content": "Say hi."}], max_tokens=6,
                temperature=0, logprobs=True, top_logprobs=3)
    whole = client.chat.completions.create(**args)
    streamed = [e for c in client.chat.completions.create(**args, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 for e in content)
    assert [e.token for e in streamed] == [e.token for e in content]
    # The second request reuses the first one's cached prompt blocks, whose attention rounds differently;
    # the int4 kernel's 16-bit input levels can turn that into up to ~6e-4 (measured), tokens unchanged.
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=2e-3)


@pytest.mark.parametrize(
    "args",
    [
        dict(n=3, temperature=0.9, seed=5, max_tokens=24),
        # Greedy, the reply is "The capital of France is Paris."; the stop string spans three tokens.
        dict(n=2, temperature=0, max_tokens=30, stop=["France is Paris"]),
    ],
    ids=["seeded-n3", "greedy-n2-stop-across-tokens"],
)
def test_streamed_chat_deltas_concatenate_to_the_whole_response(client, args):
    args = dict(model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
                logprobs=True, top_logprobs=2, **args)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    # One choice a chunk, as OpenAI and vLLM send them: a client reading choices[0] lost the other samples.
    assert all(len(chunk.choices) <= 1 for chunk in chunks)
    for choice in whole.choices:
        mine = [c for chunk in chunks for c in chunk.choices if c.index == choice.index][1:]  # after the role chunk
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
        streamed = [e for c in mine if c.logprobs for e in c.logprobs.content]
        assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in choice.logprobs.content]
        # The streamed request reuses the first one's cached prompt blocks (see test_streamed_chat_logprobs_match_whole).
        assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in choice.logprobs.content], abs=2e-3)
        assert [c.finish_reason for c in mine] == [None] * (len(mine) - 1) + [choice.finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    if "stop" in args:
        assert [c.message.content for c in whole.choices] == ["The capital of "] * 2


def test_32_concurrent_streams_complete_with_correct_usage(client, async_client, smollm2_source):
    prompts = [f"Count from {i} to {i + 20}:" for i in range(32)]
    args = dict(model="smollm2-135m", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})

    async def one(prompt: str):
        stream = await async_client.completions.create(prompt=prompt, stream=True,
                                                       stream_options={"include_usage": True}, **args)
        return [c async for c in stream]

    async def run():
        return await asyncio.gather(*(one(p) for p in prompts))

    results = asyncio.run(run())
    for prompt, chunks in zip(prompts, results):
        usage = chunks[-1].usage
        assert usage.prompt_tokens == len(smollm2_source.tokenizer.encode(prompt))
        assert usage.completion_tokens == 12
    # Batched greedy text equals each request served alone.
    for prompt, chunks in list(zip(prompts, results))[:3]:
        alone = client.completions.create(prompt=prompt, **args).choices[0].text
        assert "".join(c.choices[0].text for c in chunks if c.choices) == alone


def test_chat_logprob_bytes_rebuild_the_reply(client):
    result = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Reply with three emoji."}],
        max_tokens=12, temperature=0, logprobs=True, extra_body={"ignore_eos": True},
    )
    content = result.choices[0].logprobs.content
    assert bytes(b for entry in content for b in entry.bytes).decode() == result.choices[0].message.content


def test_chat_logprobs_name_the_end_of_turn_token_as_its_bytes_spell_it(client):
    result = client.chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0, logprobs=True,
    )
    assert result.choices[0].finish_reason == "stop"
    last = result.choices[0].logprobs.content[-1]  # the <|im_end|> that ended the reply (token "" before)
    assert last.token == "<|im_end|>" and bytes(last.bytes).decode() == last.token


def test_chat_continues_a_prefilled_answer(client, smollm2_source):
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is"}]
    result = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8, temperature=0,
                                            extra_body={"continue_final_message": True})
    assert result.choices[0].message.content.startswith(" Paris")  # not a new turn
    assert result.usage.prompt_tokens == len(smollm2_source.tokenizer.encode_chat(messages,
                                                                                  continue_final_message=True))
    with pytest.raises(BadRequestError, match="set at most one") as refused:
        client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=8,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": True})
    assert refused.value.body["param"] == "continue_final_message"


def test_streamed_chunks_carry_a_null_usage_when_usage_is_asked_for(client):
    # OpenAI: with include_usage every chunk has the field, null but in the last.
    chunks = list(client.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=4, stream=True, stream_options={"include_usage": True}))
    assert all("usage" in c.model_fields_set for c in chunks)
    assert [c.usage is None for c in chunks] == [True] * (len(chunks) - 1) + [False]


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_continuous_usage_stats_put_the_usage_so_far_on_every_chunk_as_vllm(client, endpoint):
    # It was dropped silently: every chunk's usage was null.
    args = dict(model="smollm2-135m", max_tokens=5, temperature=0, stream=True, extra_body={"ignore_eos": True},
                stream_options={"include_usage": True, "continuous_usage_stats": True})
    if endpoint == "chat":  # its first chunk only names the role: its usage counts the prompt alone, as vLLM's
        chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], **args))
        assert chunks[0].usage.completion_tokens == 0 and chunks[0].usage.prompt_tokens > 0
    else:
        chunks = list(client.completions.create(prompt="Hi", **args))
    running = [c.usage.completion_tokens for c in chunks if c.choices]
    assert running == sorted(running) and running[-1] == 5 and all(c.usage.prompt_tokens > 0 for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
