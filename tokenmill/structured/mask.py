"""The constrained rows of a batch masked by their grammars (masks computed ahead, in matcher.py); no other row pays."""

import numpy as np
import torch

from tokenmill.structured.matcher import GrammarState


def apply_masks(logits: torch.Tensor, rows: list[int], states: list[GrammarState]) -> None:
    """Set to -inf, in place, every logit its row's grammar rules out; other rows are not touched."""
    vocab = states[0].vocab_size  # every sequence of one engine shares its tokenizer
    bitmask = torch.cat([state.mask() for state in states])
    # NOTE: numpy, not torch, on CPU: torch splits a 49k-element op across its threads, and on this shared 2-core
    # machine unpacking and applying one row's mask that way took 130 ms a step against 0.1 ms in one thread.
    # bitmask: [rows, words] int32, bit b of word w allowing token 32 * w + b.
    allowed = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab].view(bool)
    if not logits.is_cpu:
        keep = torch.zeros(len(rows), logits.shape[1], dtype=torch.bool)
        keep[:, :vocab] = torch.from_numpy(allowed)
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill(~keep.to(logits.device), float("-inf"))
        return
    scores = logits.numpy()
    for row, ok in zip(rows, allowed):
        # Write whichever side is smaller: a structural position allows a few tokens, the inside of a string most.
        kept = np.flatnonzero(ok)
        if len(kept) < vocab // 2:
            values = scores[row, kept]
            scores[row] = -np.inf
            scores[row, kept] = values
        else:
            scores[row, np.flatnonzero(~ok)] = -np.inf
            scores[row, vocab:] = -np.inf  # padding columns past the tokenizer's vocabulary
