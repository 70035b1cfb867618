"""Blocked-word content filter that is hard to evade and does not trip over innocent words.

The naive ``"hate" in prompt.lower()`` check fails both ways: it rejects "whatever" and "Chateau", and
it lets "ＨＡＴＥ" (fullwidth) and "h\u200bate" (zero-width space) through. This filter instead:

* normalizes every original character on its own (NFKC, casefold, no combining marks or invisible
  format characters, common Cyrillic/Greek look-alikes mapped to Latin) and remembers which original
  character each normalized character came from, so matches are reported and redacted as spans of
  the text the client actually sent;
* matches whole words only, plus simple inflections of each blocked word (hates, hated, hating, ...),
  and multi-word entries ("kill yourself") as a sequence of whole words; an entry ending in ``*``
  ("violen*") is a stem that blocks every word starting with it (violence, violent, violently) but
  not words that merely contain it ("nonviolent");
* also checks two common evasions: letters spaced out with blanks or punctuation ("h a t e",
  "h.a.t.e") and leetspeak inside a word ("h4te", "h@te").

Every accepted word form is computed once in ``__init__``; ``find`` is one linear pass over the text
plus constant-time set look-ups.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from textgen.errors import ConfigError, ContentRejectedError

BLOCKED_WORDS_FILE_SETTING = "TEXTGEN_BLOCKED_WORDS_FILE"
REDACTION = "[redacted]"

_WORD_RE = re.compile(r"[^\W_]+")
# "@" and "$" stand for letters in leetspeak, so a word written with them must be read as one token.
_SYMBOL_WORD_RE = re.compile(r"(?:[^\W_]|[@$])+")

_SUFFIXES = ("s", "es", "ed", "ing", "er", "ers", "ful")
# After a final "e" these give hated/hater/haters; on other words they would only invent non-words
# that can collide with real ones (a blocked "ho" would block "hod"), so they are kept to e-final words.
_E_FINAL_SUFFIXES = ("d", "r", "rs")
_E_DROPPING_SUFFIXES = ("ing", "ed", "er", "ers")

_INVISIBLE_CATEGORIES = frozenset({"Mn", "Me", "Cf"})
_COMBINING_MARK_CATEGORIES = frozenset({"Mn", "Me"})

# Capitals whose lower-case form no longer looks Latin (Cyrillic Н/н, Т/т, Greek Η/η). Mapping them
# before casefolding catches "НАТЕ" without turning ordinary lower-case Russian ("нате") into "hate".
_CAPITAL_HOMOGLYPHS: Mapping[str, str] = MappingProxyType(
    {
        "В": "b", "К": "k", "М": "m", "Н": "h", "Т": "t",  # Cyrillic
        "Β": "b", "Η": "h", "Μ": "m", "Ν": "n", "Υ": "y", "Ζ": "z",  # Greek
    }
)  # fmt: skip
# Applied after casefolding, so these also cover the matching capitals (А, Е, О, Р, С, Х, ...).
# Also includes Latin letters with a built-in stroke, which NFD cannot strip.
_LOWERCASE_HOMOGLYPHS: Mapping[str, str] = MappingProxyType(
    {
        "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x",  # Cyrillic
        "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "һ": "h", "ԛ": "q", "ԝ": "w", "ӏ": "l",  # Cyrillic
        "α": "a", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",  # Greek
        "υ": "u", "χ": "x",  # Greek
        "ı": "i", "ł": "l", "ø": "o", "đ": "d", "ħ": "h",  # Latin with a stroke
    }
)  # fmt: skip

_LEET_CHARS = frozenset("431057@$")
_LEET_ONE_AS_I: Mapping[int, int] = MappingProxyType(str.maketrans("431057@$", "aeiostas"))
# "1" stands for "l" as often as for "i" ("k1ll"), so both readings are tried.
_LEET_ONE_AS_L: Mapping[int, int] = MappingProxyType(str.maketrans("431057@$", "aelostas"))
_DIGITS = "0123456789"

_MIN_SPACED_OUT_LETTERS = 3
# A shorter stem would block too much ("ha*" is half the dictionary).
MIN_STEM_LENGTH = 3
STEM_MARK = "*"
# Standalone one-letter words that commonly sit next to a spaced-out word ("I h a t e u"); they may
# be dropped from the ends of a run. Other letters are not, so "c h a t e a u" does not match "hate".
_ONE_LETTER_WORDS = frozenset("aiu")

_Span = tuple[int, int, str]  # start and end in the normalized text, and the blocked word


@dataclass(frozen=True)
class FilterMatch:
    """One blocked word found in a text; ``start``/``end`` index the original text."""

    word: str
    start: int
    end: int


class _Phrase(NamedTuple):
    word: str
    later_parts: tuple[frozenset[str], ...]  # accepted forms of each word after the first


class ContentFilter:
    """Finds blocked words (and their evasions) in text; immutable once built."""

    def __init__(self, words: Iterable[str]) -> None:
        words = list(words)
        stems = _parse_stems(words)
        entries = _parse_entries(w for w in words if not w.strip().endswith(STEM_MARK))
        self._words = frozenset(entries) | frozenset(stem + STEM_MARK for stem in stems)
        self._word_by_form = _index_single_token_forms(entries)
        self._phrases_by_first_form = _index_phrases(entries)
        # Longest first, so a form is reported under the most specific stem.
        self._stems = tuple(sorted(stems, key=len, reverse=True))
        self._longest_phrase = max((len(parts) for parts in entries.values()), default=1)

    @classmethod
    def from_sources(cls, words: Iterable[str], file: Path | None) -> ContentFilter:
        """Blocked words from settings plus, if given, a file with one word or phrase per line."""
        file_words = _read_words_file(file) if file is not None else []
        return cls([*words, *file_words])

    @property
    def words(self) -> frozenset[str]:
        """The configured entries in normalized form (multi-word entries joined by one space, stems
        with their trailing ``*``)."""
        return self._words

    def find(self, text: str) -> list[FilterMatch]:
        """Non-overlapping matches in text order; overlapping detections are merged into one span."""
        if not self._words or not text:
            return []
        normalized = _NormalizedText.of(text)
        spans = [
            *self._whole_word_spans(normalized.text),
            *self._symbol_leet_spans(normalized.text),
            *self._spaced_out_spans(normalized.text),
        ]
        return _merge_into_matches(normalized, spans)

    @property
    def streaming_holdback(self) -> int:
        """Characters a stream must hold back so no match can still be completed by later text: the
        longest entry with its longest suffix, spelled out with a separator after every letter."""
        longest = max((len(word) for word in self._words), default=0)
        return 2 * (longest + max(len(suffix) for suffix in _SUFFIXES)) + 2

    @property
    def longest_phrase(self) -> int:
        """Words in the longest entry (1 without multi-word entries)."""
        return self._longest_phrase

    def is_blocked(self, text: str) -> bool:
        return bool(self.find(text))

    def redact(self, text: str, replacement: str = REDACTION) -> str:
        pieces: list[str] = []
        cursor = 0
        for match in self.find(text):
            pieces += [text[cursor : match.start], replacement]
            cursor = match.end
        pieces.append(text[cursor:])
        return "".join(pieces)

    def _blocked_word_for(self, forms: Iterable[str]) -> str | None:
        for form in forms:
            word = self._word_by_form.get(form)
            if word is not None:
                return word
            for stem in self._stems:
                if form.startswith(stem):
                    return stem + STEM_MARK
        return None

    def _whole_word_spans(self, text: str) -> Iterator[_Span]:
        tokens = list(_WORD_RE.finditer(text))
        forms_per_token = [_token_forms(token.group()) for token in tokens]
        for index, forms in enumerate(forms_per_token):
            word = self._blocked_word_for(forms)
            if word is not None:
                yield tokens[index].start(), tokens[index].end(), word
            for phrase in self._phrases_starting_with(forms):
                last = index + len(phrase.later_parts)
                if last < len(tokens) and _phrase_continues(phrase, forms_per_token, index):
                    yield tokens[index].start(), tokens[last].end(), phrase.word

    def _phrases_starting_with(self, forms: Iterable[str]) -> Iterator[_Phrase]:
        for form in forms:
            yield from self._phrases_by_first_form.get(form, ())

    def _symbol_leet_spans(self, text: str) -> Iterator[_Span]:
        for token in _SYMBOL_WORD_RE.finditer(text):
            # Tokens without "@"/"$" are exactly the plain words, already checked.
            if "@" not in token.group() and "$" not in token.group():
                continue
            word = self._blocked_word_for(_token_forms(token.group()))
            if word is not None:
                yield token.start(), token.end(), word

    def _spaced_out_spans(self, text: str) -> Iterator[_Span]:
        for run in _spaced_out_runs(text):
            letters = "".join(text[position] for position in run)
            for first, stop in _spaced_out_windows(letters):
                word = self._blocked_word_for(_token_forms(letters[first:stop]))
                if word is not None:
                    yield run[first], run[stop - 1] + 1, word
                    break


@dataclass(frozen=True)
class _NormalizedText:
    original: str
    text: str
    origin: tuple[int, ...]  # index in ``original`` of each character of ``text``

    @classmethod
    def of(cls, original: str) -> _NormalizedText:
        # Real text repeats few distinct characters; caching skips the slow Unicode path for repeats.
        piece_by_char: dict[str, str] = {}
        pieces: list[str] = []
        origin: list[int] = []
        for index, char in enumerate(original):
            piece = piece_by_char.get(char)
            if piece is None:
                piece = piece_by_char[char] = _normalize_char(char)
            pieces.append(piece)
            origin.extend([index] * len(piece))
        return cls(original, "".join(pieces), tuple(origin))

    def original_span(self, start: int, end: int) -> tuple[int, int]:
        original_start = self.origin[start]
        original_end = self.origin[end - 1] + 1
        # Trailing accents belong to the last letter; leaving them would stack them on the replacement.
        while original_end < len(self.original) and _is_combining_mark(self.original[original_end]):
            original_end += 1
        return original_start, original_end


def _normalize_char(char: str) -> str:
    if char.isascii():
        return char.lower()
    normalized: list[str] = []
    for compatible in unicodedata.normalize("NFKC", char):
        capital_lookalike = _CAPITAL_HOMOGLYPHS.get(compatible)
        if capital_lookalike is not None:
            normalized.append(capital_lookalike)
            continue
        for part in unicodedata.normalize("NFD", compatible.casefold()):
            if unicodedata.category(part) not in _INVISIBLE_CATEGORIES:
                normalized.append(_LOWERCASE_HOMOGLYPHS.get(part, part))
    return "".join(normalized)


def _normalize_text(text: str) -> str:
    return "".join(_normalize_char(char) for char in text)


def _is_combining_mark(char: str) -> bool:
    return unicodedata.category(char) in _COMBINING_MARK_CATEGORIES


def _parse_entries(words: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Each usable entry as its normalized base form and its words; blank entries disappear."""
    entries: dict[str, tuple[str, ...]] = {}
    for raw in words:
        parts = tuple(_WORD_RE.findall(_normalize_text(raw)))
        if parts:
            entries[" ".join(parts)] = parts
    return entries


