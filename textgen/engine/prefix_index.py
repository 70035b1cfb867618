"""Naming cached prompt blocks: chained content keys, salted per tenant, and the prefix cache's counters.

A prompt is cut into full blocks of ``block_size`` tokens (a partial tail block is never cached). Each
block is named by a chained key: the hash of its parent block's hash and its own token ids, so one
name stands for the whole prefix up to the end of that block, and two prompts share a block exactly when
they share everything before it. The chain starts from a root that is salted per tenant by default: a
tenant's prompt can never name another tenant's block, so cache hits (which answer measurably faster)
cannot leak what another tenant sent. ``shared=True`` (a single-tenant deployment) drops the salt.

Hashes are BLAKE2b (128 bits), not Python's ``hash``: a caller who can predict a collision could
otherwise be served someone else's keys and values. A key also carries its parent and its tokens and
keys compare on all three, so even a collision could only miss, never match the wrong content.

Which block holds a key, who uses it and which unused block goes first (least recently used) is the KV
block pool's business (``core/blocks.py``); the keys are the content names it stores.
"""

from __future__ import annotations

import dataclasses
import hashlib
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
class PrefixIndexStats:
    """Counters since start: lookups and the prompt tokens they covered, the tokens found cached."""

    queries: int = 0
    query_tokens: int = 0
    hit_tokens: int = 0
    hits: int = 0  # lookups that found at least one cached block

    @property
    def hit_rate(self) -> float:
        """Share of looked-up prompt tokens that were found cached (0 before any lookup)."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


@dataclass
class PrefixIndex:
    block_size: int
    shared: bool = False  # True: one cache for every tenant (single-tenant deployments)
    _stats: PrefixIndexStats = field(default_factory=PrefixIndexStats)

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1 (got {self.block_size})")

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

    def count(self, prompt_tokens: int, hit_tokens: int) -> None:
        """One lookup over a prompt of ``prompt_tokens`` that found ``hit_tokens`` cached."""
        stats = self._stats
        stats.queries += 1
        stats.query_tokens += prompt_tokens
        stats.hit_tokens += hit_tokens
        stats.hits += 1 if hit_tokens else 0

    def uncount(self, prompt_tokens: int, hit_tokens: int) -> None:
        """Take back a lookup whose result was given up unused (it is looked up again later)."""
        stats = self._stats
        stats.queries -= 1
        stats.query_tokens -= prompt_tokens
        stats.hit_tokens -= hit_tokens
        stats.hits -= 1 if hit_tokens else 0

    def stats(self) -> PrefixIndexStats:
        return dataclasses.replace(self._stats)
