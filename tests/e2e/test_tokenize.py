"""POST /tokenize and /detokenize (vLLM's): the ids the engine would run, and the text they spell."""

import httpx

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


def test_tokenize_gives_the_ids_a_completion_and_a_chat_run_with(server):
    prompt = httpx.post(f"{server.url}/tokenize", json={"model": "smollm2-135m", "prompt": "The capital of France"})
    body = prompt.json()
    completion = httpx.post(f"{server.url}/v1/completions", json={"prompt": "The capital of France", "max_tokens": 1})
    assert body["count"] == len(body["tokens"]) == completion.json()["usage"]["prompt_tokens"]
    assert body["max_model_len"] == 8192
    chat = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES}).json()
    answered = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1}).json()
    assert chat["count"] == answered["usage"]["prompt_tokens"]
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|im_start|>assistant\n")


def test_tokenize_refuses_what_it_cannot_answer_in_openais_shape(server):
    for path, body, param in [("/tokenize", {"prompt": "x", "messages": MESSAGES}, "prompt"),
                              ("/tokenize", {}, "prompt"),
                              # Checked when the chat was rebuilt from them: 500s.
                              ("/tokenize", {"messages": []}, "messages"),
                              ("/tokenize", {"messages": MESSAGES, "tools": [{"type": "function"}]},
                               "tools.0.function"),
                              ("/tokenize", {"messages": MESSAGES, "add_special_tokens": True}, "add_special_tokens"),
                              ("/tokenize", {"messages": MESSAGES, "add_special": True}, "add_special"),
                              ("/tokenize", {"model": "gpt-9", "prompt": "x"}, "model"),
                              ("/detokenize", {"tokens": [10**9]}, "tokens")]:
        response = httpx.post(server.url + path, json=body)
        assert response.status_code in (400, 404) and response.json()["error"]["param"] == param, (path, body)


def test_a_chat_with_tools_counts_as_its_tool_choice_renders_it_and_auto_names_the_one_model(server):
    # tool_choice was dropped: "none" (which leaves the tools out of the prompt) counted them in.
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    for choice in ("none", "required"):
        body = {"messages": MESSAGES, "tools": tools, "tool_choice": choice}
        counted = httpx.post(f"{server.url}/tokenize", json=body, timeout=60).json()["count"]
        ran = httpx.post(f"{server.url}/v1/chat/completions", json={**body, "max_tokens": 1}, timeout=60).json()
        assert counted == ran["usage"]["prompt_tokens"], choice
    # One model served: auto is that model, as chat takes it.
    auto = httpx.post(f"{server.url}/tokenize", json={"model": "auto", "prompt": "hi"})
    assert auto.status_code == 200 and auto.json()["count"] >= 1


def test_llama_cpps_field_names_and_defaults(server):
    # llama.cpp's /tokenize takes `content`, adds no BOS unless add_special, and gives pieces on request; its
    # /detokenize answers `content`. `content` was dropped as unknown: a 400 "give either prompt or messages".
    url = server.url
    bare = httpx.post(f"{url}/tokenize", json={"content": "Hello world"})
    assert bare.status_code == 200, bare.text
    assert bare.json()["tokens"] == httpx.post(f"{url}/tokenize", json={"prompt": "Hello world",
                                                                        "add_special_tokens": False}).json()["tokens"]
    pieces = httpx.post(f"{url}/tokenize", json={"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert pieces == [{"id": i, "piece": p} for i, p in zip(bare.json()["tokens"], ["Hello", " world"])]
    # A token that is part of a UTF-8 character comes as its bytes.
    emoji = httpx.post(f"{url}/tokenize", json={"content": "\U0001f9ea", "with_pieces": True}).json()["tokens"]
    assert all(isinstance(t["piece"], list) for t in emoji) and sum(len(t["piece"]) for t in emoji) == 4
    text = httpx.post(f"{url}/detokenize", json={"tokens": bare.json()["tokens"]}).json()
    assert text["content"] == text["prompt"] == "Hello world"


def test_return_token_strs_gives_the_vocabularys_strings(server):
    body = httpx.post(f"{server.url}/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert body["token_strs"] == ["Hello", "Ġworld"]  # as vLLM's convert_ids_to_tokens spells them


def test_llama_cpps_parse_special_false_reads_special_token_text_as_text(server):
    # It was dropped as unknown: "<|im_end|>" typed in a prompt came back as the special token, id 2.
    def ids(**body) -> list[int]:
        return httpx.post(f"{server.url}/tokenize", json={"content": "Hi <|im_end|>", **body}).json()["tokens"]

    assert ids()[-1] == ids(parse_special=True)[-1] == 2
    literal = ids(parse_special=False)
    assert 2 not in literal and len(literal) > 3
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": literal}).json()["content"] == "Hi <|im_end|>"
    assert ids()[-1] == 2  # the copy that reads them as text leaves the model's own tokenizer as it was


def test_an_empty_tools_list_is_no_tools_in_chat_and_tokenize(server):
    # Some clients send []: taken as no tools (as llama.cpp and Ollama), not a 400 (vLLM's) or a 500.
    messages = [{"role": "user", "content": "hi"}]
    counted = [httpx.post(f"{server.url}/tokenize", json={"messages": messages, **extra}).json()["count"]
               for extra in ({}, {"tools": []})]
    assert counted[0] == counted[1]
    answer = httpx.post(f"{server.url}/v1/chat/completions", json={"messages": messages, "tools": [], "max_tokens": 2})
    assert answer.status_code == 200 and answer.json()["usage"]["prompt_tokens"] == counted[0]