def _parse_stems(words: Iterable[str]) -> list[str]:
    """The normalized stems of ``stem*`` entries; ConfigError for a stem that is not one word of at
    least MIN_STEM_LENGTH letters."""
    stems: list[str] = []
    for raw in words:
        text = raw.strip()
        if not text.endswith(STEM_MARK):
            continue
        parts = _WORD_RE.findall(_normalize_text(text[: -len(STEM_MARK)]))
        if len(parts) != 1 or len(parts[0]) < MIN_STEM_LENGTH or not parts[0].isalpha():
            raise ConfigError(
                f"Blocked word {text!r}: a trailing '*' marks a stem, which must be one word of at least "
                f"{MIN_STEM_LENGTH} letters ('violen*'); fix TEXTGEN_BLOCKED_WORDS or {BLOCKED_WORDS_FILE_SETTING}."
            )
        stems.append(parts[0])
    return stems


def _inflected_forms(base: str) -> frozenset[str]:
    forms = {base, *(base + suffix for suffix in _SUFFIXES)}
    if base.endswith("e") and len(base) > 1:
        forms.update(base + suffix for suffix in _E_FINAL_SUFFIXES)
        forms.update(base[:-1] + suffix for suffix in _E_DROPPING_SUFFIXES)
    return frozenset(forms)


