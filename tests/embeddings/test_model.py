"""The BERT encoder with its pooling equals transformers' with sentence-transformers' pooling, alone and batched."""

import pytest
import torch
import torch.nn.functional as F

from tokenmill.embeddings.embedder import Embedder
from tokenmill.embeddings.model import EmbeddingModel
from tokenmill.embeddings.pooling import Pooling


@pytest.fixture(scope="module", params=["float32", "auto"])
def embedder(request, minilm_path) -> Embedder:
    """The offline Embedder in float32 and in what `auto` picks on this CPU (bfloat16 linears with avx512_bf16)."""
    return Embedder(str(minilm_path), dtype=request.param)


@pytest.fixture(scope="module")
def expected(reference, sentences) -> torch.Tensor:
    return reference(sentences)


def test_tokens_equal_transformers_tokenizer(minilm_path, sentences):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path))
    model = EmbeddingModel.load(str(minilm_path), "float32")
    assert model.tokenize(sentences) == [tokenizer(s)["input_ids"] for s in sentences]
    # Truncation keeps [CLS] and [SEP] around the first tokens, as transformers' truncation does.
    assert model.tokenize(sentences[-8:], limit=12) == [
        tokenizer(s, truncation=True, max_length=12)["input_ids"] for s in sentences[-8:]]


def test_each_sentence_alone_matches_reference(embedder, expected, sentences):
    alone = torch.cat([embedder.embed(s) for s in sentences])
    assert F.cosine_similarity(alone, expected).min() >= 0.9999


def test_batched_sentences_match_reference(embedder, expected, sentences):
    batched = embedder.embed(sentences)
    assert batched.shape == (64, 384)
    assert F.cosine_similarity(batched, expected).min() >= 0.9999
    assert torch.allclose(batched.norm(dim=-1), torch.ones(64), atol=1e-5)


def test_small_token_budget_splits_batches_without_changing_results(minilm_path, expected, sentences):
    # A budget of 64 padded tokens forces many small batches, and the long sentences to run alone.
    small = Embedder(str(minilm_path), dtype="float32", max_batch_tokens=64).embed(sentences)
    assert F.cosine_similarity(small, expected).min() >= 0.9999


def test_padding_does_not_leak_into_pooling(embedder, sentences):
    short, long = sentences[2], sentences[56]
    together = embedder.embed([short, long])
    # Padded positions in the pooling cost 0.45 of cosine. bfloat16 GEMMs round by batch shape (oneDNN's AMX
    # kernels: 1.3e-5 here), float32 ones do not.
    exact = embedder.model.encoder.layers[0].dtype == torch.float32
    assert F.cosine_similarity(together[0], embedder.embed(short)[0], dim=0) >= (0.99999 if exact else 0.9999)


@pytest.mark.parametrize("modes", [("cls",), ("max",), ("mean_sqrt_len",), ("cls", "mean")])
def test_other_pooling_modes_match_their_definitions(modes):
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = Pooling(modes, normalize=False)(hidden, mask)
    first = hidden[0, :3]
    expected = {"cls": first[0], "max": first.max(0).values, "mean": first.mean(0),
                "mean_sqrt_len": first.sum(0) / 3 ** 0.5}
    assert torch.allclose(out[0], torch.cat([expected[m] for m in modes]), atol=1e-6)


def test_pooling_reads_sentence_transformers_config(minilm_path):
    assert Pooling.from_dir(minilm_path) == Pooling(("mean",), normalize=True)
