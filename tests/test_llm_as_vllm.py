"""A vLLM offline script runs unchanged: its LLM arguments, prompt dicts, SamplingParams and logprob shapes."""

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.errors import InvalidRequestError
from tokenmill.llm import _vllm_options

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm(smollm2_path):
    # What vLLM scripts pass as a matter of course: each was an "unknown engine options" error.
    return LLM(str(smollm2_path), trust_remote_code=True, tensor_parallel_size=1, dtype="auto",
               gpu_memory_utilization=0.5, seed=0)


def test_vllms_usual_engine_arguments_are_taken(llm, smollm2_path):
    config = llm.engine.config
    assert config.dtype == "float32" and config.kv_cache_fraction == 0.5
    with pytest.raises(InvalidRequestError, match="tensor_parallel_size=2"):
        LLM(str(smollm2_path), tensor_parallel_size=2)


def test_the_engine_seed_makes_unseeded_draws_repeat(smollm2_path):
    params = SamplingParams(temperature=1.0, max_tokens=12)
    first, again = (LLM(str(smollm2_path), seed=5).generate(PROMPT, params)[0].outputs[0].token_ids for _ in "ab")
    assert again == first
    with pytest.raises(InvalidRequestError, match="seed='x' must be an integer"):
        LLM(str(smollm2_path), seed="x")


def test_logprobs_read_as_vllms_dicts_of_logprob_by_token_id(llm):
    [out] = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, logprobs=3, prompt_logprobs=2))
    sample = out.outputs[0]
    for token_id, position in zip(sample.token_ids, sample.logprobs):
        # Greedy: the chosen token is the likeliest, first, and the alternatives follow in rank order.
        assert position[token_id].rank == 1 and list(position)[0] == token_id
        assert [position[t].rank for t in list(position)] == [1, 2, 3]
        assert position[token_id].logprob == position.logprob
    assert "".join(position[t].decoded_token for t, position in zip(sample.token_ids, sample.logprobs)) == \
        sample.text
    assert out.prompt_logprobs[0] is None
    for token_id, position in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        likelier = sum(lp > position[token_id].logprob for _, lp in position.top)
        assert position[token_id].rank >= likelier + 1 and len(position) in (2, 3)
    # The one prompt token the model found unlikely ranks far down, past the top alternatives.
    assert max(p[t].rank for p, t in zip(out.prompt_logprobs[1:], out.prompt_token_ids[1:])) > 3


def test_a_prompt_dicts_cache_salt_keeps_its_prefix_apart(llm):
    prompt = "Once upon a time, " * 8  # several blocks
    params = SamplingParams(temperature=0, max_tokens=1)
    llm.generate({"prompt": prompt, "cache_salt": "a"}, params)
    other, same = llm.generate([{"prompt": prompt, "cache_salt": "b"}, {"prompt": prompt, "cache_salt": "a"}], params)
    assert other.num_cached_tokens == 0 and same.num_cached_tokens > 0


def test_what_a_prompt_dict_holds_that_this_engine_cannot_use_is_refused(llm):
    # An image prompt was answered as if it had no image.
    with pytest.raises(InvalidRequestError, match="multi_modal_data"):
        llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": object()}})


def test_vllms_small_helpers(llm):
    assert llm.get_tokenizer() is llm.tokenizer
    [out] = llm.generate(PROMPT, SamplingParams(max_tokens=2))
    assert out.outputs[0].finished()
    assert SamplingParams(seed=-1).seed is None  # vLLM's unseeded; it was the fixed seed -1


def test_the_tokenizer_answers_the_hugging_face_calls_vllm_scripts_make(llm):
    # vLLM's get_tokenizer() is a Hugging Face tokenizer: apply_chat_template(tokenize=False) was a TypeError, and
    # eos_token_id an AttributeError.
    tokenizer, messages = llm.get_tokenizer(), [{"role": "user", "content": "Name a colour."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and ids == tokenizer.encode(text, add_special_tokens=False)
    # A template's own variables as keywords, as Qwen3's documented call passes enable_thinking.
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=False) == text
    # Hugging Face's continue_final_message leaves the final message open; its other arguments are no variables.
    prefilled = [*messages, {"role": "assistant", "content": "Blue is"}]
    assert tokenizer.apply_chat_template(prefilled, tokenize=False, continue_final_message=True).endswith("Blue is")
    with pytest.raises(TypeError, match="return_tensors"):
        tokenizer.apply_chat_template(messages, tokenize=True, return_tensors="pt")
    assert tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False) == ids
    assert tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>") == 2
    assert tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert tokenizer.get_vocab()["<|im_end|>"] == 2 and len(tokenizer) == 49152
    params = SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[tokenizer.eos_token_id])
    assert llm.generate(text, params)[0].outputs[0].token_ids == llm.chat(messages, params)[0].outputs[0].token_ids


def test_a_cuda_machine_hears_that_llm_runs_on_the_cpu_unless_told(monkeypatch, caplog):
    # vLLM scripts pass no device: on a GPU machine they ran here on the CPU with no word said.
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with caplog.at_level("WARNING", logger="tokenmill.llm"):
        _vllm_options({"gpu_memory_utilization": 0.9})
        _vllm_options({"device": "cpu"})
    assert [r.getMessage() for r in caplog.records] == [
        "LLM() runs on the CPU unless given device='cuda'; this machine has a CUDA GPU"]
