"""Prompt lookup: the tokens that followed the latest earlier occurrence of the text's tail."""

import numpy as np


def lookup(context: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier match of context's last n tokens, longest n first."""
    if k <= 0 or len(context) <= min_n:
        return []
    tokens = np.asarray(context, dtype=np.int64)
    last = len(tokens) - 1
    # Positions where an earlier window ends, narrowed one token further back at a time: one pass over the
    # text, then work on the few candidates only (this runs for every decoding sequence every step).
    ends = np.flatnonzero(tokens[:-1] == tokens[last])
    matched = 1
    while ends.size and matched < max_n:
        longer = ends[(ends >= matched) & (tokens[ends - matched] == tokens[last - matched])]
        if not longer.size:
            break
        ends, matched = longer, matched + 1
    if not ends.size or matched < min_n:
        return []
    # The latest match is the likeliest to continue as the text does now (an edit in progress).
    start = int(ends[-1]) + 1
    return context[start : start + k]


def lookup_in(source: list[int], context: list[int], k: int, max_n: int) -> list[int]:
    """Up to k tokens of source that follow the longest tail of context found in it (predicted outputs)."""
    if k <= 0 or not source or not context:
        return []
    src = np.asarray(source, dtype=np.int64)
    tail = np.asarray(context[-max_n:], dtype=np.int64)
    for n in range(min(len(tail), len(src)), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(src, n)
        hits = np.flatnonzero((windows == tail[-n:]).all(axis=1))
        if hits.size:
            # An edited text runs roughly alongside its prediction: of several matches, take the one nearest to
            # where the context's tail sits in it.
            start = int(hits[np.abs(hits - (len(context) - n)).argmin()]) + n
            return source[start : start + k]
    return []
