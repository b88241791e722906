"""Encoder models served for embeddings: the model with its pooling, dynamic batching, the offline Embedder."""
