"""Qwen2, Qwen3, Mistral (sliding window) and Llama 3.1's rope run on the Llama model: logits and greedy tokens
equal transformers', from Hugging Face folders and from GGUF files laid out as llama.cpp's converter writes them."""

import random
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from tokenmill import LLM, SamplingParams
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.errors import ModelLoadError

VOCAB = 256
WINDOW = 8  # Mistral's sliding window: most prompts below are longer
MAX_TOKENS = 24
_rng = random.Random(0)
PROMPTS = [[_rng.randrange(VOCAB) for _ in range(n)] for n in (30, 30, 12, 45, 3)]
EXACT = {"quantization": "none", "kv_cache_dtype": "float32"}  # the model's math, not int8 or KV rounding

# Hugging Face module paths to llama.cpp's tensor names, written out here so the GGUF test pins gguf.py's map.
_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _config(family: str) -> transformers.PretrainedConfig:
    common = dict(
        vocab_size=VOCAB, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=None, eos_token_id=None,
        initializer_range=0.2,  # large weights give peaked logits, so greedy choices are not near-ties
    )
    if family == "qwen2":  # head_dim 32: the C++ attention op's shape; the small Qwen2s tie their LM head
        return transformers.Qwen2Config(architectures=["Qwen2ForCausalLM"], hidden_size=128, tie_word_embeddings=True,
                                        **common)
    if family == "qwen3":  # 4 heads of 32 over a hidden size of 64, as Qwen3's head_dim is set apart from it
        return transformers.Qwen3Config(architectures=["Qwen3ForCausalLM"], hidden_size=64, head_dim=32,
                                        tie_word_embeddings=True, **common)
    return transformers.MistralConfig(architectures=["MistralForCausalLM"], hidden_size=128, head_dim=32,
                                      sliding_window=WINDOW, tie_word_embeddings=False, **common)


def _random_model(family: str) -> transformers.PreTrainedModel:
    config = _config(family)
    torch.manual_seed(0)
    return getattr(transformers, config.architectures[0])(config).eval()


def _byte_tokens() -> list[str]:
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _save_hf_directory(model: transformers.PreTrainedModel, path: Path) -> None:
    model.save_pretrained(path)
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(_byte_tokens())}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(path / "tokenizer.json"))


def _greedy_alone(reference: transformers.PreTrainedModel) -> list[list[int]]:
    with torch.no_grad():
        runs = [reference.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False) for ids in PROMPTS]
    return [run[0, len(ids):].tolist() for ids, run in zip(PROMPTS, runs)]


@dataclass
class Family:
    """A tiny random model saved as a Hugging Face directory, with transformers' own run of it."""

    name: str
    path: Path
    reference: transformers.PreTrainedModel
    greedy: list[list[int]]  # transformers' greedy tokens for each of PROMPTS, run alone


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "mistral"])
def family(request, tmp_path_factory) -> Family:
    """Each family's tiny model as a Hugging Face directory, and transformers' load of that directory."""
    path = tmp_path_factory.mktemp(request.param)
    _save_hf_directory(_random_model(request.param), path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return Family(request.param, path, reference, _greedy_alone(reference))


@pytest.fixture(scope="module")
def llm(family: Family) -> LLM:
    """The family's directory in tokenmill, float32 throughout."""
    return LLM(str(family.path), **EXACT)


def _engine_logits(engine: LLMEngine, ids: list[int], steps: int) -> tuple[torch.Tensor, list[int]]:
    """Logits the engine computed at every position of one greedy run [len(ids) + steps - 1, vocab], and its tokens."""
    rows: list[torch.Tensor] = []
    execute = engine.runner.execute

    def recording(scheduled):
        out = execute(scheduled)
        rows.extend(logits for _, _, logits in out.prompt_logits)  # positions 0 .. len(ids) - 2
        rows.append(out.logits)  # the position each step samples from
        return out

    engine.runner.execute = recording
    try:
        engine.add_request("probe", ids, SamplingParams(temperature=0, max_tokens=steps, prompt_logprobs=0))
        tokens: list[int] = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.outputs[0].token_ids
    finally:
        del engine.runner.execute
    return torch.cat(rows), tokens


def _max_logit_diff(engine: LLMEngine, reference: transformers.PreTrainedModel) -> float:
    """Largest |logit - transformers' logit| over every position of each prompt and 8 greedy steps past it."""
    worst = 0.0
    for ids in PROMPTS:
        rows, tokens = _engine_logits(engine, ids, steps=8)
        with torch.no_grad():
            expected = reference(torch.tensor([ids + tokens[:-1]])).logits[0]
        worst = max(worst, (rows - expected).abs().max().item())
    return worst


def _generate(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in PROMPTS], params)
    return [out.outputs[0].token_ids for out in outputs]


