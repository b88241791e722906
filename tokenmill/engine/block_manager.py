"""Paged KV blocks: allocation, reference counts, a hash-chained prefix cache with LRU eviction, and the release
of blocks that fall out of a sliding window."""

import hashlib
from array import array
from collections import OrderedDict

from tokenmill.engine.sequence import Sequence

# A block table entry whose block was released: it lay wholly before the sliding window, and no query reads it.
RELEASED = -1


class Block:
    """One fixed-size slab of KV cache; shared between sequences when its prefix hash matches."""

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.token_ids: tuple[int, ...] = ()


def chain_root(seq: Sequence) -> bytes | None:
    """What a sequence's first block hash chains to: its cache_salt's digest, so that only requests with the same
    salt share cached blocks (vLLM's cache_salt, keeping one tenant's prompts from timing another's)."""
    salt = seq.params.cache_salt
    return None if salt is None else hashlib.blake2b(b"salt\0" + salt.encode(), digest_size=16).digest()


def block_hash(parent_hash: bytes | None, token_ids: tuple[int, ...]) -> bytes:
    """Hash of a full block, chained to its parent so equal blocks match only after equal prefixes."""
    # A cryptographic digest, not hash(): Python's hash of ints is public arithmetic, so a client could craft a
    # prompt whose chain lands on another's and be served that request's KV (as vLLM moved to SHA-256 for).
    return hashlib.blake2b((parent_hash or b"") + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockPool:
    """One pool's blocks: free list in eviction order, reference counts, and the hash -> block prefix cache."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order: a freed block goes to the end, allocation takes from the front,
        # so cached blocks nobody holds are evicted least-recently-used first.
        self.free_blocks: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # block hash -> block id

    def find(self, h: bytes, tokens: tuple[int, ...]) -> int | None:
        """The cached block of hash h holding tokens, if any."""
        block_id = self.cached.get(h)
        return block_id if block_id is not None and self.blocks[block_id].token_ids == tokens else None

    def take(self, block_id: int) -> None:
        """Add a holder to a block (a cached one leaves the free list)."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1

    def pop(self) -> int:
        """A free block for new contents, evicting whatever it cached."""
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:  # evict: its contents are about to be overwritten
            if self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def release(self, block_id: int) -> None:
        """Drop a holder; a block nobody holds becomes free, cached ones stay findable until evicted."""
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_blocks[block_id] = None
            if block.hash is None:
                # Nothing cached to keep: hand it out first, while its pages are mapped and warm,
                # rather than after every untouched block (a fresh page costs a fault to write).
                self.free_blocks.move_to_end(block_id, last=False)

    def publish(self, block_id: int, h: bytes, tokens: tuple[int, ...]) -> None:
        """Make a computed full block findable by its hash."""
        block = self.blocks[block_id]
        if h not in self.cached and block.hash is None:
            self.cached[h] = block_id
            block.hash, block.token_ids = h, tokens


class BlockManager:
    """Owns the block pools; hands out blocks to sequences and takes them back.

    With a sliding window, the windowed layers' table drops (RELEASED) the blocks wholly before the window
    after every step: in seq.block_table when every layer slides (Mistral), or in seq.sliding_table over a
    pool of its own when full-attention layers keep seq.block_table whole (Gemma 3).
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
        sliding_window: int | None = None, num_sliding_blocks: int | None = None,
    ) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self.sliding_window = sliding_window
        # Hybrid models only: the pool of the sliding layers' blocks, and its table in each sequence.
        self.sliding_pool = BlockPool(num_sliding_blocks) if num_sliding_blocks is not None else None
        assert self.sliding_pool is None or sliding_window is not None, "a sliding pool needs a window"
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    @property
    def blocks(self) -> list[Block]:
        """The main pool's blocks."""
        return self.pool.blocks

    @property
    def cached(self) -> dict[int, int]:
        """The main pool's prefix cache."""
        return self.pool.cached

    @property
    def num_free_blocks(self) -> int:
        """Main-pool blocks no sequence holds (cached ones included: they can be evicted)."""
        return len(self.pool.free_blocks)

    @property
    def pools(self) -> list[BlockPool]:
        """The main pool, then a hybrid model's window pool: one per block table, in _tables' order."""
        return [self.pool] if self.sliding_pool is None else [self.pool, self.sliding_pool]

    @property
    def fullest_pool(self) -> BlockPool:
        """The pool with the largest share of its blocks held: a hybrid model's window pool may run out first."""
        return max(self.pools, key=lambda pool: 1 - len(pool.free_blocks) / pool.num_blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def window_start_block(self, num_computed_tokens: int) -> int:
        """First block the windowed layers still read once num_computed_tokens are computed: the next token,
        at position num_computed_tokens, sees keys from num_computed_tokens - window + 1 on."""
        return max(0, num_computed_tokens - self.sliding_window + 1) // self.block_size

    def max_window_blocks(self) -> int:
        """Most blocks a windowed table holds between steps: the window's keys before the next token, and its own."""
        return self.blocks_needed(self.sliding_window - 1) + 1

    def context_limit(self, step_tokens: int) -> int | None:
        """Most tokens of context the pools let one sequence reach, or None for any length: a windowed table holds
        only its window and one step's tokens, so a pool that fits those caps how many run, not how far."""
        limit = self.num_blocks * self.block_size
        if self.sliding_window is None:
            return limit
        fits_window = self.max_window_blocks() + self.blocks_needed(step_tokens) + 1
        if self.sliding_pool is None:
            return None if self.num_blocks >= fits_window else limit
        if self.sliding_pool.num_blocks < fits_window:
            # A sliding pool too small for that holds every block of a sequence: it caps the context too.
            limit = min(limit, self.sliding_pool.num_blocks * self.block_size)
        return limit

    def allocate_prefix(self, seq: Sequence) -> None:
        """Give a newly admitted sequence the cached blocks of its longest cached prefix."""
        assert not seq.block_table, "allocate_prefix on a sequence that holds blocks"
        if not self.enable_prefix_caching:
            return
        # NOTE: at least one token must be computed to get logits, so the last token never hits.
        full_blocks = (seq.num_tokens - 1) // self.block_size
        chain: list[tuple[bytes, tuple[int, ...]]] = []
        parent = chain_root(seq)
        for i in range(full_blocks):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            parent = block_hash(parent, tokens)
            chain.append((parent, tokens))
        hits = self._prefix_blocks(chain)
        for (pool, window, table), found in zip(self._tables(seq), self._found(chain[:hits])):
            start = self.window_start_block(hits * self.block_size) if window else 0
            for i, block_id in enumerate(found):
                if i < start:
                    table.append(RELEASED)  # before the window: the hit needs only its hash
                else:
                    pool.take(block_id)
                    table.append(block_id)
        seq.block_hashes.extend(h for h, _ in chain[:hits])
        seq.num_computed_tokens = hits * self.block_size

    def count_prefix_hit(self, seq: Sequence) -> None:
        """Record an admitted sequence's prefix hit: as its cached prompt tokens, and in the cache's counters."""
        if not self.enable_prefix_caching:
            return
        seq.num_cached_tokens = seq.num_computed_tokens
        self.prefix_queries += (seq.num_tokens - 1) // self.block_size * self.block_size
        self.prefix_hits += seq.num_cached_tokens

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """True if the pools can back num_new_tokens more computed tokens for seq."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        return all(needed - len(table) <= len(pool.free_blocks) for pool, _, table in self._tables(seq))

    def spare_blocks(self, wants: list[tuple[Sequence, int]]) -> list[int]:
        """Per table kind (main, then sliding), free blocks left once every (seq, new tokens) of wants is backed."""
        spare = [len(pool.free_blocks) for pool, _, _ in self._tables(wants[0][0])] if wants else []
        for seq, n in wants:
            for i, extra in enumerate(self.extra_blocks(seq, n, 0)):
                spare[i] -= extra
        return spare

    def extra_blocks(self, seq: Sequence, num_new_tokens: int, beyond: int) -> list[int]:
        """Per table kind, blocks seq needs for num_new_tokens more tokens beyond those it needs for `beyond`."""
        total, base = (self.blocks_needed(seq.num_computed_tokens + n) for n in (num_new_tokens, beyond))
        return [max(0, total - max(base, len(table))) for _, _, table in self._tables(seq)]

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Extend seq's block tables to cover num_new_tokens more computed tokens."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        for pool, _, table in self._tables(seq):
            table.extend(pool.pop() for _ in range(needed - len(table)))

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish seq's newly computed full blocks in the prefix cache, then release what left the window."""
        if self.enable_prefix_caching:
            computed_full = seq.num_computed_tokens // self.block_size
            for i in range(len(seq.block_hashes), computed_full):
                tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
                h = block_hash(seq.block_hashes[-1] if seq.block_hashes else chain_root(seq), tokens)
                seq.block_hashes.append(h)
                for pool, _, table in self._tables(seq):
                    if table[i] != RELEASED:
                        pool.publish(table[i], h, tokens)
        self.release_out_of_window(seq)

    def release_out_of_window(self, seq: Sequence) -> None:
        """Return the windowed table's blocks that no future query of seq reads."""
        for pool, window, table in self._tables(seq):
            if window is None:
                continue
            # Released entries form a prefix of the table: walk back from the window's start to the last one.
            i = min(self.window_start_block(seq.num_computed_tokens), len(table)) - 1
            while i >= 0 and table[i] != RELEASED:
                pool.release(table[i])
                table[i] = RELEASED
                i -= 1

    def held_blocks(self, seq: Sequence) -> list[int]:
        """Blocks seq holds in each table (released entries not counted)."""
        return [sum(b != RELEASED for b in table) for _, _, table in self._tables(seq)]

    def trim(self, seq: Sequence) -> None:
        """Give back the blocks past seq's tokens: those that only held its rejected drafts."""
        keep = self.blocks_needed(seq.num_tokens)
        for pool, _, table in self._tables(seq):
            for block_id in reversed(table[keep:]):
                # Draft blocks are never full of computed tokens, so never cached: first out again, like any free one.
                pool.release(block_id)
            del table[keep:]

    def free(self, seq: Sequence) -> None:
        """Release all of seq's blocks; cached ones stay findable until evicted."""
        for pool, _, table in self._tables(seq):
            # Tail blocks are freed first so they are evicted before the shared prefix blocks.
            for block_id in reversed(table):
                if block_id != RELEASED:
                    pool.release(block_id)
            table.clear()
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        seq.draft_computed = 0

    def _tables(self, seq: Sequence) -> list[tuple[BlockPool, int | None, list[int]]]:
        """(pool, window or None, table) of each of seq's block tables."""
        if self.sliding_pool is None:
            return [(self.pool, self.sliding_window, seq.block_table)]
        return [(self.pool, None, seq.block_table), (self.sliding_pool, self.sliding_window, seq.sliding_table)]

    def _found(self, chain: list[tuple[bytes, tuple[int, ...]]]) -> list[list[int | None]]:
        """Per table, the cached block of each hash in chain (None where it is not cached)."""
        return [[pool.find(h, tokens) for h, tokens in chain] for pool in self.pools]

    def _prefix_blocks(self, chain: list[tuple[bytes, tuple[int, ...]]]) -> int:
        """How many leading blocks of chain hit: every table must hold the blocks its layers read after them."""
        windows = [self.sliding_window] if self.sliding_pool is None else [None, self.sliding_window]
        found = self._found(chain)
        hits = len(chain)
        for window, blocks in zip(windows, found):
            if window is None:  # every block before the hit is read
                hits = next((i for i, b in enumerate(blocks) if b is None), hits)
        # A windowed table needs only the blocks in the window before the first token to compute; blocks
        # before it may have been evicted. Try the longest candidate first.
        while hits > 0 and self.sliding_window is not None:
            start = self.window_start_block(hits * self.block_size)
            if all(b is not None for window, blocks in zip(windows, found) if window for b in blocks[start:hits]):
                break
            hits -= 1
        return hits
