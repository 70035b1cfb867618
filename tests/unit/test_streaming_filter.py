"""The streaming filter shows exactly what the final whole-text check lets through: nothing the final
check would catch is ever sent first, however the text is split and however wide a word is spaced out.
Plus the default blocked words (the seed's "hate" and "violence", with their inflections) and stems."""

from __future__ import annotations

import contextlib
import random

import hypothesis
import pytest
from hypothesis import strategies as st

from textgen import content_filter
from textgen.config import DEFAULT_BLOCKED_WORDS
from textgen.content_filter import REDACTION, ContentFilter, FilterMatch, StreamingFilter
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


# -- the attack: every disguise the whole-text check knows, split into token-sized deltas -----------------

FUZZ_FILTER = ContentFilter([*DEFAULT_BLOCKED_WORDS, "kill yourself", "go away"])
# Every whitespace the check may meet (str.isspace; each normalizes to whitespace), characters that vanish
# when normalized, and ones that are not whitespace but normalize to a space and a mark ("¨", "˜").
UNICODE_SPACES = [chr(code) for code in range(0x3001) if chr(code).isspace()]
INVISIBLE = ["\u200b", "\u200d", "\u00ad", "\ufeff", "\u0301", "\u2060", "\u180e", "\u00a8", "\u02dc"]
ENGLISH = ["the", "sea", "is", "a", "I", "u", "what", "ever", "chateau", "violet", "hat", "kill", "your", "go",
           "away", "you", "it", "that", "Rule", "1", "42", "ok", "Tom", "AT&T", "100%"]  # fmt: skip
BLOCKED = ["hate", "hated", "hating", "haters", "hateful", "hatred", "violence", "violently", "kill yourself",
           "go away", "k1ll yourself", "kill  \n yourself", "kill...yourself"]  # fmt: skip
PUNCTUATION = list(".,;:!?-_'\"()[]/|@$+&%#*")
LEET = str.maketrans({"a": "4", "e": "3", "i": "1", "o": "0", "s": "$", "t": "7", "l": "|"})


def _encoded(word: str, rng: random.Random) -> str:
    forms = [lambda c: f"%{ord(c):02x}", lambda c: f"&#{ord(c)};", lambda c: f"&#x{ord(c):x};", lambda c: c,
             lambda c: f"&amp;#{ord(c)};", lambda c: f"%26%23{ord(c)};"]  # fmt: skip
    return "".join(rng.choice(forms)(char) if char.isascii() and char != " " else char for char in word)


