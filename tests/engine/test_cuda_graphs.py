"""Decode graphs' padded static batch gives the same tokens as eager steps (run eagerly on CPU, replayed on CUDA)."""

from types import SimpleNamespace

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.cuda_graphs import DecodeGraphs
from tokenmill.engine.model_runner import captures_decode
from tokenmill.layers.attention import AttentionMetadata
from tokenmill.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = ["The river runs", "Seven engines sing under a bright cloud", "Paper", "Orange history", "The market"]


def test_padded_decode_batches_give_the_eager_tokens(make_engine, run_prompts):
    expected = run_prompts(make_engine(), PROMPTS, GREEDY)
    engine = make_engine()
    runner = engine.runner
    graphs = DecodeGraphs(runner.model, [2, 8], max_blocks=64, block_size=runner.block_size,
                          device=torch.device("cpu"), capture=False)
    sizes: list[int] = []
    run = graphs.run
    graphs.run = lambda ids, positions, meta: sizes.append(ids.shape[0]) or run(ids, positions, meta)
    runner.graphs = graphs
    assert run_prompts(engine, PROMPTS, GREEDY) == expected
    # Five decodes padded to 8, then fewer as prompts finish; every decode-only step went through the graphs.
    assert 5 in sizes and all(n <= 8 for n in sizes)


def _decodes(rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    positions = torch.full((rows,), 4)
    meta = AttentionMetadata(slot_mapping=positions, row_tables=torch.zeros(rows, width, dtype=torch.long),
                             row_lens=positions + 1, block_size=16, num_decodes=rows, prefills=[])
    return torch.ones(rows, dtype=torch.long), positions, meta


def test_a_batch_no_graph_fits_is_left_to_the_eager_path():
    graphs = DecodeGraphs(lambda ids, positions: ids.float()[:, None], [2], max_blocks=2, block_size=16,
                          device=torch.device("cpu"), capture=False)
    assert graphs.run(*_decodes(2, 2)) is not None
    assert graphs.run(*_decodes(3, 2)) is None  # more rows than the largest graph
    assert graphs.run(*_decodes(2, 3)) is None  # a block table wider than the graphs were captured for


def test_only_plain_models_on_cuda_replay_decode_graphs():
    cuda, dense, moe = torch.device("cuda"), SimpleNamespace(num_experts=0), SimpleNamespace(num_experts=8)
    assert captures_decode(cuda, EngineConfig(), dense, hybrid=False)
    assert not captures_decode(torch.device("cpu"), EngineConfig(), dense, hybrid=False)
    assert not captures_decode(cuda, EngineConfig(enforce_eager=True), dense, hybrid=False)
    assert not captures_decode(cuda, EngineConfig(), dense, hybrid=True)  # Gemma 3: the sliding layers' tables
    assert not captures_decode(cuda, EngineConfig(), moe, hybrid=False)  # routing reads counts on the host
