"""Embedder: offline embeddings, `Embedder("all-minilm-l6-v2").embed(texts)`, batched as the server batches."""

import torch

from tokenmill.embeddings.batcher import BatchPolicy, plan_batches
from tokenmill.embeddings.inputs import EmbeddingInput, check_dimensions, shorten, token_inputs
from tokenmill.embeddings.model import EmbeddingModel


class Embedder:
    """Load an embedding model once and embed batches of texts or token ids."""

    def __init__(self, model: str = "all-minilm-l6-v2", dtype: str = "auto",
                 max_batch_tokens: int = BatchPolicy.max_batch_tokens) -> None:
        self.model = EmbeddingModel.load(model, dtype)
        self.max_batch_tokens = max_batch_tokens

    def embed(self, inputs: EmbeddingInput, truncate_prompt_tokens: int | None = None,
              dimensions: int | None = None) -> torch.Tensor:
        """Embeddings [len(inputs), dimensions] in input order; inputs run sorted by length to limit padding."""
        check_dimensions(self.model, dimensions)
        ids = token_inputs(self.model, inputs, truncate_prompt_tokens)
        out = torch.empty(len(ids), self.model.dimensions)
        for batch in plan_batches([len(i) for i in ids], self.max_batch_tokens):
            out[batch] = self.model.embed([ids[i] for i in batch])
        return shorten(self.model, out, dimensions)