def _disguised(word: str, rng: random.Random) -> str:
    """One of the whole-text check's disguises of ``word`` (or several of them stacked)."""
    disguises = [
        lambda w: w,
        lambda w: w.upper(),
        lambda w: w.translate(LEET),
        lambda w: rng.choice([" ", ".", " . ", "  \n ", "_", "\u3000"]).join(w),  # spaced out
        lambda w: w[: len(w) // 2] + rng.choice("-_.'") + w[len(w) // 2 :],  # joined
        lambda w: "".join(c * rng.choice([1, 1, 3]) for c in w),  # stretched
        lambda w: "".join(c * 2 for c in w),
        lambda w: rng.choice(["i", "u", "you", "them", w]) + w + rng.choice(["you", "", "them"]),  # glued
        lambda w: rng.choice(INVISIBLE).join(w),
        lambda w: "".join(chr(ord(c) + 0xFEE0) if "a" <= c <= "z" else c for c in w),  # fullwidth
        lambda w: w.replace("a", "а").replace("e", "е"),  # Cyrillic look-alikes
        lambda w: _encoded(w, rng),
        lambda w: "\u202e" + w[::-1] + rng.choice(["\u202c", "\n", "", " \u202c"]),  # right-to-left override
        lambda w: w.replace("ate", "8"),
        # a phrase's words apart: leetspeak symbols are separators as written, letters when read as leet
        lambda w: w.replace(" ", rng.choice([" | ", " ! ", " + + ", " @ ", " $ ", "...", " \n  ", "_", " € "])),
    ]
    for _ in range(rng.choice([1, 1, 1, 2])):
        word = rng.choice(disguises)(word)
    return word


def _fuzz_text(rng: random.Random) -> str:
    pieces: list[str] = []
    for _ in range(rng.randint(1, 14)):
        kind = rng.random()
        if kind < 0.3:
            pieces.append(_disguised(rng.choice(BLOCKED), rng))
        elif kind < 0.65:
            pieces.append(rng.choice(ENGLISH))
        elif kind < 0.8:
            pieces.append(rng.choice(PUNCTUATION) * rng.randint(1, 2))
        elif kind < 0.9:
            pieces.append(rng.choice([*UNICODE_SPACES, *INVISIBLE]))
        else:
            pieces.append(_encoded(rng.choice([*ENGLISH, "h", "a", "t", "e", " "]), rng))
        pieces.append(rng.choice([" ", " ", "", "\n", rng.choice(UNICODE_SPACES), " " * rng.randint(2, 40)]))
    return "".join(pieces)


def _token_deltas(text: str, rng: random.Random) -> list[str]:
    """``text`` cut into pieces of 1 to 6 characters, as a tokenizer's deltas are."""
    deltas, position = [], 0
    while position < len(text):
        size = rng.choice([1, 1, 2, 3, 4, 5, 6])
        deltas.append(text[position : position + size])
        position += size
    return deltas


def _expected_prefix(text: str, matches: list[FilterMatch], released: int) -> str:
    """The final redaction of ``text`` up to raw position ``released`` (which must not cut a match)."""
    pieces, cursor = [], 0
    for match in matches:
        if match.start >= released:
            break
        # Only a long stemmed word's match is sent (redacted) before it ends: it matches however it goes on.
        long_stemmed = match.word.endswith("*") and match.end - match.start >= DEFAULT.long_word
        assert match.end <= released or long_stemmed, f"released {released} cuts the match {match} of {text!r}"
        pieces += [text[cursor : match.start], REDACTION]
        cursor = match.end
    pieces.append(text[cursor:released])
    return "".join(pieces)


def check_stream_against_whole_text(content_filter: ContentFilter, text: str, deltas: list[str]) -> None:
    matches = content_filter.find(text)
    # redact: after every push, what was sent is the final redaction of the text decided so far, so no
    # character of a final match is ever sent; at the end it is the whole-text redaction.
    streaming, sent = StreamingFilter(content_filter, "redact"), ""
    for delta in deltas:
        sent += streaming.push(delta)
        assert sent == _expected_prefix(text, matches, streaming.released), (text, deltas, sent)
    sent += streaming.finish()
    assert sent == content_filter.redact(text), (text, deltas, sent)
    # reject: raised before any character of the first match is sent, and only for a text that matches.
    streaming, sent = StreamingFilter(content_filter, "reject"), ""
    with pytest.raises(ContentRejectedError) if matches else contextlib.nullcontext():
        for delta in deltas:
            sent += streaming.push(delta)
            assert not matches or len(sent) <= matches[0].start, (text, deltas, sent)
        sent += streaming.finish()
    assert text.startswith(sent) and (not matches or len(sent) <= matches[0].start), (text, deltas, sent)


@hypothesis.settings(max_examples=400, deadline=None, derandomize=True, database=None)
@hypothesis.given(st.randoms(use_true_random=False))
def test_any_disguise_split_anyhow_streams_exactly_the_whole_text_redaction(rng: random.Random) -> None:
    text = _fuzz_text(rng)
    check_stream_against_whole_text(FUZZ_FILTER, text, _token_deltas(text, rng))


@pytest.mark.parametrize(
    "text",
    [
        "h" + " " * 40 + "a" + " " * 40 + "%74 e",  # a spaced-out letter decoded from %74
        "h a &#8238;hello" + " world" * 10 + " e t",  # an encoded override: "e t" displays next to "h a"
        "h a %26%238238;hello" + " world" * 10 + " e t",  # the same override encoded twice over
        "ever \u202ef l e s r u o y l l i k" + " x" * 20 + "\ngo",  # a run ended by its override's end
        "h" + "\u200b" * 100 + "ate",  # invisible characters glue a word however many there are
        "Ⓗ" + " " * 40 + "Ⓐ" + " " * 40 + "Ⓣ Ⓔ",  # letters that are not letters until normalized
        "k!ll yourself",  # leetspeak symbols that are punctuation in the plain reading
        "kill" + " \n\u3000" * 30 + "yourself",  # a phrase's words however far apart
        "kill | yourself",  # "|" a separator as written, a word ("i") read as leetspeak
        "go $ $ away",
        "the violence\u00ad" + "ly ends",  # a soft hyphen inside a stemmed word
    ],
)
def test_disguises_the_fixed_width_hold_missed(text: str) -> None:
    for deltas in (list(text), _token_deltas(text, random.Random(3)), [text[:-3], text[-3:]]):
        check_stream_against_whole_text(FUZZ_FILTER, text, deltas)


def test_an_ordinary_sentence_is_released_at_most_one_word_behind() -> None:
    sentence = "Rule 1: The sea is vast, and its waves are calm today; sailors love it (mostly)."
    tokens = ["Rule", " 1", ":", " The", " sea", " is", " vast", ",", " and", " its", " waves", " are", " calm",
              " today", ";", " sail", "ors", " love", " it", " (", "most", "ly", ").", ""]  # fmt: skip
    assert "".join(tokens) == sentence
    streaming, sent, text = StreamingFilter(DEFAULT, "redact"), "", ""
    for token in tokens:
        text += token
        sent += streaming.push(token)
        held = text[len(sent) :]
        # At most the word being written (with the space before it); the fixed-width hold kept 24 characters.
        assert text.startswith(sent) and held.lstrip() in ("", text.split()[-1]), (text, sent)
    assert sent + streaming.finish() == sentence
    # The model's first tokens: the fixed-width hold sent nothing before ~24 characters existed.
    streaming = StreamingFilter(DEFAULT, "redact")
    assert [streaming.push(token) for token in tokens[:5]] == ["", "Rule ", "", "1: ", "The "]


# -- long output without spaces: bounded work, and still exactly the whole-text redaction ------------------

LONG_PIECES = {
    "letters": ["abcdefghij", "q", "xyz", "ihateyou", "hatehate", "you", "them", "chateau", "violet"],
    "encodings": ["%41%42%43", "&#65;&#66;", "&#x41;", "&eacute;", "%68%61%74%65", "%2e", "&#x31;"],
    "leet": ["h4t3", "a1b2", "x!y!", "k1ll", "3", "@", "$", "|", "+", "v!0", "8", "42"],
    "glued": ["ihateyou", "hatehate", "youhate", "hatethem", "ihate", "uhate", "hateful", "violence"],
    "spaced": ["a.b.", "c.", "h.a.t.e.", "a b ", "x ", "a!b!", "q-", "_", "-", "."],
    "disguised": ["\u200b", "\u0301", "ＨＡＴＥ", "ʜᴀᴛᴇ", "а", "е", "Ⓗ", "\u00ad", "x", "y"],
    # one long stemmed word, redacted once long, whatever letters, encodings and invisibles it goes on with
    "stemmed": ["violen", "t", "ly", "%74", "&#116;", "\u200b", "\u0301", "Т", "ʜᴀᴛᴇ", "abc"],
    # leetspeak with multi-word entries' words (FUZZ_FILTER has them): windows start after a digit no
    # leetspeak reading makes a letter, where no entry's match crosses
    "leet-phrase": ["h4t3", "a1b2", "x!y!", "k1ll", "2", "6", "9", "go", "4w4y", "!", "|", "y0ur5elf", "kill", "+"],
    # encodings of encodings (two and three layers), encoded spaces, and pieces of encodings
    "layered": ["%2541", "&amp;#104;", "%26%23104;", "%20", "&#32;", "&amp;", "%252541", "&amp;amp;#104;",
                "%26amp;#104;", "&#37;41", "%25", "%2", ";", "41", "&#x26;#x41;"],
}  # fmt: skip
ENDINGS = ["", "hate", "-hate", " hate", "9hate", "h@te", "violently", "h a t e", "%68%61%74%65", "hatred",
           " yourself", "yourself", " away", "violen", "k1ll yourself", "\u202ehate", "haaate"]  # fmt: skip


def _long_run(rng: random.Random, size: int, kinds: list[list[str]]) -> str:
    """A run of ``size`` characters or so without spaces (mostly), of pieces of one kind or several."""
    chosen = rng.sample(kinds, min(len(kinds), rng.choice([1, 1, 2, 3])))
    pieces: list[str] = []
    while sum(map(len, pieces)) < size:
        pieces.append(rng.choice(rng.choice(chosen)))
    return "".join(pieces)


@hypothesis.settings(max_examples=15, deadline=None, derandomize=True, database=None)
@hypothesis.given(st.randoms(use_true_random=False))
def test_a_long_run_without_spaces_streams_exactly_the_whole_text_redaction(rng: random.Random) -> None:
    text = (
        rng.choice(["", "so ", "kill ", "go "])
        + rng.choice(["", "", "violen", "h", "hate"])
        + _long_run(rng, rng.choice([300, 1500]), list(LONG_PIECES.values()))
        + rng.choice(ENDINGS)
        + rng.choice(["", " ok", " and more text"])
    )
    check_stream_against_whole_text(rng.choice([DEFAULT, FUZZ_FILTER]), text, _token_deltas(text, rng))


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True, database=None)
@hypothesis.given(st.randoms(use_true_random=False))
def test_a_window_starts_only_where_no_decoding_round_crosses(rng: random.Random) -> None:
    # Where a later window may start among encodings of encodings, the text decodes as the text before
    # it followed by the text from it, whatever comes next (pieces of encodings included).
    pieces = [*LONG_PIECES["layered"], "%", "&", "#", "&#", "&amp", "0", "x", "%2568%2561%2574%2565"]
    text = "".join(rng.choice(pieces) for _ in range(rng.randint(20, 150)))
    cuts = [position for position in range(1, len(text)) if content_filter._decode_separable(text, position)]
    for position in rng.sample(cuts, min(len(cuts), 8)):
        for _ in range(4):
            after = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 3)))
            whole = content_filter._decoded(text + after)[0]
            assert (
                whole
                == content_filter._decoded(text[:position])[0] + content_filter._decoded(text[position:] + after)[0]
            )


