"""The KV block allocator (textgen/engine/core/blocks.py): pure bookkeeping, no model."""

from __future__ import annotations

import random

import pytest

from textgen.engine.core.blocks import BlockPool, BlockTable, OutOfBlocksError
from textgen.errors import EngineError


def test_allocate_hands_out_every_block_once_then_refuses() -> None:
    pool = BlockPool(4, 16)
    blocks = [pool.allocate() for _ in range(4)]
    assert sorted(blocks) == [0, 1, 2, 3]
    assert pool.free == 0 and pool.used == 4
    with pytest.raises(OutOfBlocksError):
        pool.allocate()
    pool.check_consistent()


def test_allocate_many_is_all_or_nothing() -> None:
    pool = BlockPool(3, 8)
    pool.allocate()
    with pytest.raises(OutOfBlocksError):
        pool.allocate_many(3)
    assert pool.free == 2  # nothing was taken by the refused call
    pool.check_consistent()


def test_freed_blocks_are_reused_before_untouched_ones() -> None:
    pool = BlockPool(8, 4)
    first = pool.allocate_many(3)
    pool.release(first[1])
    assert pool.allocate() == first[1]  # touched memory first
    assert pool.high_water == 3
    assert pool.allocate() == 3  # then the next never-used block


def test_share_and_release_by_refcount() -> None:
    pool = BlockPool(2, 4)
    block = pool.allocate()
    pool.share(block)
    assert pool.refcount(block) == 2
    pool.release(block)
    assert pool.refcount(block) == 1 and pool.free == 1
    pool.release(block)
    assert pool.free == 2
    with pytest.raises(EngineError):
        pool.release(block)  # a double free is refused, not silently counted
    with pytest.raises(EngineError):
        pool.share(block)  # free and holding no cached content
    pool.check_consistent()


def test_unknown_block_ids_are_refused() -> None:
    pool = BlockPool(2, 4)
    with pytest.raises(EngineError):
        pool.release(0)  # never allocated
    with pytest.raises(EngineError):
        pool.share(7)


def test_table_reserve_and_locate() -> None:
    pool = BlockPool(10, 4)
    table = BlockTable(pool)
    table.reserve(9)  # 3 blocks of 4
    assert len(table.blocks) == 3 and table.capacity == 12
    assert table.blocks_needed(12) == 0 and table.blocks_needed(13) == 1
    assert table.locate(0) == (table.blocks[0], 0)
    assert table.locate(5) == (table.blocks[1], 1)
    assert table.locate(11) == (table.blocks[2], 3)
    table.release()
    assert pool.free == 10 and table.blocks == []


def test_copy_on_write_gives_a_shared_block_a_private_copy() -> None:
    pool = BlockPool(4, 4)
    owner, borrower = BlockTable(pool), BlockTable(pool)
    owner.reserve(4)
    borrower.append_shared(owner.blocks)
    shared = owner.blocks[0]
    assert pool.refcount(shared) == 2
    copies: list[tuple[int, int]] = []
    private = borrower.writable(0, lambda src, dst: copies.append((src, dst)))
    assert private != shared and copies == [(shared, private)]
    assert pool.refcount(shared) == 1 and pool.refcount(private) == 1
    assert owner.writable(0, lambda src, dst: copies.append((src, dst))) == shared  # sole owner: no copy
    assert len(copies) == 1
    owner.release()
    borrower.release()
    assert pool.free == 4
    pool.check_consistent()


def test_cached_blocks_survive_release_and_are_evicted_least_recent_first() -> None:
    evicted: list[tuple[int, object]] = []
    pool = BlockPool(3, 4, on_evict=lambda block, content: evicted.append((block, content)))
    a, b, c = pool.allocate_many(3)
    pool.set_hash(a, "ha")
    pool.set_hash(b, "hb")
    pool.release(a)
    pool.release(b)
    assert pool.free == 2 and pool.cached_free == 2 and pool.cached("ha") == a
    pool.share(b)  # a new request reuses b's content: out of the eviction order
    assert pool.cached_free == 1
    new = pool.allocate()  # nothing recycled or untouched: evict the least recently released (a)
    assert new == a and evicted == [(a, "ha")] and pool.cached("ha") is None
    assert pool.cached("hb") == b
    pool.release_all([b, c, new])
    pool.check_consistent()


def test_writing_into_a_hashed_block_forgets_its_hash() -> None:
    pool = BlockPool(2, 4)
    table = BlockTable(pool)
    table.reserve(4)
    pool.set_hash(table.blocks[0], "h")
    table.writable(0, lambda src, dst: None)
    assert pool.cached("h") is None


def test_truncate_returns_whole_blocks_past_the_kept_positions() -> None:
    pool = BlockPool(5, 4)
    table = BlockTable(pool)
    table.reserve(13)
    table.length = 13
    table.truncate(5)
    assert len(table.blocks) == 2 and table.length == 5 and pool.free == 3
    with pytest.raises(EngineError):
        table.truncate(6)


def test_preempt_and_resume_reallocates_the_sequence() -> None:
    pool = BlockPool(4, 4)
    background, interactive = BlockTable(pool), BlockTable(pool)
    background.reserve(12)
    background.length = 12
    interactive.reserve(4)
    with pytest.raises(OutOfBlocksError):
        interactive.reserve(8)
    recompute = background.length
    background.release()  # preempted: blocks back to the pool, its tokens recomputed later
    interactive.reserve(8)
    assert pool.free == 2
    interactive.release()
    background.reserve(recompute + 1)  # resumed: prompt and generated text prefilled again
    assert len(background.blocks) == 4
    background.release()
    assert pool.free == 4
    pool.check_consistent()


def test_no_leak_after_ten_thousand_random_admit_retire_cancel() -> None:
    rng = random.Random(1234)
    pool = BlockPool(64, 16)
    running: list[BlockTable] = []
    hashes = 0
    for _ in range(10_000):
        action = rng.random()
        if action < 0.45 or not running:  # admit: a prompt, sometimes starting from a cached prefix
            table = BlockTable(pool)
            cached = [b for b in (pool.cached(f"h{rng.randrange(max(hashes, 1))}") for _ in range(2)) if b is not None]
            try:
                table.append_shared(list(dict.fromkeys(cached)))
                table.reserve(table.capacity + rng.randint(1, 70))
            except OutOfBlocksError:
                table.release()
                continue
            table.length = table.capacity - rng.randrange(pool.block_size)
            if rng.random() < 0.5:
                pool.set_hash(table.blocks[0], f"h{hashes}")
                hashes += 1
            running.append(table)
        elif action < 0.75:  # grow a running sequence (decode), copying a shared block it writes into
            table = rng.choice(running)
            try:
                table.reserve(table.length + rng.randint(1, 20))
                table.writable(len(table.blocks) - 1, lambda src, dst: None)
            except OutOfBlocksError:
                pass
        else:  # retire or cancel: the same for the pool
            running.pop(rng.randrange(len(running))).release()
        if rng.random() < 0.01:
            pool.check_consistent()
    for table in running:
        table.release()
    pool.check_consistent()
    assert pool.used == 0 and pool.free == pool.total
