"""Every user mistake in naming or supplying a model gives a typed error with an actionable message."""

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.errors import (
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    PromptTooLongError,
    UnsupportedArchitectureError,
)
from tokenmill.loader.gguf import GGUFFile
from tokenmill.loader.source import open_model
from tokenmill.loader.tokenizer import Tokenizer


def test_missing_path_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        open_model(str(tmp_path / "absent.gguf"))


def test_unknown_catalog_name_lists_known_models():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m, gemma3-270m"):
        open_model("no-such-model")


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        open_model(str(tmp_path))


def test_unreadable_hf_config_is_a_load_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json"):
        open_model(str(tmp_path))


def test_random_bytes_are_not_a_gguf(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"\x00" * 4096)
    with pytest.raises(ModelLoadError, match="corrupt or truncated"):
        open_model(str(path))


def test_a_file_of_another_format_is_called_that_not_corrupt(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14)
    with pytest.raises(ModelLoadError, match="is not a GGUF file .* loads from its folder") as raised:
        open_model(str(path))
    assert "delete it" not in str(raised.value)


def test_a_gguf_with_a_tensor_type_newer_than_the_reader_says_so(tmp_path):
    path = tmp_path / "new.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_tensor("a", torch.zeros(4, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = bytearray(path.read_bytes())
    type_at = data.index(b"a\x02\x00\x00\x00") + 1 + 4 + 2 * 8  # past the name, its dimension count and sizes
    data[type_at : type_at + 4] = (200).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="tensor type newer than this install's gguf package") as raised:
        GGUFFile(path)
    assert "corrupt" not in str(raised.value)


def test_a_tensor_type_the_gguf_package_cannot_dequantize_names_the_file_and_what_to_use(tmp_path):
    path = tmp_path / "q8_1.gguf"
    writer = GGUFWriter(path, "llama")
    block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_1]
    writer.add_tensor("blk.0.ffn_up.weight", np.zeros((4, 64 // block_size * block_bytes), np.uint8),
                      raw_dtype=GGMLQuantizationType.Q8_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # It named the tensor and type only: not the file, nor what would load.
    with pytest.raises(ModelLoadError, match=r"ffn_up.weight of .*q8_1.gguf uses type Q8_1.*such as Q4_K_M or Q8_0"):
        list(GGUFFile(path).weights(SimpleNamespace(num_experts=0), torch.float32))


@pytest.mark.parametrize("size", [2_000, 3_000_000])
def test_truncated_gguf_is_a_load_error(tmp_path, smollm2_path, size):
    path = tmp_path / "truncated.gguf"
    with open(smollm2_path, "rb") as src:
        path.write_bytes(src.read(size))
    with pytest.raises(ModelLoadError, match="truncated"):
        open_model(str(path))


def test_a_gguf_of_an_old_version_says_so_rather_than_corrupt(tmp_path, smollm2_path):
    path = tmp_path / "v1.gguf"
    with open(smollm2_path, "rb") as src:
        path.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + src.read(4096)[8:])
    with pytest.raises(ModelLoadError, match="version 1; supported: 2 and 3") as caught:
        open_model(str(path))
    assert "truncated" not in str(caught.value)  # fetching it again would not help


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = GGUFWriter(str(path), "mamba")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedArchitectureError, match="'mamba'.*supported: .*llama"):
        open_model(str(path))


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(str(smollm2_path))


def test_prompt_longer_than_context_is_rejected_and_engine_keeps_working(llm):
    free = llm.engine.block_manager.num_free_blocks
    with pytest.raises(PromptTooLongError, match="context length is 8192.*prompt is 8200 tokens"):
        llm.generate([{"prompt_token_ids": [1] * 8200}])
    with pytest.raises(PromptTooLongError, match="no room for a token"):  # a longer max_tokens stops at the end
        llm.generate([{"prompt_token_ids": [1] * 8192}], SamplingParams(max_tokens=500))
    # A bad prompt in a batch rejects the batch without leaving the good ones queued.
    with pytest.raises(PromptTooLongError):
        llm.generate(["fine", {"prompt_token_ids": [1] * 9000}])
    assert not llm.engine.has_unfinished()
    assert llm.engine.block_manager.num_free_blocks == free
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=4))
    assert "Paris" in out[0].outputs[0].text


