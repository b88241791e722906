"""What an embeddings request may ask: its inputs as token ids within the model's limit, and shorter vectors."""

import torch
import torch.nn.functional as F

from tokenmill.embeddings.model import EmbeddingModel
from tokenmill.errors import InvalidRequestError
from tokenmill.loader.tokenizer import is_text

EmbeddingInput = str | list[str] | list[int] | list[list[int]]


def token_inputs(model: EmbeddingModel, inputs: EmbeddingInput, truncate: int | None = None,
                 empty_texts: bool = False) -> list[list[int]]:
    """Token ids of each input (texts get the special tokens; ids are taken as given), checked against the limit.

    truncate: None to refuse an input over the model's limit, k to cut every input to its first k tokens
    (a text keeps its special tokens), -1 to cut to the limit: vLLM's `truncate_prompt_tokens`.
    empty_texts: "" embeds as its special tokens alone, rather than being refused (OpenAI refuses it for embeddings).
    """
    limit = _truncation(model, truncate)
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise InvalidRequestError("input is an empty list; give a string, strings, token ids or lists of them",
                                  param="input")
    if all(isinstance(t, int) for t in inputs):
        inputs = [inputs]
    for i, item in enumerate(inputs):
        # A blank text is its special tokens alone: with none, nothing to pool.
        if len(item) == 0 and not (empty_texts and isinstance(item, str) and model.num_special_tokens):
            raise InvalidRequestError(f"input[{i}] is empty", param="input")
        if isinstance(item, str) and not is_text(item):  # the server refuses these earlier; LLM.embed here
            raise InvalidRequestError(f"input[{i}] holds bytes that are not UTF-8 (lone surrogates); send valid "
                                      "Unicode", param="input")
        if not isinstance(item, str):
            bad = next((t for t in item if not 0 <= t < model.vocab_size), None)
            if bad is not None:
                raise InvalidRequestError(f"input[{i}] holds token id {bad}; this model's ids run from 0 to "
                                          f"{model.vocab_size - 1}", param="input")
    texts = [i for i, item in enumerate(inputs) if isinstance(item, str)]
    if texts and limit is not None and limit <= model.num_special_tokens:
        # The special tokens alone would fill it: every text would embed as [CLS] and nothing of its own.
        raise InvalidRequestError(f"truncate_prompt_tokens is {limit}; a text needs more than the "
                                  f"{model.num_special_tokens} special tokens this model adds to it",
                                  param="truncate_prompt_tokens")
    ids: list[list[int]] = [item if not isinstance(item, str) else [] for item in inputs]
    for i, encoded in zip(texts, model.tokenize([inputs[i] for i in texts], limit)):
        ids[i] = encoded
    if limit is not None:
        return [item[:limit] for item in ids]
    for i, item in enumerate(ids):
        if len(item) > model.max_input_tokens:
            raise InvalidRequestError(
                f"input[{i}] is {len(item)} tokens; this model's limit is {model.max_input_tokens} tokens; shorten "
                f"it, or pass truncate_prompt_tokens (-1 cuts every input to the limit)", param="input")
    return ids


def _truncation(model: EmbeddingModel, truncate: int | None) -> int | None:
    if truncate is None:
        return None
    if truncate == -1:
        return model.max_input_tokens
    if not 1 <= truncate <= model.max_input_tokens:
        raise InvalidRequestError(f"truncate_prompt_tokens is {truncate}; give 1 to {model.max_input_tokens} (this "
                                  f"model's limit) or -1 for the limit", param="truncate_prompt_tokens")
    return truncate


def check_dimensions(model: EmbeddingModel, dimensions: int | None) -> None:
    """Raise unless dimensions is None or 1 to the model's own."""
    if dimensions is not None and not 1 <= dimensions <= model.dimensions:
        raise InvalidRequestError(f"dimensions is {dimensions}; this model's embeddings have {model.dimensions}; "
                                  f"ask for 1 to {model.dimensions}", param="dimensions")


def shorten(model: EmbeddingModel, embeddings: torch.Tensor, dimensions: int | None) -> torch.Tensor:
    """The first `dimensions` of each embedding, normalized again where the model normalizes its output."""
    check_dimensions(model, dimensions)
    if dimensions is None or dimensions == model.dimensions:
        return embeddings
    shorter = embeddings[:, :dimensions]
    return F.normalize(shorter, dim=-1) if model.pooling.normalize else shorter
