"""Unit tests for the blocked-word content filter: evasions caught, innocent text passed, spans exact."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from textgen.content_filter import ContentFilter, FilterMatch
from textgen.errors import ConfigError


@pytest.fixture
def content_filter() -> ContentFilter:
    return ContentFilter(["hate", "idiot", "kill yourself"])


@pytest.mark.parametrize(
    "text",
    [
        "I hate you",
        "HATE",
        "Hate speech",
        "ＨＡＴＥ",  # fullwidth
        "h\u200bate",  # zero-width space
        "h\u200date",  # zero-width joiner
        "ha\u2060te",  # word joiner
        "h\u00adate",  # soft hyphen
        "\ufeffhate",  # byte-order mark
        "h\u0301ate",  # combining acute accent
        "hâté",  # precomposed accents
        "hаte",  # Cyrillic а
        "hatе",  # Cyrillic е
        "idiоt",  # Cyrillic о
        "НАТЕ",  # all-Cyrillic capitals
        "ΗΑΤΕ",  # all-Greek capitals
        "h a t e",
        "h.a.t.e",
        "h-a-t-e",
        "h_a_t_e",
        "h * a * t * e",
        "I h a t e you",
        "hates",
        "hated",
        "hating",
        "hater",
        "haters",
        "hateful",
        "h4te",
        "h@te",
        "H4T3",
        "id10t",
        "hate99",
        "#hate!!!",
        "you are an IDIOT.",
    ],
)
def test_evasions_are_caught(content_filter: ContentFilter, text: str) -> None:
    assert content_filter.is_blocked(text)


@pytest.mark.parametrize(
    "text",
    [
        "whatever",
        "Chateau",
        "Château Margaux",
        "hat",
        "hats",
        "that",
        "athlete",
        "thatch",
        "shatter",
        "chatelaine",
        "I love this",
        "Have a nice day 🙂🎉",
        "",
        "   ",
        "It is spelled c-h-a-t-e-a-u",
        "w h a t e v e r",
        "1337 404 4473",
        "kill the process",
        "be yourself",
        "нате",  # ordinary lower-case Russian word, not a disguised "hate"
        "idiom",
    ],
)
def test_innocent_text_passes(content_filter: ContentFilter, text: str) -> None:
    assert not content_filter.is_blocked(text)
    assert content_filter.find(text) == []


def test_find_reports_base_word_and_span_in_original_text(content_filter: ContentFilter) -> None:
    assert content_filter.find("I ＨＡＴＥ it") == [FilterMatch(word="hate", start=2, end=6)]
    assert content_filter.find("so h\u200bated") == [FilterMatch(word="hate", start=3, end=9)]


def test_find_returns_every_match_in_order(content_filter: ContentFilter) -> None:
    matches = content_filter.find("hate, idiot, h a t e")

    assert [(match.word, match.start, match.end) for match in matches] == [
        ("hate", 0, 4),
        ("idiot", 6, 11),
        ("hate", 13, 20),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I hate you", "I [redacted] you"),
        ("whatever hates that", "whatever [redacted] that"),
        ("Oh, ＨＡＴＥ!", "Oh, [redacted]!"),
        ("ok h\u200bate ok", "ok [redacted] ok"),
        ("x h\u0301ate\u0301 y", "x [redacted] y"),
        ("I h a t e you", "I [redacted] you"),
        ("me@hate.com", "me@[redacted].com"),
        ("nothing to see here", "nothing to see here"),
        ("", ""),
    ],
)
def test_redact_replaces_exactly_the_offending_span(content_filter: ContentFilter, text: str, expected: str) -> None:
    assert content_filter.redact(text) == expected


def test_redact_uses_the_given_replacement(content_filter: ContentFilter) -> None:
    assert content_filter.redact("hate and idiot", replacement="***") == "*** and ***"


@pytest.mark.parametrize(
    "text",
    [
        "just kill yourself",
        "KILL   YOURSELF",
        "kill-yourself",
        "killyourself",
        "killing yourself",
        "k1ll yourself",
    ],
)
def test_multi_word_entry_matches_as_a_sequence_of_words(content_filter: ContentFilter, text: str) -> None:
    assert [match.word for match in content_filter.find(text)] == ["kill yourself"]


def test_multi_word_entry_span_covers_the_whole_phrase(content_filter: ContentFilter) -> None:
    assert content_filter.redact("please kill  yourself now") == "please [redacted] now"


@pytest.mark.parametrize("text", ["kill", "yourself", "kill it yourself", "skill yourself"])
def test_multi_word_entry_needs_every_word_in_order(content_filter: ContentFilter, text: str) -> None:
    assert not content_filter.is_blocked(text)


def test_words_property_holds_normalized_entries() -> None:
    content_filter = ContentFilter(["ＨＡＴＥ", "Kill  Yourself", "idiot"])

    assert content_filter.words == frozenset({"hate", "kill yourself", "idiot"})
    assert isinstance(content_filter.words, frozenset)


def test_blank_words_are_ignored() -> None:
    content_filter = ContentFilter(["", "   ", "\u200b", "--", "hate"])

    assert content_filter.words == frozenset({"hate"})
    assert not content_filter.is_blocked("   ")


def test_empty_filter_blocks_nothing() -> None:
    content_filter = ContentFilter([])

    assert content_filter.words == frozenset()
    assert content_filter.find("hate") == []
    assert content_filter.redact("hate") == "hate"


def test_from_sources_unions_words_and_file(tmp_path: Path) -> None:
    words_file = tmp_path / "blocked.txt"
    words_file.write_text("# one entry per line\n\nidiot\n  troll  # inline note\nkill yourself\n", "utf-8")

    content_filter = ContentFilter.from_sources(["hate"], words_file)

    assert content_filter.words == frozenset({"hate", "idiot", "troll", "kill yourself"})
    assert content_filter.is_blocked("what a troll")


def test_from_sources_without_file_uses_words_only() -> None:
    assert ContentFilter.from_sources(["hate"], None).words == frozenset({"hate"})


def test_from_sources_missing_file_names_the_setting(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"

    with pytest.raises(ConfigError, match="TEXTGEN_BLOCKED_WORDS_FILE") as raised:
        ContentFilter.from_sources(["hate"], missing)

    assert str(missing) in str(raised.value)


def test_from_sources_unreadable_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="TEXTGEN_BLOCKED_WORDS_FILE"):
        ContentFilter.from_sources([], tmp_path)  # a directory cannot be read as a file


def test_from_sources_non_utf8_file_names_the_setting(tmp_path: Path) -> None:
    words_file = tmp_path / "latin1.txt"
    words_file.write_bytes("château\n".encode("latin-1"))

    with pytest.raises(ConfigError, match="TEXTGEN_BLOCKED_WORDS_FILE"):
        ContentFilter.from_sources([], words_file)


def test_filter_match_is_immutable() -> None:
    match = FilterMatch(word="hate", start=0, end=4)

    with pytest.raises(AttributeError):
        match.start = 1  # type: ignore[misc]


def test_find_scales_linearly_on_long_text(content_filter: ContentFilter) -> None:
    text = "whatever you say, I love this chateau; a b c 1337 h4t3. " * 4000  # ~220k characters

    started = time.perf_counter()
    matches = content_filter.find(text)
    elapsed = time.perf_counter() - started

    assert len(matches) == 4000
    assert elapsed < 5.0  # about 0.2 s in practice; generous so slow CI machines do not flake


def test_a_stemmed_word_is_one_match_however_long_it_gets() -> None:
    # Kept on purpose for absurd words too: a word that begins with a stem is blocked to its end, so the
    # stream can redact it as soon as it is longer than any other detector reads, and drop the rest.
    content_filter = ContentFilter(["violen*", "hate"])
    word = "violen" + "t" * 5000
    text = f"so {word}4hate {word}hate ok"
    second = len(f"so {word}4hate ")
    assert content_filter.find(text) == [
        FilterMatch("violen*", 3, 3 + len(word)),
        FilterMatch("hate", 4 + len(word), 8 + len(word)),
        FilterMatch("violen*", second, second + len(word) + 4),
    ]