@pytest.mark.parametrize(
    "options, field",
    [({"max_num_seqs": 0}, "max_num_seqs"), ({"max_num_batched_tokens": 8}, "max_num_batched_tokens"),
     ({"dtype": "float8"}, "dtype"), ({"kv_cache_memory": -1}, "kv_cache_memory"),
     ({"kv_cache_memory": float("nan")}, "kv_cache_memory"), ({"max_model_len": 0}, "max_model_len"),
     ({"device": "gpu"}, "device"), ({"price_per_hour": -0.5}, "price_per_hour"),
     # "" was read as the current folder ("a directory without config.json"); None was a TypeError.
     ({"model": ""}, "model"), ({"model": None}, "model")],
)
def test_bad_engine_options_are_rejected_before_loading(options, field):
    with pytest.raises(InvalidRequestError, match=field):
        EngineConfig(**options)


def test_a_path_names_a_model_as_its_string_does(smollm2_path):
    assert EngineConfig(model=smollm2_path).model == str(smollm2_path)


def test_a_gpu_this_pytorch_lacks_is_an_error_before_the_model_opens(monkeypatch):
    from tokenmill.engine import llm_engine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on CI, whatever machine runs this
    monkeypatch.setattr(llm_engine, "open_model", lambda name: pytest.fail("opened the model"))
    with pytest.raises(InvalidRequestError, match="sees no CUDA GPU"):
        LLMEngine(EngineConfig(device="cuda"))


def test_a_gpu_index_past_the_machines_gpus_is_an_error_before_the_model_opens(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InvalidRequestError, match=r"has 1 CUDA GPU\(s\): cuda:0 to cuda:0"):
        EngineConfig(device="cuda:3").check_device()
    EngineConfig(device="cuda:0").check_device()


def test_the_catalog_embedding_model_asked_to_generate_says_what_it_is():
    with pytest.raises(UnsupportedArchitectureError, match="all-minilm-l6-v2 is a sentence-embedding model .* "
                                                           "answers /v1/embeddings"):
        open_model("all-minilm-l6-v2")


def test_bad_prompts_and_options_are_invalid_requests(llm):
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([""])
    with pytest.raises(InvalidRequestError, match="token ids"):
        llm.generate([{"prompt_token_ids": [10**9]}])
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        llm.generate(["hi"], SamplingParams(stop_token_ids=[10**6], min_tokens=1))
    # Token ids in a dict went unchecked: TypeErrors from deep in the tokenizer or the range check.
    for ids in ([504.0, 3575], "504", [[504, 3575]], 504):
        with pytest.raises(InvalidRequestError, match="prompt_token_ids must be a list of integer"):
            llm.generate([{"prompt_token_ids": ids}])
    with pytest.raises(InvalidRequestError, match="'prompt' \\(a string\\)"):  # was taken as token ids
        llm.generate([{"prompt": [504, 3575]}])
    assert not llm.engine.has_unfinished()
    with pytest.raises(InvalidRequestError, match="unknown engine options"):
        LLM("smollm2-135m", block_sise=8)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"n": 0}, "n"),
     ({"max_tokens": 0}, "max_tokens"), ({"top_k": -2}, "top_k"), ({"logprobs": 50}, "logprobs"),
     ({"seed": 2**63}, "seed"), ({"seed": 1.5}, "seed"),
     # Counts that are not integers: top_k and logprobs of 2.5 failed inside the sampler, max_tokens 2.5 made 3.
     ({"top_k": 2.5}, "top_k"), ({"logprobs": 2.5}, "logprobs"), ({"prompt_logprobs": 1.5}, "prompt_logprobs"),
     ({"max_tokens": 2.5}, "max_tokens"), ({"min_tokens": 1.5}, "min_tokens"),
     ({"stop_token_ids": [2.0]}, "stop_token_ids"),
     # A lone surrogate failed in the scheduler, encoding the salt; a bias of True read as 1.
     ({"cache_salt": "\ud800"}, "cache_salt"), ({"cache_salt": ""}, "cache_salt"),
     ({"logit_bias": {5: True}}, "logit_bias"), ({"logit_bias": {5.0: 1.0}}, "logit_bias"),
     # Read as seed 1 and one sample, where top_k=True was refused.
     ({"seed": True}, "seed"), ({"n": True}, "n")],
)
def test_out_of_range_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs)