def test_logits_match_transformers(family, llm):
    window = llm.engine.runner.model.layers[0].self_attn.attn.sliding_window
    assert window == (WINDOW if family.name == "mistral" else None)
    assert _max_logit_diff(llm.engine, family.reference) < 1e-3


def test_greedy_tokens_match_transformers_when_batched(family, llm):
    assert _generate(llm) == family.greedy


def test_greedy_tokens_match_transformers_when_chunked_and_preempted(family, llm):
    block_bytes = llm.engine.runner.kv_cache.block_bytes
    # 8 blocks of 16 tokens hold the longest sequence (45 + 24 tokens) but not all five at once (18 blocks);
    # 16-token steps split each long prompt, so later chunks attend over keys already in the cache.
    # Mistral's layers all slide: a sequence holds at most its window's 2 blocks and a step's 2, so 4 blocks
    # hold any one sequence and preempt among five.
    num_blocks = 4 if family.name == "mistral" else 8
    small = LLM(str(family.path), kv_cache_memory=num_blocks * block_bytes / 2**30, max_num_batched_tokens=16,
                max_num_seqs=16, **EXACT)
    assert small.engine.block_manager.num_blocks == num_blocks
    assert _generate(small) == family.greedy
    assert small.engine.scheduler.num_preemptions > 0


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K layout for llama files: each head's rotary halves interleaved row by row."""
    rows = w.shape[0] // heads
    return w.reshape(heads, 2, rows // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_tensors(model: transformers.PreTrainedModel, permute: bool = False) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names; permute: Q/K rows interleaved as in llama files (qwen2 and qwen3
    files keep Hugging Face's rotary layout)."""
    tensors, config = {}, model.config
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp leaves a tied head out
        array = tensor.float().numpy()
        layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if layer:
            gguf_name = f"blk.{layer[1]}.{_GGUF_LAYER_NAMES[layer[2]]}.{layer[3]}"
            if permute and layer[2] in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = config.num_attention_heads if layer[2].endswith("q_proj") else config.num_key_value_heads
                array = _permute(array, heads)
        else:
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                         "lm_head.weight": "output.weight"}[name]
        tensors[gguf_name] = array
    return tensors


