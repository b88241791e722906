"""Mixtral, Qwen2-MoE and Qwen3-MoE: logits and greedy tokens equal transformers'; routing equals its router's."""

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

# Shared with the dense families: prompts, the byte-level directory, the logit probe and the greedy runs.
from test_families import (
    EXACT, MAX_TOKENS, PROMPTS, VOCAB, Family, _engine_logits, _generate, _greedy_alone, _max_logit_diff,
    _save_hf_directory,
)
from tokenmill import LLM
from tokenmill.errors import ModelLoadError
from tokenmill.layers.moe import Gate, SparseMoE, route
from tokenmill.loader.hf import HFDirectory
from tokenmill.models.llama import LlamaMLP
from tokenmill.models.registry import model_class
from tokenmill.quant.linear import Int8Linear


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: these matrices are 64 wide, and on a shared 2-core machine handing each op to a second
    thread made a 5-prompt run take 6.4 s instead of 0.03 s (index_add_ and linear waiting on the other thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(family: str) -> transformers.PretrainedConfig:
    # hidden 64 with 4 heads of 32: the C++ attention op's head size, and every width a multiple of int8's 32.
    common = dict(
        vocab_size=VOCAB, hidden_size=64, head_dim=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=256, bos_token_id=None,
        eos_token_id=None, initializer_range=0.2,  # peaked logits, as in test_families
    )
    if family == "mixtral":
        return transformers.MixtralConfig(architectures=["MixtralForCausalLM"], intermediate_size=64,
                                          num_local_experts=4, **common)
    if family == "qwen2_moe":  # Qwen1.5-MoE's rules: no renormalization, a shared expert; layer 1 kept dense
        return transformers.Qwen2MoeConfig(architectures=["Qwen2MoeForCausalLM"], intermediate_size=96,
                                           num_experts=8, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=64, norm_topk_prob=False,
                                           mlp_only_layers=[1], **common)
    return transformers.Qwen3MoeConfig(architectures=["Qwen3MoeForCausalLM"], intermediate_size=96, num_experts=8,
                                       moe_intermediate_size=32, norm_topk_prob=True, **common)


def _random_model(family: str) -> transformers.PreTrainedModel:
    config = _config(family)
    torch.manual_seed(0)
    return getattr(transformers, config.architectures[0])(config).eval()


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "qwen3_moe"])
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


def _moe_blocks(model: torch.nn.Module) -> list[SparseMoE | None]:
    """Each decoder layer's mixture of experts, or None where the layer is dense."""
    return [next((m for m in layer.modules() if isinstance(m, SparseMoE)), None) for layer in model.layers]


def test_logits_match_transformers(family, llm):
    sparse = [layer.mlp.__class__.__name__.endswith("SparseMoeBlock") for layer in family.reference.model.layers]
    assert [block is not None for block in _moe_blocks(llm.engine.runner.model)] == sparse
    diff = _max_logit_diff(llm.engine, family.reference)
    print(f"{family.name}: max |logit diff| {diff:.2e}")
    assert diff < 1e-3


def test_greedy_tokens_match_transformers_when_batched(family, llm):
    assert _generate(llm) == family.greedy


def test_greedy_tokens_match_transformers_when_chunked_and_preempted(family, llm):
    block_bytes = llm.engine.runner.kv_cache.block_bytes
    # As in test_families: 8 blocks hold the longest sequence but not all five; 16-token steps split prompts,
    # so each step routes a different mix of tokens through the experts.
    small = LLM(str(family.path), kv_cache_memory=8 * block_bytes / 2**30, max_num_batched_tokens=16,
                max_num_seqs=16, **EXACT)
    assert small.engine.block_manager.num_blocks == 8
    assert _generate(small) == family.greedy
    assert small.engine.scheduler.num_preemptions > 0


