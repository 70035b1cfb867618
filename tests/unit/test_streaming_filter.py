"""The streaming filter shows exactly what the final whole-text check lets through: nothing the final
check would catch is ever sent first, however the text is split and however wide a word is spaced out.
Plus the default blocked words (the seed's "hate" and "violence", with their inflections) and stems."""

from __future__ import annotations

import random

import pytest

from textgen.config import DEFAULT_BLOCKED_WORDS
from textgen.content_filter import ContentFilter, StreamingFilter
from textgen.errors import ConfigError, ContentRejectedError

DEFAULT = ContentFilter(DEFAULT_BLOCKED_WORDS)


def stream(
    content_filter: ContentFilter, action: str, chunks: list[str], *, stop_at_match: bool = False
) -> tuple[str, bool]:
    """What a client receives from ``chunks``, and whether the stream was rejected."""
    streaming = StreamingFilter(content_filter, action, stop_at_match=stop_at_match)
    sent = ""
    try:
        for chunk in chunks:
            sent += streaming.push(chunk)
        sent += streaming.finish()
    except ContentRejectedError:
        return sent, True
    return sent, False


def random_chunks(text: str, rng: random.Random) -> list[str]:
    if len(text) < 2:
        return [text]
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


@pytest.mark.parametrize("gap", [1, 5, 10, 40, 200])
@pytest.mark.parametrize("word", ["hate", "violent", "hatred"])
def test_a_spaced_out_word_is_never_sent_however_wide(word: str, gap: int) -> None:
    spaced = (" " * gap).join(word)
    text = f"I think {spaced} is a strong word."
    # One character at a time: the worst case for a hold-back window.
    redacted, rejected = stream(DEFAULT, "redact", list(text))
    assert not rejected and redacted == DEFAULT.redact(text) == "I think [redacted] is a strong word."
    sent, rejected = stream(DEFAULT, "reject", list(text))
    assert rejected and sent == "I think "


def test_stream_output_equals_the_final_check_for_any_split() -> None:
    content_filter = ContentFilter([*DEFAULT_BLOCKED_WORDS, "kill yourself"])
    pieces = [
        "hate", "h", "a", "t", "e", "d", " ", "   ", " " * 50, ".", "-", "violent", "ly", "hatred", "what",
        "ever", "I", "u", "kill", "yourself", "@", "4", "chateau", "violet", "x", "\n", "the", "hat", "ful",
        # issue 20's evasions: encodings, overrides, joined, stretched, leet
        "%68", "%", "6", "&#104;", "&", "#", ";", "\u202e", "\u202c", "ha", "te", "aaa", "8", "!", "ʜᴀᴛᴇ", "_",
    ]  # fmt: skip
    rng = random.Random(11)
    for _ in range(1500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 30)))
        chunks = random_chunks(text, rng)
        redacted, rejected = stream(content_filter, "redact", chunks)
        assert not rejected and redacted == content_filter.redact(text), (text, chunks)
        sent, rejected = stream(content_filter, "reject", chunks)
        assert rejected == bool(content_filter.find(text)), (text, chunks)
        if rejected:
            assert text.startswith(sent) and not content_filter.find(sent), (text, chunks, sent)
        # A structured row: what precedes the first match, exactly what the final check cuts to.
        stopped, rejected = stream(content_filter, "redact", chunks, stop_at_match=True)
        matches = content_filter.find(text)
        assert not rejected and stopped == text[: min((m.start for m in matches), default=len(text))], (text, chunks)


def test_a_long_stemmed_word_is_held_whole() -> None:
    text = "so " + "violen" + "t" * 60 + " ok"
    sent, rejected = stream(DEFAULT, "reject", list(text))
    assert rejected and sent == "so "
    leet, rejected = stream(DEFAULT, "reject", list("so h@tred" + "s" * 40))
    assert rejected and leet == "so "


@pytest.mark.parametrize(
    "text",
    [
        "Violence is never the answer.",
        "violence", "VIOLENT", "violently", "violences", "hate", "hates", "hated", "hating", "hater",
        "haters", "hateful", "hatefully", "hatred", "hatreds", "H A T R E D", "v.i.o.l.e.n.t", "h4tred",
    ],
)  # fmt: skip
def test_the_default_list_blocks_the_seeds_words_and_their_inflections(text: str) -> None:
    assert DEFAULT.find(text), text


@pytest.mark.parametrize(
    "text",
    [
        "whatever", "chateau", "theater", "hatch", "hatchet", "Manhattan", "phosphate", "violet", "violets",
        "violin", "violinist", "viola", "violation", "nonviolent", "nonviolence", "that", "hat", "hath", "Hatem",
        "shatter", "what a theater", "ultraviolet", "the violinist played a violet violin",
    ],
)  # fmt: skip
def test_the_default_list_leaves_innocent_words_alone(text: str) -> None:
    assert DEFAULT.find(text) == [], text


def test_a_stem_matches_word_starts_only() -> None:
    content_filter = ContentFilter(["grue*"])
    assert [m.word for m in content_filter.find("A Gruesome, gruelling day")] == ["grue*", "grue*"]
    assert content_filter.find("congruent") == []
    assert content_filter.redact("gruesome things") == "[redacted] things"
    assert "grue*" in content_filter.words


@pytest.mark.parametrize("entry", ["ab*", "two words*", "*", "12*"])
def test_a_bad_stem_is_a_config_error(entry: str) -> None:
    with pytest.raises(ConfigError, match="stem"):
        ContentFilter([entry])


def test_a_structured_stream_stops_at_the_first_match_and_sends_nothing_after_it() -> None:
    streaming = StreamingFilter(DEFAULT, "redact", stop_at_match=True)
    pieces = ['{"note": "I h', "ate r", 'ain", "x": "fine text here and more"}']
    sent = "".join(streaming.push(piece) for piece in pieces)
    assert sent + streaming.finish() == '{"note": "I '
    assert streaming.stopped and streaming.first_match_start == len('{"note": "I ')
    assert streaming.push(" still more text after the match") == "" and streaming.finish() == ""
    sent, rejected = stream(DEFAULT, "reject", ['{"a": "I hate rain"}'], stop_at_match=True)
    assert rejected and sent == ""  # reject keeps its meaning for structured rows