def _index_single_token_forms(entries: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """Every single-token form that counts as a blocked entry, mapped to that entry."""
    word_by_form: dict[str, str] = {}
    for word, parts in entries.items():
        # A phrase written without spaces ("killyourself") is one token, so it is indexed here too.
        prefix = "".join(parts[:-1])
        for form in _inflected_forms(parts[-1]):
            word_by_form.setdefault(prefix + form, word)
    for word, parts in entries.items():
        # When an inflection of one entry is itself an entry ("hater"), report the entry itself.
        word_by_form["".join(parts)] = word
    return word_by_form


def _index_phrases(entries: Mapping[str, tuple[str, ...]]) -> dict[str, list[_Phrase]]:
    phrases_by_first_form: dict[str, list[_Phrase]] = {}
    for word, parts in entries.items():
        if len(parts) < 2:
            continue
        phrase = _Phrase(word, tuple(_inflected_forms(part) for part in parts[1:]))
        for form in _inflected_forms(parts[0]):
            phrases_by_first_form.setdefault(form, []).append(phrase)
    return phrases_by_first_form


def _phrase_continues(phrase: _Phrase, forms_per_token: list[tuple[str, ...]], first: int) -> bool:
    return all(
        not accepted.isdisjoint(forms_per_token[first + offset])
        for offset, accepted in enumerate(phrase.later_parts, start=1)
    )


def _token_forms(token: str) -> tuple[str, ...]:
    """The token plus, when it mixes letters with digits or symbols, its leetspeak readings."""
    has_letter = any(char.isalpha() for char in token)
    if not has_letter or token.isalpha():
        # A pure number is never read as leetspeak: "1337" is a number, not a word.
        return (token,)
    forms = [token]
    if not _LEET_CHARS.isdisjoint(token):
        forms.append(token.translate(_LEET_ONE_AS_I))
        if "1" in token:
            forms.append(token.translate(_LEET_ONE_AS_L))
    # Digits tacked onto a word ("hate99", "2hate") do not make it a different word.
    forms += [form.strip(_DIGITS) for form in forms]
    return tuple(dict.fromkeys(form for form in forms if form))


def _spaced_out_runs(text: str) -> Iterator[list[int]]:
    """Positions of 3+ single-character tokens separated only by non-word characters."""
    run: list[int] = []
    for position, char in enumerate(text):
        if _is_lone_letter(text, position):
            run.append(position)
        elif char.isalnum():
            # A longer word between single letters ends the run.
            if len(run) >= _MIN_SPACED_OUT_LETTERS:
                yield run
            run = []
    if len(run) >= _MIN_SPACED_OUT_LETTERS:
        yield run


def _is_lone_letter(text: str, position: int) -> bool:
    before = text[position - 1] if position > 0 else " "
    after = text[position + 1] if position + 1 < len(text) else " "
    char = text[position]
    if char.isalnum():
        return not before.isalnum() and not after.isalnum()
    # A lone "@" or "$" is a spaced-out leet letter ("h @ t e"); between letters it is a separator.
    return char in "@$" and not _is_word_or_leet_char(before) and not _is_word_or_leet_char(after)


def _is_word_or_leet_char(char: str) -> bool:
    return char.isalnum() or char in "@$"


def _spaced_out_windows(letters: str) -> Iterator[tuple[int, int]]:
    """The whole run, then the run without a leading and/or trailing one-letter word."""
    drop_first = (0, 1) if letters[0] in _ONE_LETTER_WORDS else (0,)
    drop_last = (0, 1) if letters[-1] in _ONE_LETTER_WORDS else (0,)
    for first in drop_first:
        for dropped_at_end in drop_last:
            stop = len(letters) - dropped_at_end
            if stop - first >= _MIN_SPACED_OUT_LETTERS:
                yield first, stop


def _merge_into_matches(normalized: _NormalizedText, spans: list[_Span]) -> list[FilterMatch]:
    matches: list[FilterMatch] = []
    for start, end, word in sorted(spans, key=lambda span: (span[0], -span[1])):
        original_start, original_end = normalized.original_span(start, end)
        if matches and original_start < matches[-1].end:
            # Overlapping detections (a phrase and one of its words, a leet and a plain reading)
            # become one span so that redaction removes everything that was flagged.
            previous = matches[-1]
            if original_end > previous.end:
                matches[-1] = FilterMatch(previous.word, previous.start, original_end)
            continue
        matches.append(FilterMatch(word, original_start, original_end))
    return matches


def _read_words_file(path: Path) -> list[str]:
    """The file's entries: one per line, '#' starts a comment, blank lines are dropped later."""
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"{BLOCKED_WORDS_FILE_SETTING}={path} cannot be read ({_describe_read_error(error)}); "
            f"set {BLOCKED_WORDS_FILE_SETTING} to a readable UTF-8 file with one blocked word per line, "
            "or unset it."
        ) from error
    return [line.split("#", 1)[0] for line in content.splitlines()]


