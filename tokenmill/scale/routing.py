"""Prefix-aware routing: which replica most likely holds a prompt's prefix in its cache, unless load says otherwise."""

import hashlib
from collections.abc import Hashable, Mapping, Sequence

# Blocks of the prompt that name its prefix. Four 16-token blocks (64 tokens) cover a system prompt or a shared
# document's opening; requests that differ only after them land on the same replica, whose prefix cache then
# holds those blocks, and the rest of each prompt still goes wherever its prefix does.
PREFIX_BLOCKS = 4
# A preferred replica this many requests busier than the idlest is passed over: past it, waiting in its queue
# costs more than the prefill its cache would save.
MAX_IMBALANCE = 4


def prefix_key(token_ids: Sequence[int], block_size: int, num_blocks: int = PREFIX_BLOCKS) -> str | None:
    """A hash of the prompt's first full blocks (at most num_blocks); None for a prompt shorter than one block.

    Only full blocks count, because only full blocks enter a replica's prefix cache.
    """
    full = min(len(token_ids) // block_size, num_blocks)
    if full == 0:
        return None
    head = ",".join(map(str, token_ids[:full * block_size]))
    return hashlib.blake2b(head.encode(), digest_size=8).hexdigest()


def preferred(key: str, replicas: Sequence[Hashable]) -> Hashable:
    """The replica a prefix belongs to, by rendezvous hashing: adding or removing a replica moves only its share."""
    return max(replicas, key=lambda r: hashlib.blake2b(f"{key}|{r}".encode(), digest_size=8).digest())


def rank(key: str | None, loads: Mapping[Hashable, int], max_imbalance: int = MAX_IMBALANCE, turn: int = 0
         ) -> tuple[list[Hashable], str]:
    """Replicas in order of preference (the first that is not full takes the request), and why.

    loads: each replica's ongoing requests as last known. The reason is `prefix` when the prefix's replica
    comes first, `least_loaded` when the prompt has no full block or that replica is too busy; then, and after
    the prefix's replica, replicas come least loaded first, equal loads in an order that turns with `turn`.
    """
    replicas = list(loads)
    if key is None or len(replicas) < 2:
        return _by_load(replicas, loads, turn), "least_loaded"
    owner = preferred(key, replicas)
    if loads[owner] - min(loads.values()) > max_imbalance:
        return _by_load(replicas, loads, turn), "least_loaded"
    return [owner, *_by_load([r for r in replicas if r != owner], loads, turn)], "prefix"


def _by_load(replicas: list[Hashable], loads: Mapping[Hashable, int], turn: int) -> list[Hashable]:
    # NOTE: ties rotate by turn, one step per decision. A burst is routed on loads that do not move until its
    # requests are sent, so a fixed (or random) tie order sends several of it to one replica; rotating deals
    # them out in turn.
    order = []
    for load in sorted(set(loads[r] for r in replicas)):
        tied = [r for r in replicas if loads[r] == load]
        start = turn % len(tied)
        order += tied[start:] + tied[:start]
    return order
