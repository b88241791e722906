"""Paged KV blocks: allocation, reference counts, and a hash-chained prefix cache with LRU eviction."""

from collections import OrderedDict

from tokenmill.engine.sequence import Sequence


class Block:
    """One fixed-size slab of KV cache; shared between sequences when its prefix hash matches."""

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def block_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block, chained to its parent so equal blocks match only after equal prefixes."""
    return hash((parent_hash, token_ids))


class BlockManager:
    """Owns the block pool; hands out blocks to sequences and takes them back."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order: a freed block goes to the end, allocation takes from the front,
        # so cached blocks nobody holds are evicted least-recently-used first.
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds (cached ones included: they can be evicted)."""
        return len(self.free_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def allocate_prefix(self, seq: Sequence) -> None:
        """Give a newly admitted sequence the cached blocks of its longest cached prefix."""
        assert not seq.block_table, "allocate_prefix on a sequence that holds blocks"
        if not self.enable_prefix_caching:
            return
        # NOTE: at least one token must be computed to get logits, so the last token never hits.
        full_blocks = (seq.num_tokens - 1) // self.block_size
        self.prefix_queries += full_blocks * self.block_size
        parent = None
        for i in range(full_blocks):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = block_hash(parent, tokens)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._take(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            parent = h
        seq.num_cached_tokens = len(seq.block_table) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens
        self.prefix_hits += seq.num_cached_tokens

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """True if the pool can back num_new_tokens more computed tokens for seq."""
        return self._missing_blocks(seq, num_new_tokens) <= len(self.free_blocks)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Extend seq's block table to cover num_new_tokens more computed tokens."""
        for _ in range(self._missing_blocks(seq, num_new_tokens)):
            block_id, _ = self.free_blocks.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict: its contents are about to be overwritten
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                block.hash, block.token_ids = None, ()
            block.ref_count = 1
            seq.block_table.append(block_id)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish seq's newly computed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        computed_full = seq.num_computed_tokens // self.block_size
        for i in range(len(seq.block_hashes), computed_full):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = block_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if h not in self.cached and block.hash is None:
                self.cached[h] = block.block_id
                block.hash, block.token_ids = h, tokens

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past seq's tokens: those that only held its rejected drafts."""
        keep = self.blocks_needed(seq.num_tokens)
        for block_id in reversed(seq.block_table[keep:]):
            # Draft blocks are never full of computed tokens, so never cached: first out again, like any free one.
            self.blocks[block_id].ref_count -= 1
            self.free_blocks[block_id] = None
            self.free_blocks.move_to_end(block_id, last=False)
        del seq.block_table[keep:]

    def free(self, seq: Sequence) -> None:
        """Release all of seq's blocks; cached ones stay findable until evicted."""
        # Tail blocks are freed first so they are evicted before the shared prefix blocks.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
                if block.hash is None:
                    # Nothing cached to keep: hand it out first, while its pages are mapped and warm,
                    # rather than after every untouched block (a fresh page costs a fault to write).
                    self.free_blocks.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        seq.draft_computed = 0

    def _missing_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        return self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1