@pytest.mark.parametrize("kind", sorted(LONG_PIECES))
@pytest.mark.parametrize("ending", ["hate", "9hate", "%68%61%74%65", "h.a.t.e", "!go|away", "2k1ll+yourself"])
def test_a_blocked_word_at_the_end_of_a_long_run_is_never_sent(kind: str, ending: str) -> None:
    rng = random.Random(f"{kind}{ending}")
    text = ("violen" if kind == "stemmed" else "") + _long_run(rng, 5000, [LONG_PIECES[kind]]) + ending
    deltas, position = [], 0
    while position < len(text):  # pushes of 1 to 40 characters, cut anywhere
        size = rng.randint(1, 40)
        deltas.append(text[position : position + size])
        position += size
    check_stream_against_whole_text(FUZZ_FILTER, text, deltas)


def test_a_long_word_that_can_no_longer_match_is_sent_as_it_comes() -> None:
    streaming, sent = StreamingFilter(DEFAULT, "redact"), ""
    for _ in range(500):
        sent += streaming.push("abcdefghij")
        # Not held whole: only what a later window needs stays back (an encoding's or a word's worth).
        assert len(sent) >= 10 * _ - DEFAULT.long_word
    assert sent + streaming.finish() == "abcdefghij" * 500


@pytest.mark.parametrize(
    "text",
    [
        "so violen" + "t" * 3000 + " ok",  # a stemmed word matches however long it gets
        "so v i o l e n " + "t " * 1500 + "ok",  # and so does a spaced-out one
        "so " + "%76%69%6f%6c%65%6e" + "%74" * 1000 + " ok",  # encoded
    ],
)
def test_a_long_stemmed_run_is_never_sent(text: str) -> None:
    sent, rejected = stream(DEFAULT, "reject", _token_deltas(text, random.Random(5)))
    assert rejected and sent == "so "
    check_stream_against_whole_text(DEFAULT, text, _token_deltas(text, random.Random(6)))