def _write_gguf(path: Path, config: transformers.PretrainedConfig, tensors: dict[str, np.ndarray],
                architecture: str = "qwen3", rotated: int | None = None, **keys: float) -> None:
    """A GGUF file of the tensors, with the hyperparameters llama.cpp writes (rotated: rope.dimension_count, else
    the head's) and any further `{architecture}.` keys."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(rotated or config.head_dim)
    for key, value in keys.items():
        writer.add_float32(f"{architecture}.{key}", value)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(_byte_tokens())
    writer.add_token_types([gguf.TokenType.NORMAL] * VOCAB)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def qwen3_model() -> transformers.PreTrainedModel:
    """A tiny random Qwen3, the reference for its GGUF file."""
    return _random_model("qwen3")


def test_qwen3_gguf_logits_and_greedy_tokens_match_transformers(qwen3_model, tmp_path):
    _write_gguf(tmp_path / "qwen3.gguf", qwen3_model.config, _gguf_tensors(qwen3_model))
    llm = LLM(str(tmp_path / "qwen3.gguf"), **EXACT)
    assert _max_logit_diff(llm.engine, qwen3_model) < 1e-3
    assert _generate(llm) == _greedy_alone(qwen3_model)


def test_a_gguf_rope_freqs_tensor_stays_float32_in_a_bfloat16_model(qwen3_model, tmp_path):
    # Llama 3.1 files carry their rope scaling as per-frequency divisors; in bfloat16 the mid-band ones moved the
    # rotations by up to 0.2% (0.8 rad at 128k tokens for the 8B).
    config = qwen3_model.config
    tensors = _gguf_tensors(qwen3_model)
    factors = np.linspace(1.0, 8.0, config.head_dim // 2, dtype=np.float32) + np.float32(1 / 3)
    _write_gguf(tmp_path / "qwen3.gguf", config, {**tensors, "rope_freqs.weight": factors})
    llm = LLM(str(tmp_path / "qwen3.gguf"), dtype="bfloat16", quantization="none", kv_cache_memory=0.01)
    theta, dim = config.rope_parameters["rope_theta"], config.head_dim
    expected = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim) / torch.from_numpy(factors).double()
    assert torch.allclose(llm.engine.runner.model.rotary.inv_freq, expected, rtol=1e-7)


def test_gguf_tensor_the_architecture_lacks_is_a_load_error_naming_it(qwen3_model, tmp_path):
    tensors = _gguf_tensors(qwen3_model)
    tensors["blk.0.ffn_gate_inp.weight"] = np.zeros((4, 64), np.float32)  # a mixture-of-experts router
    _write_gguf(tmp_path / "moe.gguf", qwen3_model.config, tensors)
    with pytest.raises(ModelLoadError, match=r"blk\.0\.ffn_gate_inp\.weight has no parameter in a qwen3 model"):
        LLM(str(tmp_path / "moe.gguf"), **EXACT)


def test_gguf_missing_tensor_is_a_load_error_naming_it(qwen3_model, tmp_path):
    tensors = _gguf_tensors(qwen3_model)
    del tensors["blk.1.attn_k_norm.weight"]
    _write_gguf(tmp_path / "short.gguf", qwen3_model.config, tensors)
    with pytest.raises(ModelLoadError, match=r"lacks 1 tensors .* e\.g\. model\.layers\.1\.self_attn\.k_norm\.weight$"):
        LLM(str(tmp_path / "short.gguf"), **EXACT)


@pytest.mark.parametrize("name", ["token_embd.weight", "blk.0.ffn_up.weight", "blk.1.attn_v.weight"])
@pytest.mark.parametrize("quantization", ["none", "int8"])
def test_gguf_tensor_short_of_rows_is_a_load_error(qwen3_model, tmp_path, name, quantization):
    # Its pieces each fit: the rows it lacks would have run as uninitialized memory.
    tensors = _gguf_tensors(qwen3_model)
    tensors[name] = tensors[name][:-8]
    _write_gguf(tmp_path / "short.gguf", qwen3_model.config, tensors)
    with pytest.raises(ModelLoadError, match=r"has \d+ rows, expected \d+"):
        LLM(str(tmp_path / "short.gguf"), **{**EXACT, "quantization": quantization})


@pytest.fixture
def qwen3_dir(qwen3_model, tmp_path) -> Path:
    """The tiny Qwen3 as a Hugging Face directory a test may alter."""
    _save_hf_directory(qwen3_model, tmp_path)
    return tmp_path


def test_hf_checkpoint_of_another_architecture_is_a_load_error_naming_its_tensor(qwen3_dir):
    config = (qwen3_dir / "config.json").read_text()
    (qwen3_dir / "config.json").write_text(config.replace('"Qwen3ForCausalLM"', '"Qwen2ForCausalLM"'))
    # Qwen3's per-head norms have no place in Qwen2's layers.
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.self_attn\.[qk]_norm\.weight has no parameter in a Qwen2"):
        LLM(str(qwen3_dir), **EXACT)


def test_hf_missing_fused_shard_is_a_load_error_naming_the_checkpoint_tensor(qwen3_dir):
    file = qwen3_dir / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.self_attn.k_proj.weight"]  # fills rows of the fused qkv_proj
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"e\.g\. model\.layers\.1\.self_attn\.k_proj\.weight$"):
        LLM(str(qwen3_dir), **EXACT)


def test_hf_checkpoint_with_a_saved_rotary_table_loads(qwen3_dir, qwen3_model):
    file = qwen3_dir / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)  # as checkpoints saved before 2024
    save_file(tensors, file, metadata={"format": "pt"})
    # The table is derived from the config, so the saved one (all ones) is passed over.
    assert _generate(LLM(str(qwen3_dir), **EXACT)) == _greedy_alone(qwen3_model)


def _with_biases(config: transformers.PretrainedConfig) -> transformers.PreTrainedModel:
    """A random model whose biases are drawn too: transformers starts them at zero, where a lost one would not show."""
    torch.manual_seed(0)
    model = getattr(transformers, config.architectures[0])(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(std=0.5)
    return model


@pytest.mark.parametrize("architecture, fields", [
    ("LlamaForCausalLM", {"attention_bias": True}),  # Q, K, V and output projections ("llamafied" checkpoints)
    ("LlamaForCausalLM", {"mlp_bias": True}),
    ("Qwen3ForCausalLM", {"attention_bias": True}),
])
def test_biased_output_and_mlp_projections_match_transformers(tmp_path, architecture, fields):
    # They were refused: "o_proj.bias has no parameter ...; is the checkpoint's architecture name right?"
    config = getattr(transformers, architecture.replace("ForCausalLM", "Config"))(
        architectures=[architecture], vocab_size=VOCAB, hidden_size=64, head_dim=32, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=None, eos_token_id=None, initializer_range=0.2, **fields)
    model = _with_biases(config)
    _save_hf_directory(model, tmp_path)
    expected = _greedy_alone(model)
    assert _generate(LLM(str(tmp_path), **EXACT)) == expected
    if architecture == "Qwen3ForCausalLM":  # llama.cpp's names for the same file: attn_output.bias among them
        _write_gguf(tmp_path / "biased.gguf", config, _gguf_tensors(model))
        assert _generate(LLM(str(tmp_path / "biased.gguf"), **EXACT)) == expected


def _tiny(config_class: type, **fields) -> transformers.PreTrainedModel:
    """A tiny random model of config_class with its biases drawn, for the GGUF layouts below."""
    name = config_class.__name__.replace("Config", "ForCausalLM")
    return _with_biases(config_class(
        architectures=[name], vocab_size=VOCAB, hidden_size=128, head_dim=32, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=None, eos_token_id=None, initializer_range=0.2, **fields))


@pytest.mark.parametrize("tied", [True, False])
def test_qwen2_gguf_logits_and_greedy_tokens_match_transformers(tmp_path, tied):
    # Qwen2.5's files (Q/K/V biases, rotary layout unpermuted) were mapped but never run.
    model = _tiny(transformers.Qwen2Config, tie_word_embeddings=tied, rope_theta=1_000_000.0)
    tensors = _gguf_tensors(model)
    assert "blk.0.attn_q.bias" in tensors and ("output.weight" in tensors) != tied
    _write_gguf(tmp_path / "qwen2.gguf", model.config, tensors, architecture="qwen2")
    llm = LLM(str(tmp_path / "qwen2.gguf"), **EXACT)
    assert _max_logit_diff(llm.engine, model) < 1e-3
    assert _generate(llm) == _greedy_alone(model)


# Llama 3.1/3.2's rope scaling, past its (here shrunk) original context, where the scaling moves logits by ~13.
LLAMA3_ROPE = {"rope_theta": 10_000.0, "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
LONG_PROMPT = [_rng.randrange(VOCAB) for _ in range(300)]


def _llama3_rope_freqs(config: transformers.PretrainedConfig) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter stores as rope_freqs.weight for Llama 3.1's scaling."""
    rope = config.rope_parameters
    old, low, high, factor = (rope[k] for k in ("original_max_position_embeddings", "low_freq_factor",
                                                 "high_freq_factor", "factor"))
    wavelengths = 2 * np.pi * rope["rope_theta"] ** (np.arange(0, config.head_dim, 2) / config.head_dim)
    smooth = (old / wavelengths - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelengths < old / high, 1.0, np.where(wavelengths > old / low, factor, mid)).astype(np.float32)


