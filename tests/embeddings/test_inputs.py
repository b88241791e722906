"""Request inputs become token ids within the model's limit; dimensions shorten vectors."""

import pytest
import torch

from tokenmill.embeddings.inputs import shorten, token_inputs
from tokenmill.embeddings.model import EmbeddingModel
from tokenmill.errors import InvalidRequestError


@pytest.fixture(scope="module")
def model(minilm_path) -> EmbeddingModel:
    return EmbeddingModel.load(str(minilm_path), "float32")


def test_each_input_form_becomes_a_list_of_token_id_lists(model):
    ids = model.tokenize(["hello world"])[0]
    assert token_inputs(model, "hello world") == [ids]
    assert token_inputs(model, ["hello world", "hi"]) == [ids, model.tokenize(["hi"])[0]]
    assert token_inputs(model, ids) == [ids]
    assert token_inputs(model, [ids, [101, 102]]) == [ids, [101, 102]]


def test_truncation_cuts_texts_around_their_special_tokens_and_ids_to_their_first(model):
    text = "one two three four five six"
    cut = token_inputs(model, [text, list(range(1000, 1300))], truncate=5)
    assert cut[0] == [101, *model.tokenize([text])[0][1:4], 102]
    assert cut[1] == [1000, 1001, 1002, 1003, 1004]
    assert [len(i) for i in token_inputs(model, [list(range(1000, 1300))], truncate=-1)] == [256]


def test_a_truncation_the_special_tokens_would_fill_is_refused_for_texts_not_for_ids(model):
    # truncate_prompt_tokens 1 embedded every text as [CLS] alone, answered 200.
    for k in (1, 2):
        with pytest.raises(InvalidRequestError, match="special tokens"):
            token_inputs(model, "The cat sat on the mat", truncate=k)
    assert token_inputs(model, [[1000, 1001, 1002]], truncate=1) == [[1000]]
    assert len(token_inputs(model, "The cat sat on the mat", truncate=3)[0]) == 3


def test_token_ids_over_the_limit_are_refused_naming_both_lengths(model):
    with pytest.raises(InvalidRequestError, match="input\\[0\\] is 300 tokens; this model's limit is 256"):
        token_inputs(model, list(range(1000, 1300)))


def test_a_text_of_bytes_that_are_not_utf8_is_refused_naming_the_input(model):
    # What Python makes of them (surrogateescape), as `LLM.embed` may be given; tokenizers raised a TypeError.
    with pytest.raises(InvalidRequestError, match="input\\[1\\] holds bytes that are not UTF-8"):
        token_inputs(model, ["fine", "caf\udce9"])


def test_shorten_renormalizes_only_where_the_model_normalizes(model):
    vectors = torch.nn.functional.normalize(torch.randn(2, 384), dim=-1)
    assert torch.allclose(shorten(model, vectors, 8).norm(dim=-1), torch.ones(2))
    assert shorten(model, vectors, None) is vectors
    with pytest.raises(InvalidRequestError, match="dimensions is 400"):
        shorten(model, vectors, 400)
