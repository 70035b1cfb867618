"""Incremental detokenization and stop strings."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from tests.support.tiny_model import build_tokenizer
from textgen.engine.text import IncrementalDetokenizer, TextAssembler, held_back_length


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.mark.parametrize("text", ["The quick brown fox.", "naïve café — 日本語 😀 done", "a  b\n\nc"])
def test_streamed_deltas_add_up_to_the_full_decode(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    ids = tokenizer(text).input_ids
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas), "a partial UTF-8 character was emitted"


def test_multibyte_character_is_held_until_complete(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer("😀").input_ids
    assert len(ids) > 1  # byte-level BPE splits the emoji into byte tokens
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1]) == "😀"


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [("hello wor", ["world"], 3), ("hello", ["world"], 0), ("abc", ["c!", "bc!"], 2), ("x", [], 0)],
)
def test_held_back_length(text: str, stops: list[str], expected: int) -> None:
    assert held_back_length(text, stops) == expected


def test_assembler_stops_before_the_stop_string_and_never_streams_it(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer("The quick brown fox jumps over the lazy dog.").input_ids
    assembler = TextAssembler(tokenizer, ["fox"])
    streamed = ""
    for token in ids:
        streamed += assembler.push(token)
        if assembler.stopped:
            break
    streamed += assembler.finish()
    assert assembler.stopped
    assert assembler.text == "The quick brown "
    assert streamed == assembler.text


def test_assembler_releases_held_text_when_no_stop_matches(tokenizer: PreTrainedTokenizerFast) -> None:
    ids = tokenizer("The quick brown fo").input_ids
    assembler = TextAssembler(tokenizer, ["fox"])
    streamed = "".join(assembler.push(t) for t in ids)
    assert not streamed.endswith("fo")  # could still become "fox"
    streamed += assembler.finish()
    assert streamed == assembler.text == "The quick brown fo"
    assert not assembler.stopped