def test_int8_moe_model_quantizes_its_experts_and_keeps_its_router_float(family):
    llm = LLM(str(family.path), quantization="int8", kv_cache_dtype="float32")
    blocks = [b for b in _moe_blocks(llm.engine.runner.model) if b is not None]
    for block in blocks:
        experts = [*block.experts, *([block.shared_expert] if block.shared_expert is not None else [])]
        assert all(isinstance(e.gate_up_proj, Int8Linear) and isinstance(e.down_proj, Int8Linear) for e in experts)
        assert isinstance(block.gate, Gate) and block.gate.weight.dtype == torch.float32
    outputs = _generate(llm)
    assert [len(tokens) for tokens in outputs] == [MAX_TOKENS] * len(outputs)
    # Rounding sends the odd token to another expert (a row's cosine fell to 0.80 once), but on the whole
    # the logits stay those of the float model: the mean cosine measured 0.996-0.999 per family.
    similarity = []
    for ids in PROMPTS:
        rows, _ = _engine_logits(llm.engine, ids, steps=1)
        with torch.no_grad():
            similarity.append(torch.cosine_similarity(rows, family.reference(torch.tensor([ids])).logits[0], dim=-1))
    assert torch.cat(similarity).mean() > 0.99


@pytest.mark.parametrize("router", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_routing_equals_transformers_router_including_ties(router):
    config = _config(router)
    reference = {"mixtral": transformers.models.mixtral.modeling_mixtral.MixtralTopKRouter,
                 "qwen2_moe": transformers.models.qwen2_moe.modeling_qwen2_moe.Qwen2MoeTopKRouter,
                 "qwen3_moe": transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeTopKRouter}[router](config)
    torch.manual_seed(1)
    weight = torch.randn(reference.weight.shape)
    weight[2] = weight[1]  # experts 1 and 2 tie on every token
    weight[-1] = 0  # and a zero row ties whichever experts land on logit 0
    x = torch.randn(64, config.hidden_size)
    x[:8] = 0  # all-zero tokens: every expert ties
    with torch.no_grad():
        reference.weight.copy_(weight)
        _, expected_weights, expected_experts = reference(x)
    weights, experts = route(torch.nn.functional.linear(x, weight), config.num_experts_per_tok,
                             normalize=router == "mixtral" or config.norm_topk_prob)
    assert torch.equal(experts, expected_experts)
    assert torch.equal(weights, expected_weights)


def test_each_routed_expert_runs_once_and_the_rest_never():
    torch.manual_seed(0)
    moe = SparseMoE(hidden_size=32, intermediate_size=32, num_experts=8, top_k=2, normalize=False,
                    shared_intermediate_size=32)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(5, 32)
    calls: dict[int, int] = {}
    for i, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, args, out, i=i: calls.__setitem__(i, calls.get(i, 0) + 1))
    with torch.no_grad():
        out = moe(x)
        ran = dict(calls)
        weights, chosen = route(moe.gate(x), 2, normalize=False)
        # Per token, the plain sum this layer must equal.
        expected = torch.stack([
            sum(w * moe.experts[e](x[t : t + 1])[0] for w, e in zip(weights[t], chosen[t].tolist()))
            + torch.sigmoid(moe.shared_expert_gate(x[t])) * moe.shared_expert(x[t : t + 1])[0]
            for t in range(len(x))
        ])
    assert ran == {e: 1 for e in set(chosen.flatten().tolist())}
    assert len(ran) < 8  # 5 tokens x 2 experts leave some of the 8 unread
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_sparse_and_dense_layers_follow_decoder_sparse_step_and_mlp_only_layers(tmp_path):
    config = transformers.Qwen2MoeConfig(architectures=["Qwen2MoeForCausalLM"], num_hidden_layers=6,
                                         decoder_sparse_step=2, mlp_only_layers=[3], hidden_size=64,
                                         intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
    config.save_pretrained(tmp_path)
    save_file({}, tmp_path / "model.safetensors")  # HFDirectory reads only the config here
    ours = HFDirectory(tmp_path).model_config()
    with torch.device("meta"):
        model = model_class(ours.architecture)(ours)
        reference = transformers.Qwen2MoeForCausalLM(config)
    sparse = [layer.mlp.__class__.__name__ == "Qwen2MoeSparseMoeBlock" for layer in reference.model.layers]
    assert sparse == [False, True, False, False, False, True]
    assert [isinstance(layer.mlp, SparseMoE) for layer in model.layers] == sparse
    assert all(isinstance(layer.mlp, LlamaMLP) for layer, s in zip(model.layers, sparse) if not s)


def test_mixtral_checkpoint_missing_an_expert_is_a_load_error_naming_its_tensor(tmp_path):
    _save_hf_directory(_random_model("mixtral"), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"e\.g\. model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight$"):
        LLM(str(tmp_path), **EXACT)
