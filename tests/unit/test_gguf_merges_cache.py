"""A SentencePiece GGUF lists no merges: they are derived from its vocabulary once (seconds of Python for
Gemma's 262k tokens) and kept beside the file's other caches; a later start reads them back, and the
tokenizer it builds is the derived one. Kept merges that are damaged or belong to another vocabulary are
ignored (logged) and derived again."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import transformers.integrations.gguf.gguf_tokenizer_mapping as mapping
from gguf import GGUFWriter

from textgen.gguf_file import GGUFFile, read_gguf
from textgen.gguf_model import MERGES_FILE, build_tokenizer

PIECES = ["<unk>", "<s>", "</s>", "\u2581", "a", "b", "c", "ab", "bc", "abc", "\u2581a", "\u2581ab", "\u2581abc", "cab"]
TEXTS = ["abc cab", "ab bc abc", "cabbage a b c", " abcabc"]


def sentencepiece_file(tmp_path: Path, pieces: list[str] = PIECES) -> GGUFFile:
    path = tmp_path / f"sp-{len(pieces)}.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([-float(index) for index in range(len(pieces))])
    writer.add_token_types([2, 3, 3] + [1] * (len(pieces) - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return read_gguf(path)


def forbid_deriving(monkeypatch: pytest.MonkeyPatch) -> None:
    def derive(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("merges were derived again")

    monkeypatch.setattr(mapping, "generate_merges", derive)


def test_merges_derived_once_are_read_back_and_tokenize_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = sentencepiece_file(tmp_path)
    cache = tmp_path / "cache" / MERGES_FILE
    derived = build_tokenizer(file, "llama", cache)
    kept = json.loads(cache.read_text(encoding="utf-8"))
    assert kept["vocabulary"] == len(PIECES) and "\u2581a bc" in kept["merges"]
    forbid_deriving(monkeypatch)
    again = build_tokenizer(file, "llama", cache)
    assert list(again._merges) == list(derived._merges)
    for text in TEXTS:
        assert again.encode(text) == derived.encode(text), text
    assert again.tokenize("abc") == ["\u2581abc"]


@pytest.mark.parametrize(
    "damage",
    [
        "not json",
        json.dumps({"format": 1, "vocabulary": 3, "merges": ["a b"]}),  # another vocabulary's
        json.dumps({"format": 1, "vocabulary": len(PIECES), "merges": ["a b c"]}),  # not "left right"
        json.dumps({"format": 99, "vocabulary": len(PIECES), "merges": []}),
        json.dumps(["a b"]),
    ],
)
def test_damaged_or_foreign_kept_merges_are_ignored_and_rewritten(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    file = sentencepiece_file(tmp_path)
    reference = build_tokenizer(file, "llama")
    cache = tmp_path / MERGES_FILE
    cache.write_text(damage, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="textgen.gguf_model"):
        rebuilt = build_tokenizer(file, "llama", cache)
    assert "Ignoring the tokenizer merges kept in" in caplog.text
    for text in TEXTS:
        assert rebuilt.encode(text) == reference.encode(text), text
    assert json.loads(cache.read_text(encoding="utf-8"))["vocabulary"] == len(PIECES)


def test_no_cache_folder_or_an_unwritable_one_still_builds(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    file = sentencepiece_file(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="textgen.gguf_model"):
        tokenizer = build_tokenizer(file, "llama", blocker / MERGES_FILE)  # its folder is a file
    assert "Cannot keep the tokenizer merges" in caplog.text
    assert tokenizer.tokenize("abc") == ["\u2581abc"]
