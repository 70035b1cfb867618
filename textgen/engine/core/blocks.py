"""The KV cache's block allocator: fixed-size blocks of positions from one pool, a block table per sequence.

Pure bookkeeping over block ids (no tensors): ``PagedKVCache`` (kv_cache.py) owns the memory the ids
index, and the prefix cache may attach content hashes to blocks to find them again.

* ``BlockPool``: ``allocate()`` a block (reference count 1), ``share(block)`` (count + 1; also revives a
  cached block whose count had dropped to 0), ``release(block)`` (count - 1; at 0 the block is free again).
  A free block that carries a content hash (``set_hash``) stays findable (``cached(hash)``) until its
  memory is needed: it is evicted least recently released first, and ``on_evict`` tells its owner.
* ``BlockTable``: one sequence's blocks in position order; position p lives in block ``blocks[p // size]``
  at offset ``p % size``. ``reserve`` grows it to hold more positions; ``writable`` gives the block a
  position may be written to, copying a shared block first (copy-on-write).

Allocation order keeps the resident set small: a block freed earlier (its memory already touched) is
reused first, then a never-used block (``high_water`` grows, so the cache can initialise memory lazily,
in block order), and only then is a cached block evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable

from textgen.errors import EngineError


class OutOfBlocksError(EngineError):
    """No free block is left in the pool (the scheduler admits and preempts so that this never reaches a user)."""


class BlockPool:
    def __init__(self, blocks: int, block_size: int, on_evict: Callable[[int, Hashable], None] | None = None) -> None:
        if blocks < 1 or block_size < 1:
            raise ValueError(f"a block pool needs at least one block of at least one position ({blocks}, {block_size})")
        self.total = blocks
        self.block_size = block_size
        self.on_evict = on_evict  # called with (block, hash) when a cached block is reused for new content
        self._refs = [0] * blocks
        self._recycled: list[int] = []  # free, touched before, no content hash: reused first (LIFO)
        self._high_water = 0  # blocks [high_water, total) have never been handed out
        self._cached: OrderedDict[int, None] = OrderedDict()  # free blocks with a content hash, LRU first
        self._hash_of: dict[int, Hashable] = {}
        self._block_of: dict[Hashable, int] = {}

    # ----- counts ----------------------------------------------------------------------------------

    @property
    def free(self) -> int:
        """Blocks that ``allocate`` can hand out now (cached blocks included: they are evicted on demand)."""
        return len(self._recycled) + (self.total - self._high_water) + len(self._cached)

    @property
    def used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.total - self.free

    @property
    def cached_free(self) -> int:
        """Free blocks still holding cached content."""
        return len(self._cached)

    @property
    def high_water(self) -> int:
        """Blocks [0, high_water) have been handed out at least once (their memory is touched)."""
        return self._high_water

    def refcount(self, block: int) -> int:
        return self._refs[block]

    def blocks_for(self, positions: int) -> int:
        """Blocks that hold ``positions`` positions."""
        return -(-positions // self.block_size)

    # ----- allocate, share, release ------------------------------------------------------------------

    def allocate(self) -> int:
        """A block for new content, with reference count 1."""
        if self._recycled:
            block = self._recycled.pop()
        elif self._high_water < self.total:
            block = self._high_water
            self._high_water += 1
        elif self._cached:
            block, _ = self._cached.popitem(last=False)
            evicted = self._forget_hash(block)
            if self.on_evict is not None and evicted is not None:
                self.on_evict(block, evicted)
        else:
            raise OutOfBlocksError(f"The KV cache has no free block (all {self.total} are in use).")
        self._refs[block] = 1
        return block

    def allocate_many(self, count: int) -> list[int]:
        """``count`` blocks, or none at all (OutOfBlocksError) when fewer are free."""
        if count > self.free:
            raise OutOfBlocksError(f"The KV cache has {self.free} free blocks; {count} are needed.")
        return [self.allocate() for _ in range(count)]

    def share(self, block: int) -> None:
        """One more reference to ``block``; a free cached block is taken back out of the eviction order."""
        self._check(block)
        if self._refs[block] == 0:
            if block not in self._cached:
                raise EngineError(f"KV block {block} is free and holds no cached content; it cannot be shared.")
            del self._cached[block]
        self._refs[block] += 1

    def release(self, block: int) -> None:
        """One reference fewer; at zero the block is free (kept findable by its hash while memory allows)."""
        self._check(block)
        if self._refs[block] <= 0:
            raise EngineError(f"KV block {block} released more often than it was allocated or shared.")
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if block in self._hash_of:
                self._cached[block] = None  # most recently released: evicted last
            else:
                self._recycled.append(block)

    def release_all(self, blocks: list[int]) -> None:
        # Released last block first, so a sequence's earlier (prefix) blocks stay cached longest.
        for block in reversed(blocks):
            self.release(block)

    # ----- content hashes (for the prefix cache) -----------------------------------------------------

    def set_hash(self, block: int, content: Hashable) -> None:
        """Mark an in-use block as holding ``content`` (a full block's chained hash); a block already
        registered under the same hash keeps it (the first copy stays the one that is found)."""
        self._check(block)
        if self._refs[block] <= 0:
            raise EngineError(f"KV block {block} is free; only a block in use can be given a hash.")
        if content in self._block_of or block in self._hash_of:
            return
        self._hash_of[block] = content
        self._block_of[content] = block

    def cached(self, content: Hashable) -> int | None:
        """The block holding ``content``, in use or free, or None."""
        return self._block_of.get(content)

    def hash_of(self, block: int) -> Hashable | None:
        return self._hash_of.get(block)

    def drop_hash(self, block: int) -> None:
        """Forget a block's content (before it is written again); a free cached block becomes plain free."""
        self._forget_hash(block)
        if block in self._cached:
            del self._cached[block]
            self._recycled.append(block)

    def _forget_hash(self, block: int) -> Hashable | None:
        content = self._hash_of.pop(block, None)
        if content is not None:
            del self._block_of[content]
        return content

    def _check(self, block: int) -> None:
        if not 0 <= block < self._high_water:
            raise EngineError(f"KV block {block} was never allocated from this pool.")

    def check_consistent(self) -> None:
        """Every block counted exactly once: in use, recycled, cached or never used (tests, debugging)."""
        recycled, cached = set(self._recycled), set(self._cached)
        assert len(recycled) == len(self._recycled), "a block is on the free list twice"
        assert not recycled & cached, "a block is both recycled and cached"
        for block in range(self.total):
            free = block in recycled or block in cached or block >= self._high_water
            assert free == (self._refs[block] == 0), f"block {block}: refcount {self._refs[block]}, free={free}"
        assert all(block in self._hash_of for block in cached)
        assert all(self._block_of[h] == b for b, h in self._hash_of.items())


class BlockTable:
    """One sequence's blocks, in position order, and how many positions are filled."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.blocks: list[int] = []
        self.length = 0  # positions written

    @property
    def capacity(self) -> int:
        """Positions the blocks held now can take."""
        return len(self.blocks) * self.pool.block_size

    def blocks_needed(self, positions: int) -> int:
        """Blocks to allocate so that the table holds ``positions`` positions in all."""
        return max(0, self.pool.blocks_for(positions) - len(self.blocks))

    def reserve(self, positions: int) -> None:
        """Grow to hold ``positions`` positions (all of the new blocks or none: OutOfBlocksError)."""
        self.blocks.extend(self.pool.allocate_many(self.blocks_needed(positions)))

    def append_shared(self, blocks: list[int]) -> None:
        """Take references to already-filled blocks (a cached prefix) at the end of the table."""
        for block in blocks:
            self.pool.share(block)
        self.blocks.extend(blocks)

    def locate(self, position: int) -> tuple[int, int]:
        """(block, offset in the block) of a position."""
        return self.blocks[position // self.pool.block_size], position % self.pool.block_size

    def writable(self, index: int, copy: Callable[[int, int], None]) -> int:
        """The table's ``index``-th block, made private first when it is shared (copy-on-write):
        ``copy(source, destination)`` copies a block's contents. Its content hash, if any, is dropped: the
        block is about to change."""
        block = self.blocks[index]
        if self.pool.refcount(block) > 1:
            private = self.pool.allocate()
            copy(block, private)
            self.pool.release(block)
            self.blocks[index] = private
            return private
        self.pool.drop_hash(block)
        return block

    def truncate(self, positions: int) -> None:
        """Keep only the first ``positions`` positions (rolling back rejected tokens); whole blocks past
        them go back to the pool."""
        if positions > self.length:
            raise EngineError(f"cannot truncate a sequence of {self.length} positions to {positions}")
        keep = self.pool.blocks_for(positions)
        self.pool.release_all(self.blocks[keep:])
        del self.blocks[keep:]
        self.length = positions

    def release(self) -> None:
        """Give every block back (the sequence retired, was cancelled or preempted)."""
        self.pool.release_all(self.blocks)
        self.blocks = []
        self.length = 0
