"""The prefix index alone: chained block keys, tenant salt, users, LRU eviction (no model, no tensors)."""

from __future__ import annotations

import random

import pytest

from textgen.engine.prefix_index import BlockKey, PrefixIndex

BLOCK = 4


def cache_prompt(index: PrefixIndex, tenant: str | None, tokens: list[int], first_block: int) -> list[int]:
    """What a sequence does: publish each full block of its prompt (as if it had written them), then
    retire (release). Returns the block ids it used."""
    blocks = []
    for offset, key in enumerate(index.keys(tenant, tokens)):
        block = first_block + offset
        assert index.publish(key, block)
        blocks.append(block)
    index.release(blocks)
    return blocks


def test_keys_cover_full_blocks_only_and_chain() -> None:
    index = PrefixIndex(BLOCK)
    keys = index.keys("a", list(range(11)))
    assert [k.tokens for k in keys] == [(0, 1, 2, 3), (4, 5, 6, 7)]  # the 3-token tail is not a block
    assert keys[1].parent == keys[0].digest
    assert keys[0].parent == index.root("a")
    # The same block after a different prefix has a different name.
    other = index.keys("a", [9, 9, 9, 9, 4, 5, 6, 7])
    assert other[1].tokens == keys[1].tokens and other[1].digest != keys[1].digest
    assert index.keys("a", list(range(11)), limit=7) == keys[:1]


def test_hit_miss_and_partial_prefix() -> None:
    index = PrefixIndex(BLOCK)
    prompt = list(range(100, 112))  # three full blocks
    used = cache_prompt(index, "a", prompt, first_block=10)
    # The same prompt: all three blocks.
    assert index.match(index.keys("a", prompt)) == used
    # Same first block, then different: only the first.
    diverging = [*prompt[:4], 0, *prompt[5:]]
    assert index.match(index.keys("a", diverging)) == used[:1]
    # A different first token: nothing, even though later blocks' tokens are equal.
    assert index.match(index.keys("a", [1, *prompt[1:]])) == []
    # A longer prompt with the cached prefix and a partial tail.
    assert index.match(index.keys("a", [*prompt, 1, 2])) == used
    stats = index.stats()
    assert (stats.queries, stats.hits) == (4, 3)
    assert stats.hit_tokens == 12 + 4 + 0 + 12


def test_tenants_never_match_each_others_blocks() -> None:
    index = PrefixIndex(BLOCK)
    rng = random.Random(7)
    prompts = [[rng.randrange(50) for _ in range(rng.randrange(4, 40))] for _ in range(200)]
    owner: dict[int, str] = {}
    next_block = 0
    for number, prompt in enumerate(prompts):
        tenant = ("a", "b", None)[number % 3]
        for block in index.match(index.keys(tenant, prompt)):
            assert owner[block] == str(tenant), "a request matched another tenant's block"
        for key in index.keys(tenant, prompt):
            if index.cached(key) is None and index.publish(key, next_block):
                owner[next_block] = str(tenant)
                index.release([next_block])
                next_block += 1
    assert next_block > 0
    # Identical prompts from two tenants: the second finds nothing of the first's.
    shared = list(range(16))
    cache_prompt(index, "a", shared, first_block=10_000)
    assert index.match(index.keys("b", shared)) == []
    assert index.match(index.keys("a", shared)) == [10_000, 10_001, 10_002, 10_003]


def test_tenant_names_cannot_be_chosen_to_collide() -> None:
    index = PrefixIndex(BLOCK)
    roots = {index.root(name) for name in ("", "a", "ab", "a\x00", "\x00a", "b")}
    assert len(roots) == 6
    assert index.root(None) == index.root("")


def test_shared_cache_matches_across_tenants() -> None:
    index = PrefixIndex(BLOCK, shared=True)
    prompt = list(range(8))
    used = cache_prompt(index, "a", prompt, first_block=0)
    assert index.match(index.keys("b", prompt)) == used


def test_a_colliding_digest_never_returns_other_content() -> None:
    index = PrefixIndex(BLOCK)
    real = index.keys("a", [1, 2, 3, 4])[0]
    assert index.publish(real, 5)
    forged = BlockKey(real.digest, real.parent, (9, 9, 9, 9))  # same name, other tokens
    assert index.match([forged]) == []
    assert index.cached(forged) is None


def test_users_keep_blocks_from_eviction_and_lru_order() -> None:
    index = PrefixIndex(BLOCK)
    first = cache_prompt(index, "a", list(range(8)), first_block=0)  # blocks 0, 1
    second = cache_prompt(index, "a", list(range(50, 58)), first_block=2)  # blocks 2, 3
    assert index.evictable == 4
    # A sequence reuses the first prompt: those blocks cannot be evicted while it runs.
    index.acquire(first)
    assert index.users(0) == 1
    assert sorted(index.evict(10)) == second
    assert index.evict(10) == []
    index.release(first)
    # The tail of a chain goes before its head.
    assert index.evict(1) == [1]
    assert index.match(index.keys("a", list(range(8)))) == [0]
    assert index.evict(1) == [0]
    assert index.stats().evicted_blocks == 4
    assert index.stats().cached_blocks == 0


def test_least_recently_used_goes_first() -> None:
    index = PrefixIndex(BLOCK)
    old = cache_prompt(index, "a", [1] * 4, first_block=0)
    new = cache_prompt(index, "a", [2] * 4, first_block=1)
    index.acquire(old)  # used again: now the most recent
    index.release(old)
    assert index.evict(1) == new


def test_publish_refuses_duplicates_and_release_checks_balance() -> None:
    index = PrefixIndex(BLOCK)
    key = index.keys("a", [1, 2, 3, 4])[0]
    assert index.publish(key, 0)
    assert not index.publish(key, 1)  # someone wrote the same prefix first: 1 stays private
    other = index.keys("a", [5, 6, 7, 8])[0]
    assert not index.publish(other, 0)  # block 0 already names content
    index.release([0])
    with pytest.raises(ValueError, match="released more often"):
        index.release([0])
    with pytest.raises(KeyError):
        index.acquire([99])


def test_random_use_never_leaks_or_evicts_a_used_block() -> None:
    index = PrefixIndex(BLOCK)
    rng = random.Random(3)
    free = list(range(64))
    running: list[list[int]] = []
    for _ in range(5_000):
        if running and rng.random() < 0.45:
            index.release(running.pop(rng.randrange(len(running))))
            continue
        prompt = [rng.randrange(4) for _ in range(rng.randrange(0, 20))]
        keys = index.keys(rng.choice(["a", "b"]), prompt)
        hit = index.match(keys)
        index.acquire(hit)
        blocks = list(hit)
        for key in keys[len(hit) :]:
            if not free:
                free.extend(index.evict(1))
            if not free:
                break
            block = free.pop()
            if index.publish(key, block):
                blocks.append(block)
            else:
                free.append(block)
                break
        in_use = {b for seq in running for b in seq} | set(blocks)
        assert not in_use & set(free)
        running.append(blocks)
    for blocks in running:
        index.release(blocks)
    stats = index.stats()
    assert stats.idle_blocks == stats.cached_blocks  # nobody uses anything now
    assert len(free) + stats.cached_blocks == 64
