"""Hugging Face safetensors directories load and agree with transformers (Llama and Qwen2 layouts)."""

import json

import pytest
import torch
import transformers
from oracles import greedy

from tokenmill import LLM, SamplingParams
from tokenmill.errors import ModelLoadError
from tokenmill.loader.hf import HFDirectory
from tokenmill.loader.tokenizer import Tokenizer


def _save_random_model(path, smollm2_source, config) -> None:
    torch.manual_seed(0)
    model_cls = getattr(transformers, config.architectures[0])
    model_cls(config).eval().save_pretrained(path)
    smollm2_source.tokenizer.backend.save(str(path / "tokenizer.json"))


def _tiny(kind: str, vocab_size: int):
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.2,  # large weights give peaked logits, so greedy choices are not near-ties
        eos_token_id=2, bos_token_id=1,
    )
    if kind == "llama":
        return transformers.LlamaConfig(architectures=["LlamaForCausalLM"], rope_theta=10000.0, **common)
    return transformers.Qwen2Config(architectures=["Qwen2ForCausalLM"], tie_word_embeddings=False, **common)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_directory_matches_transformers(kind, tmp_path, smollm2_source, last_logits):
    config = _tiny(kind, smollm2_source.config.vocab_size)
    _save_random_model(tmp_path, smollm2_source, config)
    ref = getattr(transformers, config.architectures[0]).from_pretrained(tmp_path, dtype=torch.float32).eval()
    # float32 KV: this checks the model's math against the reference, not the KV rounding (measured apart).
    llm = LLM(str(tmp_path), kv_cache_memory=0.05, kv_cache_dtype="float32")
    assert llm.engine.runner.quantization == "none"  # auto leaves a float checkpoint in float
    prompts = [[1, 42, 7, 99, 1000], list(range(100, 140)), [5] * 9, [31, 415, 926, 535, 8, 979, 32, 38, 46, 26, 43]]
    for ids in prompts:
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0, -1]
        assert (last_logits(llm.engine, ids) - expected).abs().max().item() < 1e-3
    params = SamplingParams(temperature=0, max_tokens=64, min_tokens=64)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params)
    assert [out.outputs[0].token_ids for out in outputs] == greedy(ref, prompts, 64)


