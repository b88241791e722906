"""The engine: scheduling, KV blocks, model execution, sampling and detokenization."""