def test_hf_directory_without_weights_is_a_load_error(tmp_path, smollm2_source):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    smollm2_source.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ModelLoadError, match="safetensors"):
        open_model(str(tmp_path))
    # A folder of PyTorch pickles is told what it has and how to convert it, not only what it lacks.
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"it has pytorch_model.bin: PyTorch pickles.*safe_serialization=True"):
        open_model(str(tmp_path))


def test_a_folder_with_only_a_sentencepiece_model_says_which_tokenizer_file_to_write(tmp_path):
    # "cannot read .../tokenizer.json: No such file or directory" did not say the tokenizer.model beside it is unread.
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="SentencePiece tokenizer.model but no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path, eos_token_ids=[2])


def test_numpy_integers_are_taken_as_seed_and_n_as_for_every_other_count():
    # Refused as "must be a 64-bit integer" while top_k, max_tokens and logprobs took them.
    params = SamplingParams(seed=np.int64(3), n=np.int64(2), temperature=1.0)
    assert (params.seed, params.n) == (3, 2) and type(params.seed) is int and type(params.n) is int


def test_repeated_stop_token_ids_are_kept_once():
    # Every step of every sample read them all: a million repeats of one id (3 MB) held the engine 82 s.
    assert SamplingParams(stop_token_ids=[7] * 100_000 + [3, 7]).stop_token_ids == [7, 3]


def test_no_stops_given_as_none_as_vllm_takes_them():
    params = SamplingParams(stop=None, stop_token_ids=None)
    assert params.stop == [] and params.stop_token_ids == []


@pytest.mark.parametrize("options, message", [({"min_tokens": 5, "max_tokens": 4}, "must be at most max_tokens"),
                                              ({"n": 2.0}, "must be an integer")])
def test_sampling_params_vllm_refuses_are_refused(options, message):
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**options)


@pytest.mark.parametrize("make, options, message", [
    ("engine", {"num_threads": 1.5}, "num_threads=1.5 must be an integer"),  # failed inside torch
    ("engine", {"block_size": 16.5}, "block_size=16.5 must be an integer"),  # passed
    ("engine", {"max_model_len": 100.5}, "max_model_len=100.5 must be an integer"),
    ("server", {"cascade_threshold": float("nan")}, "cascade_threshold=nan"),  # cascade never escalated
    ("batch", {"max_wait_ms": float("inf")}, "max_wait_ms"),  # killed the embedding thread: every request hung
    ("batch", {"max_wait_ms": float("nan")}, "max_wait_ms"),
])
def test_settings_of_the_wrong_kind_are_refused(make, options, message):
    from tokenmill.config import ServerConfig
    from tokenmill.embeddings.batcher import BatchPolicy

    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        {"engine": EngineConfig, "server": ServerConfig, "batch": BatchPolicy}[make](**options)


def test_numpy_token_ids_come_back_as_ints_and_cumulative_logprob_only_with_logprobs(llm):
    import numpy as np

    greedy = SamplingParams(temperature=0, max_tokens=2)
    out = llm.generate({"prompt_token_ids": np.array([504, 3575])}, greedy)[0]
    assert out.prompt_token_ids == [504, 3575] and all(type(t) is int for t in out.prompt_token_ids)
    # 0.0 without logprobs read as a probability of 1; vLLM gives None.
    assert out.outputs[0].cumulative_logprob is None
    scored = llm.generate({"prompt_token_ids": [504, 3575]}, SamplingParams(temperature=0, max_tokens=2, logprobs=0))
    sample = scored[0].outputs[0]
    assert sample.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in sample.logprobs)) and \
        sample.cumulative_logprob < 0
