"""Prefix keys alone: chained block keys, the tenant salt, the counters (no model, no tensors)."""

from __future__ import annotations

import random

import pytest

from textgen.engine.prefix_index import BlockKey, PrefixIndex

BLOCK = 4


def test_keys_cover_full_blocks_only_and_chain() -> None:
    index = PrefixIndex(BLOCK)
    keys = index.keys("a", list(range(11)))
    assert [k.tokens for k in keys] == [(0, 1, 2, 3), (4, 5, 6, 7)]  # the 3-token tail is not a block
    assert keys[1].parent == keys[0].digest
    assert keys[0].parent == index.root("a")
    # The same block after a different prefix has a different name.
    other = index.keys("a", [9, 9, 9, 9, 4, 5, 6, 7])
    assert other[1].tokens == keys[1].tokens and other[1] != keys[1]
    assert index.keys("a", list(range(11)), limit=7) == keys[:1]
    assert index.keys("a", list(range(11))) == keys  # deterministic


def test_tenants_never_name_each_others_blocks() -> None:
    index = PrefixIndex(BLOCK)
    rng = random.Random(7)
    names: dict[BlockKey, str] = {}
    for number in range(300):
        tenant = ("a", "b", None, "a ")[number % 4]
        prompt = [rng.randrange(3) for _ in range(rng.randrange(4, 24))]  # tiny alphabet: many equal blocks
        for key in index.keys(tenant, prompt):
            assert names.setdefault(key, str(tenant)) == str(tenant), "two tenants' blocks share a name"
    assert len(set(names.values())) == 4


def test_tenant_names_cannot_be_chosen_to_collide() -> None:
    index = PrefixIndex(BLOCK)
    roots = {index.root(name) for name in ("", "a", "ab", "a\x00", "\x00a", "b")}
    assert len(roots) == 6
    assert index.root(None) == index.root("")


def test_a_shared_index_names_blocks_alike_for_every_tenant() -> None:
    index = PrefixIndex(BLOCK, shared=True)
    assert index.keys("a", list(range(8))) == index.keys("b", list(range(8)))


def test_a_colliding_digest_is_still_another_key() -> None:
    index = PrefixIndex(BLOCK)
    real = index.keys("a", [1, 2, 3, 4])[0]
    forged = BlockKey(real.digest, real.parent, (9, 9, 9, 9))  # same hash, other tokens
    assert forged != real
    assert {real: 1}.get(forged) is None


def test_counters_and_hit_rate() -> None:
    index = PrefixIndex(BLOCK)
    assert index.stats().hit_rate == 0.0
    index.count(100, 0)
    index.count(100, 80)
    stats = index.stats()
    assert (stats.queries, stats.hits, stats.query_tokens, stats.hit_tokens) == (2, 1, 200, 80)
    assert stats.hit_rate == pytest.approx(0.4)
    with pytest.raises(ValueError, match="block_size"):
        PrefixIndex(0)
