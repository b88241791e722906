"""transformers as the tests' reference: its GGUF loads made faster, and its greedy continuations.

Shared by conftest's fixtures and by the test files that compute their references as scripts (conftest._EARLY).
"""

import os
from functools import cache

import pytest
import torch


def share_gguf_work(patch: pytest.MonkeyPatch) -> None:
    """Have transformers' GGUF loads share gguf's header parses and name maps (it imports both from gguf at each use).

    transformers parses a file anew for a config, a tokenizer and the weights. The parse is gguf's own, unchanged:
    only shared, and kept (about 370 MiB of parsed fields for Gemma 3's), and made over the file read into memory
    rather than memory-mapped: np.memmap's bookkeeping on each of its million slices made Gemma 3's parse take 20 s
    here, against 5 s over a plain array. transformers also builds gguf's name map (thousands of formatted names)
    once for every submodule of the model, 397 times for SmolLM2: 8-11 s of its 15-19 s load.
    """
    import gguf
    import numpy as np

    parse = gguf.GGUFReader
    readers = {}

    def reader(path, mode="r"):
        stat = os.stat(path)
        key = (os.fspath(path), mode, stat.st_size, stat.st_mtime_ns)
        if key not in readers:
            with pytest.MonkeyPatch.context() as in_memory:
                in_memory.setattr(np, "memmap", lambda file, mode="r": np.fromfile(file, dtype=np.uint8))
                readers[key] = parse(path, mode)
        return readers[key]

    patch.setattr(gguf, "GGUFReader", reader)
    patch.setattr(gguf, "get_tensor_name_map", cache(gguf.get_tensor_name_map))  # a map is only read once built


def greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers' greedy continuations, n tokens each with EOS masked, for a list of prompts in one batch.

    Left padding under the attention mask gives each prompt the tokens it gets alone (checked on the prompts of
    tests/models), and one batch reads the LM head once a step: Gemma 3's is 670 MB in float32, so its 8 prompts
    take 4.4 s together against 22 s one at a time.
    """
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)  # masked out, so any id serves
    return out[:, width:].tolist()