@pytest.mark.parametrize("architecture, config_class, fields", [
    ("Gemma3ForCausalLM", transformers.Gemma3TextConfig, {"sliding_window": 64, "sliding_window_pattern": 3}),
    ("Gemma3ForCausalLM", transformers.Gemma3TextConfig, {"sliding_window": 64}),
    ("Qwen2ForCausalLM", transformers.Qwen2Config, {"sliding_window": 64, "use_sliding_window": True,
                                                   "max_window_layers": 4}),
    ("Qwen2ForCausalLM", transformers.Qwen2Config, {"sliding_window": 64, "use_sliding_window": True}),
    ("Qwen2ForCausalLM", transformers.Qwen2Config, {"sliding_window": 64}),
    ("MistralForCausalLM", transformers.MistralConfig, {"sliding_window": 64}),
    ("Qwen3MoeForCausalLM", transformers.Qwen3MoeConfig, {"sliding_window": 64, "use_sliding_window": True}),
    ("Qwen2MoeForCausalLM", transformers.Qwen2MoeConfig, {"sliding_window": 64, "use_sliding_window": True,
                                                         "max_window_layers": 5}),
    ("MixtralForCausalLM", transformers.MixtralConfig, {}),
    # No window, context or query scale given: transformers' own defaults differ by family.
    ("MistralForCausalLM", transformers.MistralConfig, {}),
    ("Gemma3ForCausalLM", transformers.Gemma3TextConfig, {"head_dim": 16}),
    ("Qwen2ForCausalLM", transformers.Qwen2Config, {}),
    ("Qwen2ForCausalLM", transformers.Qwen2Config, {"use_sliding_window": True, "max_window_layers": 4}),
    ("Qwen3MoeForCausalLM", transformers.Qwen3MoeConfig, {"use_sliding_window": True}),
    # No head_dim, experts or top-k given: Qwen3 and Gemma 3 fix their own head_dim, each MoE family its routing.
    ("Qwen3ForCausalLM", transformers.Qwen3Config, {}),
    ("Gemma3ForCausalLM", transformers.Gemma3TextConfig, {}),
    ("Qwen2MoeForCausalLM", transformers.Qwen2MoeConfig, {}),
    ("Qwen3MoeForCausalLM", transformers.Qwen3MoeConfig, {}),
])
def test_fields_config_json_leaves_out_are_read_as_transformers_fills_them_in(tmp_path, architecture, config_class,
                                                                              fields):
    raw = {"architectures": [architecture], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, **fields}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").touch()  # the config is read without opening the weights
    ours, theirs = HFDirectory(tmp_path).model_config(), config_class(**raw)
    kinds = getattr(theirs, "layer_types", None) or ["sliding_attention"] * 8
    windows = [theirs.sliding_window if kind == "sliding_attention" else None for kind in kinds]
    assert [ours.layer_window(i) for i in range(8)] == windows
    assert ours.tie_word_embeddings == theirs.tie_word_embeddings
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    assert ours.head_dim == (getattr(theirs, "head_dim", None) or 64 // 4)
    if hasattr(theirs, "num_experts_per_tok"):
        assert ours.num_experts == getattr(theirs, "num_local_experts", None) or theirs.num_experts
        assert ours.num_experts_per_tok == theirs.num_experts_per_tok
        assert ours.moe_intermediate_size == getattr(theirs, "moe_intermediate_size", 0)
        assert ours.shared_expert_intermediate_size == (getattr(theirs, "shared_expert_intermediate_size", 0) or 0)
    if hasattr(theirs, "query_pre_attn_scalar"):
        assert ours.attention_scale == theirs.query_pre_attn_scalar ** -0.5
    rope = theirs.rope_parameters
    if "full_attention" in rope:  # Gemma 3: a rotary base per layer type
        assert ours.rope_local_theta == rope["sliding_attention"]["rope_theta"]
        rope = rope["full_attention"]
    assert ours.rope_theta == rope["rope_theta"]


@pytest.mark.parametrize("fields, message", [
    ({"hidden_act": "gelu"}, "activation 'gelu'"),
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping"),
    # Before the weights are read, not after the whole checkpoint.
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope scaling 'dynamic'"),
    # Gemma 3's sliding layers' own scaling, which its code never applied.
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e4}}},
     "rope scaling 'linear' on the sliding layers"),
    # Qwen3-MoE's default top-k, 8, out of the 4 experts given: a routing the model cannot do.
    ({"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4}, "to 8 of 4 experts"),
    # An FP8 checkpoint failed mid-load on its first scale tensor, blaming the architecture's name.
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}, "quantized with 'fp8'"),
])
def test_config_fields_that_would_change_the_model_are_refused(tmp_path, fields, message):
    raw = {"architectures": ["LlamaForCausalLM"], "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, **fields}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").touch()
    with pytest.raises(ModelLoadError, match=message):
        HFDirectory(tmp_path).model_config()


@pytest.mark.parametrize("name, content", [("config.json", b"[]"), ("config.json", b"{\"a\": \"\xff\"}"),
                                           ("generation_config.json", b"[1]"), ("tokenizer_config.json", b"\"x\"")])
def test_a_settings_file_that_is_no_json_object_is_a_load_error(tmp_path, smollm2_source, name, content):
    # [] was an AttributeError and a byte that is not UTF-8 a UnicodeDecodeError: tracebacks from the CLI.
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 256,
                                                      "hidden_size": 64, "intermediate_size": 128,
                                                      "num_hidden_layers": 2, "num_attention_heads": 4}))
    (tmp_path / "model.safetensors").touch()
    smollm2_source.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ModelLoadError, match=name):
        HFDirectory(tmp_path).model_config()
        Tokenizer.from_hf_dir(tmp_path, [])


@pytest.mark.parametrize("model_type, architecture", [("qwen2", "Qwen2ForCausalLM"), ("mistral", "MistralForCausalLM"),
                                                      ("gemma3_text", "Gemma3ForCausalLM")])