@pytest.mark.parametrize("layout", ["hf", "gguf"])
def test_llama3_rope_scaling_matches_transformers_past_the_original_context(tmp_path, layout):
    model = _tiny(transformers.LlamaConfig, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)
    if layout == "hf":
        _save_hf_directory(model, tmp_path)
        path = tmp_path
    else:
        tensors = {**_gguf_tensors(model, permute=True), "rope_freqs.weight": _llama3_rope_freqs(model.config)}
        path = tmp_path / "llama31.gguf"
        _write_gguf(path, model.config, tensors, architecture="llama")
    engine = LLM(str(path), **EXACT).engine
    rows, tokens = _engine_logits(engine, LONG_PROMPT, steps=4)
    with torch.no_grad():
        expected = model(torch.tensor([LONG_PROMPT + tokens[:-1]])).logits[0]
    assert (rows - expected).abs().max().item() < 1e-3


@pytest.mark.parametrize("key", ["rope.scaling.factor", "rope.scale_linear"])
def test_a_gguf_linear_rope_factor_without_a_scaling_type_is_applied_as_llama_cpp(tmp_path, key):
    # Files from 2023's convert.py (SuperHOT, LongChat) carry the factor alone; it was ignored (logits off by 12.5).
    model = _tiny(transformers.LlamaConfig, tie_word_embeddings=False,
                  rope_parameters={"rope_theta": 10_000.0, "rope_type": "linear", "factor": 4.0})
    _write_gguf(tmp_path / "linear.gguf", model.config, _gguf_tensors(model, permute=True), architecture="llama",
                **{key: 4.0})
    assert _max_logit_diff(LLM(str(tmp_path / "linear.gguf"), **EXACT).engine, model) < 1e-3


def test_a_gguf_rotating_part_of_each_head_is_refused(qwen3_model, tmp_path):
    # rope.dimension_count was never read: the whole head was rotated, another model's math, silently.
    _write_gguf(tmp_path / "partial.gguf", qwen3_model.config, _gguf_tensors(qwen3_model), rotated=16)
    with pytest.raises(ModelLoadError, match="rotates 16 of each head's 32 dimensions"):
        LLM(str(tmp_path / "partial.gguf"), **EXACT)
