"""Perplexity through the engine equals transformers' on the same windows of a shipped text."""

import math
from pathlib import Path

import pytest
import torch

from tokenmill.errors import InvalidRequestError, TokenmillError
from tokenmill.perplexity import perplexity, windows

SAMPLE = Path(__file__).parent / "data" / "sample.txt"


def test_windows_score_every_token_after_the_first_once():
    spans = windows(10, context=4, stride=2)
    assert spans == [(0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    scored = [p for _, end, first in spans for p in range(first, end)]
    assert scored == list(range(1, 10))


@pytest.mark.parametrize("context, stride, error", [(1, 1, "context=1 must be at least 2"), (8, 0, "stride=0"),
                                                    (8, 9, "stride=9"), (8, 8, "stride=8")])
def test_windows_that_would_score_nothing_or_skip_tokens_are_refused(context, stride, error):
    with pytest.raises(InvalidRequestError, match=error):
        windows(100, context, stride)


def test_a_context_the_engine_cannot_hold_with_its_one_generated_token_is_refused(smollm2_path):
    from tokenmill import LLM

    llm = LLM(str(smollm2_path), max_model_len=64, kv_cache_memory=0.05)
    with pytest.raises(InvalidRequestError, match="context=64 must be below this engine's max_model_len"):
        perplexity(llm, list(range(100, 300)), context=64, stride=32)


def test_log_probabilities_that_are_not_numbers_give_an_error_not_a_figure(smollm2_path, monkeypatch):
    from tokenmill import LLM
    from tokenmill.outputs import TokenLogprob

    llm = LLM(str(smollm2_path), kv_cache_memory=0.05)
    generate = llm.generate

    def nan_scores(prompts, params):  # as a model overflowing its dtype scores every token
        outputs = generate(prompts, params)
        for output in outputs:
            output.prompt_logprobs = [None, *(TokenLogprob(lp.token_id, math.nan) for lp in output.prompt_logprobs[1:])]
        return outputs

    monkeypatch.setattr(llm, "generate", nan_scores)
    with pytest.raises(TokenmillError, match="log-probabilities came out nan"):
        perplexity(llm, list(range(100, 140)), context=16, stride=8)


def test_engine_perplexity_matches_transformers(smollm2_path, hf_smollm2):
    from tokenmill import LLM

    llm = LLM(str(smollm2_path))
    ids = llm.tokenizer.encode(SAMPLE.read_text())
    ours = perplexity(llm, ids, context=128, stride=64)
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in windows(len(ids), 128, 64):
            logprobs = torch.log_softmax(hf_smollm2(torch.tensor([ids[begin:end]])).logits[0], dim=-1)
            targets = torch.tensor(ids[first:end])
            nll -= logprobs[first - begin - 1 : end - begin - 1].gather(1, targets[:, None]).sum().item()
            count += end - first
    assert ours.num_tokens == count == len(ids) - 1
    assert ours.perplexity == pytest.approx(torch.tensor(nll / count).exp().item(), rel=1e-4)
    assert 2 < ours.perplexity < 100  # a fluent English text under a real model


def test_eval_perplexity_cli(smollm2_path):
    import subprocess
    import sys

    # No --stride: half the context (a fixed 256 refused any --context up to 256).
    result = subprocess.run([sys.executable, "-m", "tokenmill.cli", "eval", "perplexity", "--model", str(smollm2_path),
                             "--file", str(SAMPLE), "--context", "128"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("perplexity ") and "windows of 128 (stride 64)" in result.stdout
