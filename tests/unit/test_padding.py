"""The PaddedRows object: prefill, decode, filter and concat keep every row's tokens exact."""

from __future__ import annotations

from typing import Any

import torch

from textgen.engine.padding import PaddedRows, decode_step, left_pad_prompts, positions_from_mask, prefill

PROMPTS = ["The future of AI is", "Once upon a time there was a robot who", "Hi"]


def _ids(loaded: Any) -> list[list[int]]:
    return [loaded.tokenizer(p).input_ids for p in PROMPTS]


def _greedy(loaded: Any, batch: PaddedRows[int], logits: torch.Tensor, out: dict[int, list[int]]) -> None:
    tokens = logits.argmax(-1)
    batch.last_tokens = tokens
    for row, token in zip(batch.rows, tokens.tolist(), strict=True):
        out[row].append(token)


def _run_alone(loaded: Any, index: int, steps: int) -> list[int]:
    out: dict[int, list[int]] = {index: []}
    batch, logits = prefill(loaded.model, [_ids(loaded)[index]], [index], loaded.tokenizer.pad_token_id)
    _greedy(loaded, batch, logits, out)
    for _ in range(steps - 1):
        _greedy(loaded, batch, decode_step(loaded.model, batch), out)
    return out[index]


def test_left_padding_and_positions() -> None:
    ids, mask = left_pad_prompts([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert positions_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_batched_greedy_equals_alone(tiny_loaded: Any) -> None:
    alone = {i: _run_alone(tiny_loaded, i, 10) for i in range(3)}
    out: dict[int, list[int]] = {i: [] for i in range(3)}
    batch, logits = prefill(tiny_loaded.model, _ids(tiny_loaded), [0, 1, 2], tiny_loaded.tokenizer.pad_token_id)
    _greedy(tiny_loaded, batch, logits, out)
    for _ in range(9):
        _greedy(tiny_loaded, batch, decode_step(tiny_loaded.model, batch), out)
    assert out == alone


def test_concat_mid_flight_and_filter_keep_tokens_exact(tiny_loaded: Any) -> None:
    alone = {i: _run_alone(tiny_loaded, i, 12) for i in range(3)}
    pad = tiny_loaded.tokenizer.pad_token_id
    out: dict[int, list[int]] = {i: [] for i in range(3)}
    running, logits = prefill(tiny_loaded.model, [_ids(tiny_loaded)[0]], [0], pad)
    _greedy(tiny_loaded, running, logits, out)
    for _ in range(4):
        _greedy(tiny_loaded, running, decode_step(tiny_loaded.model, running), out)
    joining, logits = prefill(tiny_loaded.model, _ids(tiny_loaded)[1:], [1, 2], pad)
    _greedy(tiny_loaded, joining, logits, out)
    running = running.concat(joining)
    assert running.rows == [0, 1, 2]
    assert running.attention_mask.shape[0] == 3
    for step in range(11):
        _greedy(tiny_loaded, running, decode_step(tiny_loaded.model, running), out)
        if step == 5:
            running = running.filter([1, 2])
            assert running.rows == [1, 2]
            assert bool(running.attention_mask[:, 0].any())  # no all-padding column left
    for row in range(3):
        assert out[row] == alone[row][: len(out[row])]
    assert len(out[1]) == 12


def test_filter_to_nothing_leaves_an_empty_batch(tiny_loaded: Any) -> None:
    batch, _ = prefill(tiny_loaded.model, _ids(tiny_loaded), [0, 1, 2], tiny_loaded.tokenizer.pad_token_id)
    batch.filter([])
    assert batch.size == 0
    assert batch.cache.layers[0].keys.shape[0] == 0


def test_filter_trims_padding_no_remaining_row_needs(tiny_loaded: Any) -> None:
    ids = _ids(tiny_loaded)
    batch, _ = prefill(tiny_loaded.model, ids, [0, 1, 2], tiny_loaded.tokenizer.pad_token_id)
    assert batch.cached_length == max(len(i) for i in ids)
    batch.filter([2])
    assert batch.cached_length == len(ids[2])
    assert batch.cache.layers[0].keys.shape[2] == len(ids[2])
