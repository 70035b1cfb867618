"""The prefix index: which cached KV blocks hold which prompt prefixes (pure bookkeeping, no tensors).

A prompt is cut into full blocks of ``block_size`` tokens (a partial tail block is never cached). Each
block is named by a chained hash: the hash of its parent block's hash and its own token ids, so one
name stands for the whole prefix up to the end of that block, and two prompts share a block exactly when
they share everything before it. The chain starts from a root that is salted per tenant by default: a
tenant's prompt can never name another tenant's block, so cache hits (which answer measurably faster)
cannot leak what another tenant sent. ``shared=True`` (a single-tenant deployment) drops the salt.

Hashes are BLAKE2b (128 bits), not Python's ``hash``: a caller who can predict a collision could
otherwise be served someone else's keys and values. Each entry also keeps its parent and its tokens and
a lookup compares them, so even a collision could only miss, never match the wrong content.

Blocks are counted by users (the sequences reading them). A block nobody uses stays cached, in least
recently used order, until the cache needs its memory (``evict``). Block ids belong to the allocator
that holds the tensors; this index only names them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

HASH_BYTES = 16
ROOT_DOMAIN = b"textgen-prefix-cache-v1"
SHARED_TENANT = ""  # the salt every request uses when the cache is shared across tenants


@dataclass(frozen=True)
class BlockKey:
    """One full block of a prompt: its chained hash, its parent's, and its tokens."""

    digest: bytes
    parent: bytes
    tokens: tuple[int, ...]


@dataclass
class _Entry:
    block: int
    key: BlockKey
    users: int = 0