def test_a_config_without_architectures_reads_as_its_model_types_class(tmp_path, model_type, architecture):
    raw = {"model_type": model_type, "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    (tmp_path / "model.safetensors").touch()
    bare = HFDirectory(tmp_path).model_config()
    (tmp_path / "config.json").write_text(json.dumps({"architectures": [architecture], **raw}))
    # The family defaults (Qwen2's Q/K/V biases, Mistral's window, Gemma 3's head_dim) go by the class name.
    assert bare == HFDirectory(tmp_path).model_config()


def test_a_sharded_folder_loads_the_shards_its_index_names(tmp_path, smollm2_source, last_logits):
    from safetensors.torch import save_file

    config = _tiny("llama", smollm2_source.config.vocab_size)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(tmp_path, max_shard_size="2MB")
    smollm2_source.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    assert (tmp_path / "model.safetensors.index.json").is_file()
    # Mistral's repos ship their own format's weights beside the shards the index names: not this model's tensors.
    save_file({"layers.0.attention.wq.weight": torch.zeros(64, 64)}, str(tmp_path / "consolidated.safetensors"))
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    llm = LLM(str(tmp_path), kv_cache_memory=0.05, kv_cache_dtype="float32")
    ids = [1, 42, 7, 99, 1000]
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0, -1]
    assert (last_logits(llm.engine, ids) - expected).abs().max().item() < 1e-3


@pytest.mark.parametrize("stored", [["lm_head.weight"], ["lm_head.weight", "model.embed_tokens.weight"]])
def test_a_tied_checkpoint_may_store_the_shared_matrix_under_the_heads_name(tmp_path, smollm2_source, last_logits,
                                                                           stored):
    from safetensors.torch import save_file

    config = _tiny("llama", smollm2_source.config.vocab_size)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(config).eval()
    config.save_pretrained(tmp_path)
    smollm2_source.tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    tensors = {k: v.contiguous() for k, v in ref.state_dict().items()
               if k not in ("lm_head.weight", "model.embed_tokens.weight")}
    shared = ref.model.embed_tokens.weight.detach().clone()
    # safetensors' save_model keeps the first name of a tied pair, lm_head.weight; a different head is ignored (as
    # vLLM does) where the embedding is there.
    tensors |= {name: shared if name != "lm_head.weight" or len(stored) == 1 else torch.zeros_like(shared)
                for name in stored}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    llm = LLM(str(tmp_path), kv_cache_memory=0.05, kv_cache_dtype="float32")
    ids = [1, 42, 7, 99, 1000]
    with torch.no_grad():
        expected = ref(torch.tensor([ids])).logits[0, -1]
    assert (last_logits(llm.engine, ids) - expected).abs().max().item() < 1e-3


def test_generation_config_sampling_settings_are_the_defaults_a_call_leaves_unset(tmp_path, smollm2_source):
    # As vLLM's default --generation-config auto: Qwen3 recommends temperature 0.6 and top_k 20, which plain
    # defaults (1.0, off) ignored. transformers' own default top_k 50 is no recommendation, as vLLM reads it.
    _save_random_model(tmp_path, smollm2_source, _tiny("llama", smollm2_source.config.vocab_size))
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": 2, "do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 50, "min_p": 0.0}))
    assert HFDirectory(tmp_path).sampling_defaults() == {"temperature": 0.6, "top_p": 0.95, "min_p": 0.0}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, "top_k": 1, "temperature": 0.9}))
    llm = LLM(str(tmp_path), kv_cache_memory=0.02)
    assert (llm.get_default_sampling_params().top_k, llm.get_default_sampling_params().temperature) == (1, 0.9)
    prompts = [{"prompt_token_ids": [5, 6, 7]}, {"prompt_token_ids": [9, 8]}]
    greedy_ids = [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8,
                                                                                       ignore_eos=True))]
    assert [o.outputs[0].token_ids[:8] for o in llm.generate(prompts)] == greedy_ids  # top_k 1: greedy
    # What SamplingParams cannot take is left out (with a warning), not the model refused: it serves fine without.
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 0, "top_k": 20.0, "temperature": "hot",
                                                                 "repetition_penalty": True}))
    from tokenmill.loader.source import open_model

    assert open_model(str(tmp_path)).sampling_defaults == {"top_k": 20}