def _describe_read_error(error: OSError | UnicodeDecodeError) -> str:
    if isinstance(error, UnicodeDecodeError):
        return "not valid UTF-8"
    return error.strerror or type(error).__name__


class StreamingFilter:
    """Applies a ``ContentFilter`` to text that arrives piece by piece (streamed generation).

    A forbidden word must never reach the client, even split across tokens ("ha" + "te"), so whatever
    later text could still turn into a match is held until more text arrives or the stream ends:

    * the last ``holdback`` characters (``ContentFilter.streaming_holdback``), snapped back to the start
      of a word (a stem entry such as "violen*" matches a word of any length, so the whole trailing
      word is held, leetspeak symbols included);
    * the last words of a possible multi-word entry, however far apart they are;
    * a trailing run of spaced-out single letters ("h          a          t"), from its first letter,
      however long its gaps: the whole-text check matches such runs at any width, so the stream must too.

    Text before that point can no longer change whether it matches, so the stream shows exactly what
    the final whole-text check would let through. Only a window around the unsent text is re-scanned
    on each push, so the cost per token does not grow with the length of the output.
    """

    def __init__(self, content_filter: ContentFilter, action: str, holdback: int | None = None) -> None:
        self._filter = content_filter
        self._reject = action == "reject"
        self._holdback = holdback if holdback is not None else content_filter.streaming_holdback
        self._text = ""
        self._sent_upto = 0
        self.matched = False
        self.first_match_start: int | None = None  # where the first redacted match began in the raw text

    @property
    def released(self) -> int:
        """Characters of the raw text decided so far (sent, or replaced by the redaction)."""
        return self._sent_upto

    def push(self, delta: str) -> str:
        """Add text; return what is safe to send now (redacted). Raises ContentRejectedError on a match
        when the action is ``reject``."""
        self._text += delta
        text = self._text
        safe = min(
            _word_start_before(text, len(text) - self._holdback),
            _start_of_last_words(text, self._filter.longest_phrase),
            _trailing_run_start(text),
        )
        return self._release(safe)

    def finish(self) -> str:
        return self._release(len(self._text))

    def _release(self, end: int) -> str:
        if end <= self._sent_upto:
            return ""
        window_start = _word_start_before(self._text, self._sent_upto - self._holdback)
        matches = [
            (m.start + window_start, m.end + window_start)
            for m in self._filter.find(self._text[window_start:])
            if m.end + window_start > self._sent_upto
        ]
        for start, stop in matches:
            if start < end < stop:
                end = start  # never send part of a match
        if end <= self._sent_upto:
            return ""
        released = self._redact(self._sent_upto, end, [m for m in matches if m[0] < end])
        self._sent_upto = end
        return released

    def _redact(self, start: int, end: int, matches: list[tuple[int, int]]) -> str:
        if matches:
            self.matched = True
            if self.first_match_start is None:
                self.first_match_start = matches[0][0]
            if self._reject:
                raise ContentRejectedError("The generated text was withheld by the content filter.")
        pieces: list[str] = []
        cursor = start
        for match_start, match_end in matches:
            pieces += [self._text[cursor : max(cursor, match_start)], REDACTION]
            cursor = max(cursor, match_end)
        pieces.append(self._text[cursor:end])
        return "".join(pieces)


def _word_start_before(text: str, position: int) -> int:
    """``position`` (clamped to the text) moved back to the start of the word it falls in (leetspeak
    "@" and "$" count as letters: "h@te" is one word)."""
    position = max(0, min(position, len(text)))
    while 0 < position < len(text) and _is_word_or_leet_char(text[position - 1]) and _is_word_or_leet_char(
        text[position]
    ):
        position -= 1
    return position


def _start_of_last_words(text: str, count: int) -> int:
    """Where the last ``count`` words begin (the text's end when ``count`` < 1)."""
    position = len(text)
    for _ in range(max(0, count)):
        while position > 0 and not _is_word_or_leet_char(text[position - 1]):
            position -= 1
        while position > 0 and _is_word_or_leet_char(text[position - 1]):
            position -= 1
    return position


def _trailing_run_start(text: str) -> int:
    """The first letter of the spaced-out run the text ends in (single letters with anything but a
    longer word between them); the text's end when it does not end in one."""
    start = len(text)
    position = len(text) - 1
    while position >= 0:
        if _is_word_or_leet_char(text[position]):
            if not _is_lone_letter(text, position):
                break
            start = position
        position -= 1
    return start