@pytest.mark.parametrize(
    "word", ["violen" + "t" * 3000, "%76%69%6f%6c%65%6e" + "%74" * 1000, "Violen\u200b" + "ce" * 900]
)
def test_a_long_stemmed_word_is_redacted_once_it_is_long_and_the_rest_dropped(word: str) -> None:
    # A word that begins with a stem is one match to its end, however long it gets (the whole-text check
    # redacts it whole); once it is longer than any other detector reads, the redaction is sent at once
    # and the rest of the word is dropped as it comes, instead of the whole word being held.
    text = "so " + word + " ok, hate"
    assert DEFAULT.redact(text) == "so [redacted] ok, [redacted]"
    streaming, sent, position = StreamingFilter(DEFAULT, "redact"), "", 0
    while position < len(text) - 12:
        sent += streaming.push(text[position : position + 4])
        position += 4
        if position > 3 + 3 * DEFAULT.long_word + 20:  # long, even read from 3-character encodings
            assert sent == "so [redacted]", (position, sent)
    sent += streaming.push(text[position:]) + streaming.finish()
    assert sent == DEFAULT.redact(text)


class _Counting:
    """Counts the characters ``_decoded`` and ``find_in_views`` are given (the work of a push)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.characters = 0
        decoded, find_in_views = content_filter._decoded, ContentFilter.find_in_views
        layers_separable_from = content_filter._layers_separable_from

        def counting_decoded(text: str) -> object:
            self.characters += len(text)
            return decoded(text)

        def counting_find(filter_: ContentFilter, views: list) -> list:  # type: ignore[type-arg]
            self.characters += sum(len(view.text) for view in views)
            return find_in_views(filter_, views)

        def counting_layers(layer: str, *, from_start: bool) -> bool | None:
            self.characters += len(layer)  # the rounds decoded to tell where a window may start
            return layers_separable_from(layer, from_start=from_start)

        monkeypatch.setattr(content_filter, "_decoded", counting_decoded)
        monkeypatch.setattr(content_filter, "_layers_separable_from", counting_layers)
        monkeypatch.setattr(ContentFilter, "find_in_views", counting_find)

    def stream(self, text: str, filter_: ContentFilter = DEFAULT) -> int:
        """Characters read while streaming ``text`` four characters at a time."""
        self.characters = 0
        streaming = StreamingFilter(filter_, "redact")
        sent = "".join(streaming.push(text[i : i + 4]) for i in range(0, len(text), 4)) + streaming.finish()
        assert sent == filter_.redact(text)
        return self.characters


@pytest.mark.parametrize(
    "unit",
    [
        "the quick brown fox jumps over the lazy dog ",
        "caf&eacute; &amp; na&iuml;ve r&eacute;sum&eacute; ",
        "abcdefghij",  # one long word
        "a b c d e f g h ",  # one long spaced-out run
        "%41%42%43",  # one long word, encoded
        "h4t3a1b2x!y!",  # one long word of leetspeak
        "a.b.c.d.e.f.g.h.",  # one long spaced-out run without spaces
        "ihateyouhatehate",  # glued words glued on
        "violen|t",  # one long stemmed word (redacted once long, the rest dropped as it comes)
        "violen|%74",  # encoded
        "%2541",  # one long word, encoded twice over
        "&amp;#104;",
        "%252541",  # three times over
    ],
)
def test_the_work_per_push_does_not_grow_with_the_output(monkeypatch: pytest.MonkeyPatch, unit: str) -> None:
    _assert_flat_work_per_push(_Counting(monkeypatch), unit, DEFAULT)


@pytest.mark.parametrize("unit", ["h4t3a1b2x!y!", "k1ll!y0u6go+4w4y9"])
def test_the_work_per_push_on_leetspeak_does_not_grow_with_multi_word_entries(
    monkeypatch: pytest.MonkeyPatch, unit: str
) -> None:
    # Multi-word entries read leetspeak symbols as separators: windows start after digits read as digits.
    _assert_flat_work_per_push(_Counting(monkeypatch), unit, FUZZ_FILTER)


def _assert_flat_work_per_push(counting: _Counting, unit: str, filter_: ContentFilter) -> None:
    head, _, unit = unit.rpartition("|")  # "head|unit": the text is the head, then the unit repeated
    short, long = head + unit * (4000 // len(unit)), head + unit * (16000 // len(unit))
    per_push_short = counting.stream(short, filter_) / (len(short) / 4)
    per_push_long = counting.stream(long, filter_) / (len(long) / 4)
    # Linear in the output: the same characters read per push at 4k and 16k (quadratic would be 4x).
    assert per_push_long < 1.3 * per_push_short, (per_push_short, per_push_long)
    assert per_push_long < 2000, per_push_long  # a bounded window, not the output so far
