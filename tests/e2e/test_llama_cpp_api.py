"""llama.cpp's native API (/completion, /props, /apply-template), as llama.cpp's clients call it."""

import json

import httpx
import pytest

GREEDY = {"temperature": 0}


def _complete(server, **body) -> dict:
    answer = httpx.post(f"{server.url}/completion", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def _stream(server, **body) -> list[str]:
    with httpx.stream("POST", f"{server.url}/completion", json={**body, "stream": True}, timeout=60) as answer:
        return [line for line in answer.iter_lines() if line]


def test_a_completion_is_v1s_answer_in_llama_cpps_fields(server):
    prompt = "Paris is the capital and the largest city of France, on the Seine. " * 3 + "The capital of France is"
    openai = httpx.post(f"{server.url}/v1/completions", json={"prompt": prompt, "max_tokens": 6, **GREEDY},
                        timeout=60).json()
    native = _complete(server, prompt=prompt, n_predict=6, return_tokens=True, **GREEDY)
    assert native["content"] == openai["choices"][0]["text"] and len(native["tokens"]) == 6
    assert native["stop"] is True and native["stop_type"] == "limit" and native["tokens_predicted"] == 6
    assert native["tokens_evaluated"] == openai["usage"]["prompt_tokens"]
    assert native["timings"]["predicted_n"] == 6 and native["timings"]["predicted_per_second"] > 0
    assert native["generation_settings"]["n_ctx"] == 8192 and native["prompt"] == prompt
    assert native["usage"]["cost"] > 0  # tokenmill's account beside llama.cpp's fields
    again = _complete(server, prompt=prompt, n_predict=6, **GREEDY)
    assert again["tokens"] == [] and again["content"] == native["content"]  # ids only when asked, as llama.cpp
    # The prefix cache's share, as llama.cpp counts its own: the prompt evaluated is the rest.
    cached = again["timings"]["cache_n"]
    assert cached > 0 and again["timings"]["prompt_n"] == again["tokens_evaluated"] - cached
    # llama.cpp's tokens_cached is what its slot holds: the prompt and every output token but the last.
    assert again["tokens_cached"] == again["tokens_evaluated"] + 6 - 1


def test_a_stream_adds_up_to_the_whole_answer_and_ends_without_done(server):
    whole = _complete(server, prompt="Once upon a time", n_predict=8, **GREEDY)
    lines = _stream(server, prompt="Once upon a time", n_predict=8, **GREEDY)
    assert all(line.startswith("data: {") for line in lines)  # no [DONE]: llama.cpp's clients would parse it
    events = [json.loads(line[6:]) for line in lines]
    assert "".join(e["content"] for e in events) == whole["content"]
    assert [e["stop"] for e in events] == [False] * (len(events) - 1) + [True]
    assert events[-1]["tokens_predicted"] == 8 and events[-1]["timings"]["predicted_n"] == 8


def test_stop_words_eos_and_n_predict_0_say_why_they_stopped(server):
    word = _complete(server, prompt="1, 2, 3,", n_predict=20, stop=" 5", n_probs=1, **GREEDY)
    assert (word["stop_type"], word["stopping_word"]) == ("word", " 5") and word["content"] == " 4,"
    # As llama.cpp: the stop word's tokens have no probabilities in the answer (they had: " " and "5").
    assert "".join(p["token"] for p in word["completion_probabilities"]) == " 4,"
    only = _complete(server, prompt="Hi there", n_predict=0)
    assert (only["content"], only["tokens_predicted"], only["usage"]["completion_tokens"]) == ("", 0, 0)
    # A prompt that starts with token ids gets no BOS; mixed with text, as llama.cpp takes it.
    mixed = _complete(server, prompt=[1, "Hello"], n_predict=1, **GREEDY)
    assert mixed["prompt"] == "<|im_start|>Hello" and mixed["tokens_evaluated"] == 2


def test_special_tokens_stay_out_of_the_text_and_ignore_eos_bans_the_end(server):
    # They showed ("<|im_start|>assistant"), and ignore_eos let <|im_end|> through into the text: SillyTavern's
    # "ban EOS token" sends it.
    prompt = "<|im_start|>user\nSay yes.<|im_end|>\n"
    shown = _complete(server, prompt=prompt, n_predict=3, **GREEDY)
    assert shown["content"].startswith("assistant") and "<|im_start|>" not in shown["content"]
    banned = _complete(server, prompt=prompt + "<|im_start|>assistant\n", n_predict=12, ignore_eos=True,
                       return_tokens=True, **GREEDY)
    assert 2 not in banned["tokens"] and banned["stop_type"] == "limit"


def test_response_fields_pick_the_answers_fields_as_llama_vim_asks(server):
    picked = _complete(server, prompt="Hi", n_predict=2, response_fields=["content", "timings/prompt_n", "nope"],
                       **GREEDY)
    assert set(picked) == {"content", "timings/prompt_n"} and picked["timings/prompt_n"] >= 1
    # An empty list is every field in llama.cpp: it answered {}.
    assert {"content", "timings"} <= set(_complete(server, prompt="Hi", n_predict=2, response_fields=[], **GREEDY))


def test_a_gbnf_grammar_and_a_json_schema_hold_the_output(server):
    chosen = _complete(server, prompt="Is the sky blue?", grammar='root ::= "yes" | "no"', **GREEDY)
    assert chosen["content"] in ("yes", "no")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    shaped = _complete(server, prompt="A number as JSON:", json_schema=schema, n_predict=20, **GREEDY)
    assert isinstance(json.loads(shaped["content"])["n"], int)


@pytest.mark.parametrize("body, param", [
    ({"mirostat": 2}, "mirostat"),  # a sampler this engine lacks: refused, not ignored
    ({"grammar": "root ::= x"}, "grammar"),
    ({"n_probs": 50}, "n_probs"),  # named as llama.cpp names it, not as /v1/completions' logprobs
    ({"n_predict": -2}, "n_predict"),
    ({"prompt": ["one", "two"]}, "prompt"),
    ({"prompt": [[1, 2], [3]]}, "prompt"),  # several prompts too: it said "Input should be a valid string"
    ({"logit_bias": [[-5, 1.0]]}, "logit_bias"),
])
def test_what_this_server_cannot_do_is_refused_naming_llama_cpps_field(server, body, param):
    answer = httpx.post(f"{server.url}/completion", json={"prompt": "Hi", **body}, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
    if isinstance(body.get("prompt"), list):
        assert "several prompts" in answer.json()["error"]["message"]


@pytest.mark.parametrize("bias", [[[" Paris", False]], {" Paris": -100}], ids=["list", "dict"])
def test_logit_bias_given_as_text_biases_each_of_its_tokens(server, smollm2_source, bias):
    # llama.cpp tokenizes a text key (its test_logit_bias sends them); it was refused as "not a token id".
    prompt = "The capital of France is"
    assert _complete(server, prompt=prompt, n_predict=1, **GREEDY)["content"] == " Paris"
    banned = _complete(server, prompt=prompt, n_predict=1, logit_bias=bias, return_tokens=True, **GREEDY)
    assert banned["content"] != " Paris" and banned["tokens"][0] not in smollm2_source.tokenizer.encode(" Paris")


@pytest.mark.parametrize("bias", [b'{"Paris": NaN}', b'[["Paris", Infinity]]'])
def test_a_text_keys_bias_must_be_finite_as_an_ids_is(server, bias):
    # NaN went into the logits: a 200 with empty content after one token.
    body = b'{"prompt": "Hi", "n_predict": 2, "logit_bias": ' + bias + b"}"
    answer = httpx.post(f"{server.url}/completion", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "logit_bias", answer.text


def test_props_and_apply_template_describe_the_model_and_its_chat(server):
    props = httpx.get(f"{server.url}/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 8192 and "<|im_start|>" in props["chat_template"]
    assert props["default_generation_settings"]["params"]["temperature"] == 0.8  # llama.cpp's defaults
    messages = [{"role": "user", "content": "Hi"}]
    prompt = httpx.post(f"{server.url}/apply-template", json={"messages": messages}).json()["prompt"]
    tokens = httpx.post(f"{server.url}/tokenize", json={"messages": messages}).json()["tokens"]
    assert httpx.post(f"{server.url}/tokenize", json={"content": prompt}).json()["tokens"] == tokens
    assert prompt.endswith("<|im_start|>assistant\n")
    # A final assistant message is continued, as llama.cpp prefills it.
    prefilled = httpx.post(f"{server.url}/apply-template",
                           json={"messages": [*messages, {"role": "assistant", "content": "Yo"}]}).json()["prompt"]
    assert prefilled.endswith("<|im_start|>assistant\nYo")


def test_an_answer_past_the_context_stops_at_it_marked_truncated_as_llama_server_does(start_server):
    # It was a 400 naming max_tokens; llama-server answers what fits.
    short = start_server("--max-model-len", "64")
    prompt = "word " * 50
    evaluated = len(httpx.post(f"{short.url}/tokenize", json={"content": prompt}).json()["tokens"])
    cut = _complete(short, prompt=prompt, n_predict=100, ignore_eos=True, **GREEDY)
    assert cut["truncated"] is True and cut["stop_type"] == "limit"
    assert cut["tokens_predicted"] == 64 - evaluated
    whole = httpx.post(f"{short.url}/completion", json={"prompt": "word " * 64, "n_predict": 0}, timeout=60)
    assert whole.status_code == 400 and "max_tokens" not in whole.json()["error"]["message"]
    assert whole.json()["error"]["param"] == "prompt"


def test_the_cost_route_and_deadline_come_as_on_v1_completions(server):
    answer = httpx.post(f"{server.url}/completion", json={"prompt": "Hi", "n_predict": 2},
                        headers={"x-tokenmill-deadline-ms": "60000"}, timeout=60)
    assert float(answer.headers["x-tokenmill-cost-usd"]) > 0 and answer.headers["x-tokenmill-deadline"] == "met"
    with httpx.stream("POST", f"{server.url}/completion", json={"prompt": "Hi", "n_predict": 2, "stream": True},
                      headers={"x-tokenmill-deadline-ms": "60000"}, timeout=60) as streamed:
        last = json.loads([line for line in streamed.iter_lines() if line][-1][6:])
    assert last["stop"] and last["deadline_status"] == "met"  # the headers went out before it was known
    auto = httpx.post(f"{server.url}/apply-template", json={"model": "auto", "messages": [{"role": "user",
                                                                                           "content": "Hi"}]})
    assert auto.status_code == 200  # auto is the one model, as count_tokens takes it


def test_repeat_last_n_is_the_penalties_window_and_0_turns_them_off(server):
    # SillyTavern sends repeat_last_n 0 beside its repeat penalty: every prompt token was penalized, where llama.cpp
    # penalizes none.
    prompt = "1, 2, 3, 1, 2, 3, 1, 2,"
    plain = _complete(server, prompt=prompt, n_predict=6, **GREEDY)["content"]
    penalized = _complete(server, prompt=prompt, n_predict=6, repeat_penalty=3.0, repeat_last_n=-1, **GREEDY)
    assert penalized["content"] != plain
    assert _complete(server, prompt=prompt, n_predict=6, repeat_penalty=3.0, repeat_last_n=0, **GREEDY)["content"] == plain
    assert penalized["generation_settings"]["repeat_last_n"] == -1


@pytest.mark.parametrize("body, param", [({"n": 2}, "n"), ({"top_n_sigma": 1.0}, "top_n_sigma"),
                                         ({"repeat_last_n": -2}, "repeat_last_n")])
def test_llama_cpps_other_fields_are_refused_by_name_not_dropped(server, body, param):
    # n (SillyTavern's swipes) and top_n_sigma were answered as if absent; off values still pass.
    answer = httpx.post(f"{server.url}/completion", json={"prompt": "Hi", "n_predict": 1, **body}, timeout=60)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text
    assert _complete(server, prompt="Hi", n_predict=1, n=1, top_n_sigma=0)["content"] is not None


def test_min_p_cuts_before_temperature_as_llama_cpps_order(server):
    # " Paris" is 0.77 likely, " the" 0.065: min_p 0.1 of the model's own distribution leaves " Paris" alone, at any
    # temperature. Tempered first, " the" came back 3 times in 12.
    answers = {_complete(server, prompt="The capital of France is", n_predict=1, temperature=2.0, min_p=0.1, top_k=0,
                         top_p=1.0, seed=seed)["content"] for seed in range(8)}
    assert answers == {" Paris"}