@dataclass
class PrefixIndexStats:
    """Counters since start: lookups and the prompt tokens they covered, the tokens found cached."""

    queries: int = 0
    query_tokens: int = 0
    hit_tokens: int = 0
    hits: int = 0  # lookups that found at least one cached block
    evicted_blocks: int = 0
    cached_blocks: int = 0
    idle_blocks: int = 0  # cached, used by no sequence: evictable

    @property
    def hit_rate(self) -> float:
        """Share of looked-up prompt tokens that were found cached (0 before any lookup)."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


@dataclass
class PrefixIndex:
    block_size: int
    shared: bool = False  # True: one cache for every tenant (single-tenant deployments)
    _by_digest: dict[bytes, _Entry] = field(default_factory=dict)
    _by_block: dict[int, _Entry] = field(default_factory=dict)
    _idle: OrderedDict[int, None] = field(default_factory=OrderedDict)  # unused cached blocks, oldest first
    _stats: PrefixIndexStats = field(default_factory=PrefixIndexStats)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1 (got {self.block_size})")

    # ----- naming ---------------------------------------------------------------------------------

    def root(self, tenant: str | None) -> bytes:
        """The chain's start for this tenant (the same for everyone when shared)."""
        salt = SHARED_TENANT if self.shared else (tenant or SHARED_TENANT)
        # Length-prefixed so no tenant name can be chosen to equal another's root.
        encoded = salt.encode("utf-8")
        return hashlib.blake2b(
            ROOT_DOMAIN + len(encoded).to_bytes(4, "little") + encoded, digest_size=HASH_BYTES
        ).digest()

    def keys(self, tenant: str | None, tokens: Sequence[int], *, limit: int | None = None) -> list[BlockKey]:
        """The chained keys of the full blocks among the first ``limit`` tokens (all tokens by default)."""
        usable = len(tokens) if limit is None else max(0, min(limit, len(tokens)))
        parent = self.root(tenant)
        found: list[BlockKey] = []
        for start in range(0, usable - self.block_size + 1, self.block_size):
            block = tuple(int(t) for t in tokens[start : start + self.block_size])
            digest = hashlib.blake2b(parent, digest_size=HASH_BYTES)
            digest.update(b"".join(t.to_bytes(4, "little", signed=True) for t in block))
            key = BlockKey(digest.digest(), parent, block)
            found.append(key)
            parent = key.digest
        return found

    # ----- lookup ---------------------------------------------------------------------------------

    def match(self, keys: Sequence[BlockKey], *, prompt_tokens: int | None = None) -> list[int]:
        """Block ids of the longest cached prefix of ``keys`` (in order), counted as one query over
        ``prompt_tokens`` (default: the keys' tokens). The caller then ``acquire``s what it uses."""
        blocks: list[int] = []
        for key in keys:
            entry = self._by_digest.get(key.digest)
            if entry is None or entry.key != key:  # absent, or a collision: never the wrong content
                break
            blocks.append(entry.block)
        stats = self._stats
        stats.queries += 1
        stats.query_tokens += len(keys) * self.block_size if prompt_tokens is None else prompt_tokens
        stats.hit_tokens += len(blocks) * self.block_size
        stats.hits += 1 if blocks else 0
        return blocks

    def cached(self, key: BlockKey) -> int | None:
        entry = self._by_digest.get(key.digest)
        return entry.block if entry is not None and entry.key == key else None

    # ----- users ----------------------------------------------------------------------------------

    def acquire(self, blocks: Sequence[int]) -> None:
        """One more user of each cached block (it leaves the evictable set)."""
        for block in blocks:
            entry = self._entry(block)
            entry.users += 1
            self._idle.pop(block, None)

    def release(self, blocks: Sequence[int]) -> None:
        """One user fewer; a block nobody uses becomes evictable, most recently used last. ``blocks`` in
        prefix order: the tail is queued first, so eviction takes a chain's tail before its head (a
        head without its tail is still a useful prefix; a tail without its head can never match)."""
        for block in reversed(blocks):
            entry = self._entry(block)
            if entry.users <= 0:
                raise ValueError(f"block {block} released more often than acquired")
            entry.users -= 1
            if entry.users == 0:
                self._idle[block] = None
                self._idle.move_to_end(block)

    def users(self, block: int) -> int:
        return self._entry(block).users

    # ----- adding and evicting ----------------------------------------------------------------------

    def publish(self, key: BlockKey, block: int) -> bool:
        """Record that ``block`` holds ``key``'s content, with one user (the sequence that wrote it).
        False when the key is already cached (another sequence wrote the same prefix first) or the block
        already names other content: the caller keeps its block private then."""
        if key.digest in self._by_digest or block in self._by_block:
            return False
        entry = _Entry(block, key, users=1)
        self._by_digest[key.digest] = entry
        self._by_block[block] = entry
        return True

    def is_cached(self, block: int) -> bool:
        return block in self._by_block

    @property
    def evictable(self) -> int:
        return len(self._idle)

    def evict(self, count: int) -> list[int]:
        """Forget up to ``count`` unused blocks, least recently used first; returns their ids (free now)."""
        freed: list[int] = []
        while self._idle and len(freed) < count:
            block, _ = self._idle.popitem(last=False)
            entry = self._by_block.pop(block)
            del self._by_digest[entry.key.digest]
            freed.append(block)
        self._stats.evicted_blocks += len(freed)
        return freed

    def discard(self, blocks: Sequence[int]) -> list[int]:
        """Forget these blocks now, used or not (their content could not be written); returns them."""
        for block in blocks:
            entry = self._by_block.pop(block)
            del self._by_digest[entry.key.digest]
            self._idle.pop(block, None)
        return list(blocks)

    def stats(self) -> PrefixIndexStats:
        current = self._stats
        return PrefixIndexStats(
            queries=current.queries,
            query_tokens=current.query_tokens,
            hit_tokens=current.hit_tokens,
            hits=current.hits,
            evicted_blocks=current.evicted_blocks,
            cached_blocks=len(self._by_block),
            idle_blocks=len(self._idle),
        )

    def _entry(self, block: int) -> _Entry:
        entry = self._by_block.get(block)
        if entry is None:
            raise KeyError(f"block {block} is not in the prefix index")
        return entry
