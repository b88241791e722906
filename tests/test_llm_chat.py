"""LLM.chat: OpenAI's message shapes and tools, rendered as /v1/chat/completions renders them."""

import threading

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.errors import InvalidRequestError

GREEDY = SamplingParams(temperature=0, max_tokens=4)
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(str(smollm2_path), kv_cache_memory=0.05)


def test_text_parts_read_as_the_string_they_join_line_by_line(llm):
    # As vLLM joins them: "\n" between parts, not "" (which ran the words together).
    plain = llm.chat([{"role": "user", "content": "Name a colour.\nOne word."}], GREEDY)[0]
    parts = llm.chat([{"role": "user", "content": [{"type": "text", "text": "Name a colour."},
                                                   {"type": "text", "text": "One word."}]}], GREEDY)[0]
    assert parts.prompt_token_ids == plain.prompt_token_ids and parts.outputs[0].text == plain.outputs[0].text


def test_tools_and_a_past_call_without_content_reach_the_prompt(llm):
    # Arguments as OpenAI sends them (a JSON string); a Hugging Face-style dict reads the same.
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": None,
                                                                    "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    out = llm.chat(messages, GREEDY, tools=[WEATHER])[0]
    prompt = llm.tokenizer.decode(out.prompt_token_ids)
    assert '"name": "get_weather"' in prompt and '"city": "Paris"' in prompt and "sunny" in prompt
    call["function"]["arguments"] = {"city": "Paris"}
    assert llm.chat(messages, GREEDY, tools=[WEATHER])[0].prompt_token_ids == out.prompt_token_ids


def test_a_content_part_other_than_text_is_an_invalid_request(llm):
    with pytest.raises(InvalidRequestError, match="content part of type 'image_url'"):
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


def test_a_developer_message_renders_as_the_system_one_as_the_server_reads_it(llm):
    system = llm.chat([{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
                      GREEDY)[0]
    developer = llm.chat([{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
                         GREEDY)[0]
    assert developer.prompt_token_ids == system.prompt_token_ids  # not a default system prompt and a stray turn


def test_ctrl_c_while_prompts_queue_leaves_none_in_the_engine(llm, monkeypatch):
    add, calls = llm.engine.add_request, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return add(*args, **kwargs)

    monkeypatch.setattr(llm.engine, "add_request", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["a", "b", "c"], GREEDY)
    assert not llm.engine.requests and not llm.engine.has_unfinished()


@pytest.mark.parametrize("message", [{"content": "hi"}, {"role": "user", "content": 5}, "hi"])
def test_a_malformed_message_is_an_invalid_request_not_a_key_or_type_error(llm, message):
    with pytest.raises(InvalidRequestError, match="each message must be a dict"):
        llm.chat([{"role": "system", "content": "Be brief."}, message])


def test_params_may_come_as_a_tuple_as_in_vllm(llm):
    params = (SamplingParams(max_tokens=1, ignore_eos=True), SamplingParams(max_tokens=2, ignore_eos=True))
    outputs = llm.generate(["One", "Two"], params)  # an AttributeError on the tuple
    assert [len(o.outputs[0].token_ids) for o in outputs] == [1, 2]
    with pytest.raises(InvalidRequestError, match="2 prompts but 1 sampling params"):
        llm.generate(["One", "Two"], (GREEDY,))


def test_chat_template_kwargs_reach_the_template(llm, monkeypatch):
    # As vLLM's LLM.chat(chat_template_kwargs=...): Qwen3's enable_thinking lives there.
    monkeypatch.setattr(llm.tokenizer, "chat_template", "{% for m in messages %}{{ m.content }}{% endfor %}"
                                                        "{% if enable_thinking is defined %}!{% endif %}")
    out = llm.chat([{"role": "user", "content": "Hi"}], GREEDY, chat_template_kwargs={"enable_thinking": False})[0]
    assert llm.tokenizer.decode(out.prompt_token_ids) == "Hi!"


def test_calls_from_two_threads_each_get_their_own_outputs(llm):
    # Both stepped the one engine and collected each other's deltas: text missing tokens, or a KeyError.
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = ["One two", "Three four"]
    alone = {p: llm.generate(p, params)[0].outputs[0].text for p in prompts}
    got: dict[str, list[str]] = {p: [] for p in prompts}
    errors: list[BaseException] = []

    def work(prompt: str) -> None:
        try:
            for _ in range(3):
                got[prompt] += [o.outputs[0].text for o in llm.generate([prompt, prompt], params)]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and got == {p: [alone[p]] * 6 for p in prompts}
    assert not llm.engine.has_unfinished()
