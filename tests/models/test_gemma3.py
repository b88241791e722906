"""Gemma 3 agrees with transformers: a tiny random model from a Hugging Face directory, and the real 270M GGUF."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from oracles import greedy, share_gguf_work

from tokenmill import LLM, SamplingParams
from tokenmill.errors import ModelLoadError
from tokenmill.loader import catalog
from tokenmill.loader.gguf import GGUFFile
from tokenmill.loader.tokenizer import Tokenizer

PROMPTS = [list(range(100, 130)), [1, 42, 7, 99, 1000], [5] * 9 + list(range(300, 321)), [31, 415, 926, 535, 8, 979]]


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory, smollm2_source):
    """A random 3-layer Gemma 3 (two sliding layers with a window of 8, one global) saved as an HF directory."""
    path = tmp_path_factory.mktemp("gemma3")
    config = transformers.Gemma3TextConfig(
        architectures=["Gemma3ForCausalLM"], vocab_size=smollm2_source.config.vocab_size, hidden_size=64,
        intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], sliding_window=8,
        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=24, max_position_embeddings=512,
        initializer_range=0.2, eos_token_id=2, bos_token_id=1, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # Gemma initializes its norms to zero (a scale of 1); random ones test the 1 + w
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0, 0.3)
    model.save_pretrained(path)
    smollm2_source.tokenizer.backend.save(str(path / "tokenizer.json"))
    return path, model


def test_tiny_gemma3_logits_match_transformers_past_the_sliding_window(tiny_gemma3, last_logits):
    path, ref = tiny_gemma3
    llm = LLM(str(path), kv_cache_memory=0.05, kv_cache_dtype="float32")
    for ids in PROMPTS:
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0, -1]
        assert (last_logits(llm.engine, ids) - expected).abs().max().item() < 1e-3


def test_tiny_gemma3_in_bfloat16_embeds_and_normalizes_as_transformers(tiny_gemma3):
    path, ref = tiny_gemma3
    hf = transformers.Gemma3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours = LLM(str(path), dtype="bfloat16", kv_cache_memory=0.05).engine.runner.model
    ids = torch.tensor(PROMPTS[0])
    with torch.no_grad():
        # hidden 64 scales by 8.0 in any type (the 270M's 640 rounds: below)
        assert torch.equal(ours.embed_tokens(ids) * ours.embed_scale, hf.model.embed_tokens(ids))
        x = torch.randn(len(ids), 64).bfloat16()
        for mine, theirs in ((ours.norm, hf.model.norm), (ours.layers[0].input_layernorm,
                                                          hf.model.layers[0].input_layernorm)):
            # Bit for bit here, but a float32 sum's order varies by CPU and a last-bit difference may tip a rare
            # rounding elsewhere; a bfloat16 1 + w (the old fold) tipped 24% of these values.
            assert (mine(x) != theirs(x)).float().mean() < 0.01


def test_gemma3_in_float16_is_refused_before_it_loads(tiny_gemma3):
    # The 270M's residual stream overflows float16: every logit NaN, an empty reply and exit 0 (perplexity "nan").
    path, _ = tiny_gemma3
    with pytest.raises(ModelLoadError, match="overflows float16"):
        LLM(str(path), dtype="float16", kv_cache_memory=0.05)


def test_gemma3_270m_in_bfloat16_scales_its_embeddings_by_the_rounded_root_as_transformers():
    llm = LLM(str(catalog.pull("gemma3-270m")), dtype="bfloat16", quantization="none", kv_cache_memory=0.05)
    assert llm.engine.runner.model.embed_scale == 25.25  # sqrt(640) = 25.298 rounded to bfloat16


# Six float32 blocks (K and V, 3 layers, 16 tokens, 2 KV heads of 32): room for the longest sequence alone.
SIX_BLOCKS = 6 * 2 * 3 * 16 * 2 * 32 * 4 / 2**30


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 16, "max_num_seqs": 4}, {"kv_cache_memory": SIX_BLOCKS}],
                         ids=["batched", "chunked", "preempted"])
def test_tiny_gemma3_greedy_tokens_match_transformers(tiny_gemma3, options):
    path, ref = tiny_gemma3
    llm = LLM(str(path), kv_cache_dtype="float32", **{"kv_cache_memory": 0.05, **options})
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in PROMPTS], params)
    assert [o.outputs[0].token_ids for o in outputs] == greedy(ref, PROMPTS, 24)
    if "kv_cache_memory" in options:
        assert llm.engine.scheduler.num_preemptions > 0


GEMMA_PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
    "The three primary colors are", "Water boils at", "1, 2, 3, 4, 5,", "The largest planet in the solar system",
    "To make a cup of tea, first",
]


def _transformers_greedy() -> dict:
    """transformers' float32 load of the 270M GGUF (every block dequantized by the gguf package) and its greedy tokens.

    The load parses the header and dequantizes for about 10 s, and the script takes 26 s in all: run in a child from
    the suite's start (conftest._EARLY), so the test only reads the tokens.
    """
    share_gguf_work(pytest.MonkeyPatch())  # a script's patches need no undoing
    path = catalog.pull("gemma3-270m")
    file = GGUFFile(path)
    tokenizer = Tokenizer.from_gguf(file, file.model_config().eos_token_ids)
    prompts = [tokenizer.encode(p) for p in GEMMA_PROMPTS]
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return {"prompts": prompts, "tokens": greedy(ref.eval(), prompts, 32)}


def test_gemma3_270m_gguf_greedy_tokens_match_transformers(early_output):
    reference = early_output(Path(__file__))
    # Unquantized: the GGUF's blocks dequantized by the gguf package, as transformers does, so this checks the model.
    llm = LLM(str(catalog.pull("gemma3-270m")), quantization="none", kv_cache_dtype="float32", kv_cache_memory=0.1)
    assert reference["prompts"] == [llm.tokenizer.encode(p) for p in GEMMA_PROMPTS]
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in reference["prompts"]],
                           SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outputs] == reference["tokens"]


def test_gemma3_270m_long_prompt_gives_the_same_tokens_alone_batched_and_cached_past_its_window():
    # 700 tokens, prefilled in chunks: past the 512-key window of five layers in six, whose blocks before it are
    # released. Alone, its decode rows see hundreds of keys of Gemma 3's one KV head, and attention splits them
    # across threads (where there are two or more); in a batch of three, one task each.
    llm = LLM(str(catalog.pull("gemma3-270m")), kv_cache_memory=0.1, max_num_batched_tokens=256)
    gen = torch.Generator().manual_seed(0)
    prompts = [{"prompt_token_ids": torch.randint(1000, 200_000, (n,), generator=gen).tolist()} for n in (700, 60, 130)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = llm.generate(prompts[:1], params)[0].outputs[0].token_ids
    batched = llm.generate(prompts, params)  # prompt 0's blocks cached by the first run, past the window
    assert batched[0].num_cached_tokens > 512
    assert batched[0].outputs[0].token_ids == alone


if __name__ == "__main__":
    print(json.dumps(_transformers_greedy()))
