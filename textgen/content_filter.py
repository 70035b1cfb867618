"""Blocked-word content filter that is hard to evade and does not trip over innocent words.

The naive ``"hate" in prompt.lower()`` check fails both ways: it rejects "whatever" and "Chateau", and
it lets "ＨＡＴＥ" (fullwidth) and "h\u200bate" (zero-width space) through. This filter instead reads the
text the way a person would see it, and then matches whole words:

* decodes URL and HTML encodings (``%68ate``, ``&#104;ate``, ``&amp;#104;``, up to three layers),
  shows right-to-left overrides in the order they display (``\u202eetah`` reads "hate"), and normalizes
  every character (NFKC, casefold, no combining marks or invisible format characters, look-alike
  letters from Cyrillic, Greek, Cherokee and the Latin small-capital, hooked and stroked letters
  mapped to Latin), remembering which original characters each normalized character came from, so
  matches are reported and redacted as spans of the text the client actually sent;
* matches whole words only, plus simple inflections of each blocked word (hates, hated, hating, ...),
  and multi-word entries ("kill yourself") as a sequence of words; an entry ending in ``*``
  ("violen*") is a stem that blocks every word starting with it (violence, violent, violently) but
  not words that merely contain it ("nonviolent");
* also catches the usual disguises of a whole word: letters spaced out ("h a t e", "h.a.t.e"),
  pieces joined by punctuation ("ha-te", "h_ate"), leetspeak ("h4te", "h@te", "v!olence", "h8"),
  stretched letters ("haaate", "hhaattee"), and the word glued to itself or to a few short words
  ("hatehate", "ihateyou").

Matching is a handful of compiled regular expressions (blocked forms as a trie) over the normalized
text, plus dictionary look-ups for the few candidates they find: linear in the text.
"""

from __future__ import annotations

import bisect
import html.entities
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path
from types import MappingProxyType

from textgen.errors import ConfigError, ContentRejectedError

BLOCKED_WORDS_FILE_SETTING = "TEXTGEN_BLOCKED_WORDS_FILE"
REDACTION = "[redacted]"

_WORD_RE = re.compile(r"[^\W_]+")

_SUFFIXES = ("s", "es", "ed", "ing", "er", "ers", "ful")
# After a final "e" these give hated/hater/haters; on other words they would only invent non-words
# that can collide with real ones (a blocked "ho" would block "hod"), so they are kept to e-final words.
_E_FINAL_SUFFIXES = ("d", "r", "rs")
_E_DROPPING_SUFFIXES = ("ing", "ed", "er", "ers")

_INVISIBLE_CATEGORIES = frozenset({"Mn", "Me", "Cf"})
_COMBINING_MARK_CATEGORIES = frozenset({"Mn", "Me"})

# Capitals whose lower-case form no longer looks Latin (Cyrillic Н/н, Т/т, Greek Η/η), and Cherokee
# letters drawn like Latin capitals. Mapping them before casefolding catches "НАТЕ" without turning
# ordinary lower-case Russian ("нате") into "hate".
_CAPITAL_HOMOGLYPHS: Mapping[str, str] = MappingProxyType(
    {
        "В": "b", "К": "k", "М": "m", "Н": "h", "Т": "t",  # Cyrillic
        "Β": "b", "Η": "h", "Μ": "m", "Ν": "n", "Υ": "y", "Ζ": "z",  # Greek
        "\u13aa": "a", "\u13f4": "b", "\u13df": "c", "\u13ac": "e", "\u13bb": "h", "\u13ab": "j",  # Cherokee
        "\u13e6": "k", "\u13de": "l", "\u13b7": "m", "\u13e2": "p", "\u13da": "s", "\u13a2": "t",  # Cherokee
        "\u13d9": "v", "\u13b3": "w", "\u13c3": "z",  # Cherokee
    }
)  # fmt: skip
# Applied after casefolding, so these also cover the matching capitals (А, Е, О, Р, С, Х, ...).
_LOWERCASE_HOMOGLYPHS: Mapping[str, str] = MappingProxyType(
    {
        "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x",  # Cyrillic
        "і": "i", "ј": "j", "ѕ": "s", "ԁ": "d", "һ": "h", "ԛ": "q", "ԝ": "w", "ӏ": "l",  # Cyrillic
        "ѵ": "v", "ү": "y", "ɡ": "g",  # Cyrillic, Latin script g
        "α": "a", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",  # Greek
        "υ": "u", "χ": "x", "ϲ": "c", "ϳ": "j",  # Greek
    }
)  # fmt: skip
# Latin letters that NFKD cannot take apart (small capitals ʜᴀᴛᴇ, letters with a hook ɦ, a stroke ł,
# a bar ƀ, ...) read as their base letter; derived from the Unicode names of the Latin blocks.
_LATIN_VARIANT_NAME = re.compile(
    r"LATIN (?:SMALL |CAPITAL )?LETTER (?:SMALL CAPITAL |DOTLESS |SCRIPT )?([A-Z])(?: WITH .*)?"
)
_LATIN_BLOCKS = ((0x0100, 0x024F), (0x0250, 0x02AF), (0x1D00, 0x1DBF), (0x1E00, 0x1EFF), (0x2C60, 0x2C7F),
                 (0xA720, 0xA7FF), (0xAB30, 0xAB6F))  # fmt: skip


def _latin_variants() -> dict[str, str]:
    variants: dict[str, str] = {}
    for first, last in _LATIN_BLOCKS:
        for code in range(first, last + 1):
            char = chr(code)
            match = _LATIN_VARIANT_NAME.fullmatch(unicodedata.name(char, ""))
            if match is not None and not unicodedata.normalize("NFKD", char).isascii():
                variants[char.casefold()] = match.group(1).lower()
    return variants


_LATIN_VARIANTS: Mapping[str, str] = MappingProxyType(_latin_variants())

# Leetspeak, read with one character per character so offsets stay put. "1", "|" and "!" stand for
# "i" as often as for "l" ("k1ll", "v!olence"), so both readings are tried; "8" stands for "ate"
# ("h8"), which the blocked forms spell out instead (``_eight_forms``).
_LEET_SYMBOLS = "431057@$!|+€"
_LEET_AS_I: Mapping[int, int] = MappingProxyType(str.maketrans(_LEET_SYMBOLS, "aeiostasiite"))
_LEET_AS_L: Mapping[int, int] = MappingProxyType(str.maketrans(_LEET_SYMBOLS, "aelostasille"))
_LEET_RE = re.compile(r"[0-9@$!|+€]")

# Encodings decoded before matching: %XX (to printable ASCII only: "100%ef" stays as it is), numeric
# HTML references with or without ";", and named ones with ";". Decoded up to three layers deep.
_ENCODED_RE = re.compile(r"%([0-9A-Fa-f]{2})|&#([0-9]{1,7});?|&#[xX]([0-9A-Fa-f]{1,6});?|&([A-Za-z][A-Za-z0-9]{1,31};)")
_DECODE_ROUNDS = 3
# The longest text one decoded character can come from, over those rounds ("&amp;amp;#x00068;"):
# a stream holds back text after a "%" or "&" this many times the longest blocked word.
ENCODED_CHAR_MAX = 20
_RIGHT_TO_LEFT_OVERRIDE = "\u202e"
_ENCODING_START_RE = re.compile(r"[%&]")
_OVERRIDE_ENDS = frozenset("\u202c\u2069\n\r\u2029")

_LETTER = r"[^\W\d_]"
_LONE = r"(?<![^\W_])(?<![@$])(?:[^\W_]|[@$])(?![^\W_])(?![@$])"
_SPACED_OUT_RE = re.compile(rf"{_LONE}(?:(?:_|[^\w@$])+{_LONE}){{2,}}")
_SPACED_LETTER_RE = re.compile(r"[^\W_]|[@$]")
# Punctuation between two letters ("ha-te"): the chunk of text around it is read without it.
_JOINT_RE = re.compile(r"(?:[^\W_]|[@$])(?:_|[^\w\s@$])+(?:[^\W_]|[@$])")
# A word holding a digit or a leet symbol, with the symbols around it ("h@te!", "v!olence", "h8").
_LEET_CHAR = r"(?:[^\W_]|[@$!|+€])"
_LEET_WORD_RE = re.compile(rf"(?<![^\W_])(?<![@$!|+€]){_LEET_CHAR}*?[\d@$!|+€]{_LEET_CHAR}*")
_TRIPLE_RE = re.compile(r"([^\W\d_])\1\1")
_PAIRS_RE = re.compile(r"(?:([^\W\d_])\1){2,}")
_REPEATS_RE = re.compile(r"(.)\1+")
_WORD_END_RE = re.compile(r"[^\W_]*")
# Candidates inside longer words than this are skipped: no blocked word, disguised or not, is that long.
_LONGEST_CANDIDATE = 256
# Leet symbols also used as punctuation, tried stripped from a word's ends ("h@te!").
_LEET_PUNCTUATION = "!|+"

_MIN_SPACED_OUT_LETTERS = 3
# A shorter stem would block too much ("ha*" is half the dictionary).
MIN_STEM_LENGTH = 3
STEM_MARK = "*"
# Standalone one-letter words that commonly sit next to a spaced-out word ("I h a t e u"); they may
# be dropped from the ends of a run. Other letters are not, so "c h a t e a u" does not match "hate".
_ONE_LETTER_WORDS = frozenset("aiu")
# Short words a blocked word is often glued to ("ihateyou", "hatethem"); a word made only of these
# and blocked words counts as blocked. Only these: "whatever" is not "w" + "hate" + "ver".
_GLUE_WORDS = frozenset(
    {
        "i", "u", "a", "im", "ya", "you", "we", "they", "he", "she", "it", "me", "them", "us", "him", "her",
        "my", "your", "our", "their", "his", "so", "just", "really", "all", "still", "also", "do", "dont",
    }
)  # fmt: skip
_LONGEST_GLUED_WORD = 48
# Letters tried, in order, for the filler a stream puts before a window that starts inside a long run.
_FILLER_LETTERS = "qxzjkvwybfgmp"

_Span = tuple[int, int, str]  # start and end in the original text, and the blocked word


@dataclass(frozen=True)
class FilterMatch:
    """One blocked word found in a text; ``start``/``end`` index the original text."""

    word: str
    start: int
    end: int


class ContentFilter:
    """Finds blocked words (and their evasions) in text; immutable once built."""

    def __init__(self, words: Iterable[str]) -> None:
        words = list(words)
        stems = _parse_stems(words)
        entries = _parse_entries(w for w in words if not w.strip().endswith(STEM_MARK))
        self._words = frozenset(entries) | frozenset(stem + STEM_MARK for stem in stems)
        # Longest first, so a form is reported under the most specific stem.
        self._stems = tuple(sorted(stems, key=len, reverse=True))
        self._word_by_form = _index_forms(entries)
        self._word_by_collapsed = {_collapsed(form): word for form, word in self._word_by_form.items()}
        self._longest_form = max((len(form) for form in self._word_by_form), default=0)
        # Stems match longer words: "violen*" blocks "violence", "violently".
        self._longest_candidate = max(self._longest_form, *(len(stem) + 8 for stem in stems), 0)
        # A chunk without spaces, short enough to spell a blocked word, with punctuation between letters.
        chunk = max(3, self.longest_chunk)
        self._joined_re = re.compile(rf"(?<!\S)(?=\S{{0,{chunk}}}?{_JOINT_RE.pattern})\S{{3,{chunk}}}(?!\S)")
        self._longest_phrase = max((len(parts) for parts in entries.values()), default=1)
        single_forms = [form for form, word in self._word_by_form.items() if " " not in word]
        self._plain_re = _whole_word_regex(entries, stems)
        phrases = {word: parts for word, parts in entries.items() if len(parts) > 1}
        self._phrase_re = _whole_word_regex(phrases, ()) if phrases else None
        self._anywhere_re = re.compile(_trie_pattern(single_forms + list(stems))) if self._words else None
        self._glue_pieces = frozenset(_GLUE_WORDS) | frozenset(single_forms)
        used = "".join([*self._word_by_form, *stems])
        self._filler_letter = next((letter for letter in _FILLER_LETTERS if letter not in used), None)
        self._one_letter_phrase_words = any(len(part) < 2 for parts in phrases.values() for part in parts)
        self._entry_digits = any(char.isdigit() for word in entries for char in word)

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
        return self.find_in_views(text_views(text))

    def find_in_views(self, views: Iterable[TextView]) -> list[FilterMatch]:
        """``find`` over a text's views (``text_views``), for a caller that reads them itself (a stream
        reads its window once, for what to hold and for what to send)."""
        if not self._words:
            return []
        spans: list[_Span] = []
        for view in views:
            spans += self._spans(view)
        return _merge_into_matches(spans)

    @property
    def streaming_holdback(self) -> int:
        """Context a stream re-scans before its unsent text, so that a match reaching into it is seen
        whole: the longest entry with its longest suffix, spelled out with a separator after every letter.
        (What a stream holds back is worked out from the text itself: ``StreamingFilter``.)"""
        longest = max((len(word) for word in self._words), default=0)
        return 2 * (longest + max(len(suffix) for suffix in _SUFFIXES)) + 2

    @property
    def longest_chunk(self) -> int:
        """The longest chunk without spaces that may spell a blocked word joined by punctuation."""
        return 4 * self._longest_candidate

    @property
    def longest_phrase(self) -> int:
        """Words in the longest entry (1 without multi-word entries)."""
        return self._longest_phrase

    @property
    def long_word(self) -> int:
        """Letters in a row from which a word is read whole by no detector but a stem: every form is
        shorter, and the leetspeak, stretched, glued and joined readings skip longer words and chunks.
        Such a word, however it goes on, is only ever part of a match if it begins with a stem."""
        return max(_LONGEST_CANDIDATE, _LONGEST_GLUED_WORD, self.longest_chunk, self._longest_form) + 1

    @property
    def longest_form(self) -> int:
        """Letters in the longest blocked form (inflections and multi-word entries without spaces)."""
        return self._longest_form

    @property
    def long_spelling(self) -> int:
        """Spaced-out letters from which a run spells no blocked form, even with a one-letter word dropped
        from each end: however it goes on, it only ever matches if it begins with a stem."""
        return self._longest_form + 3

    def begins_with_stem(self, letters: str) -> bool:
        """Whether a word that starts with ``letters`` is a stemmed word ("violen" + anything)."""
        return self.stem_beginning(letters) is not None

    def stem_beginning(self, letters: str) -> str | None:
        """The stem a word that starts with ``letters`` begins with, if any."""
        return next((stem for stem in self._stems if letters.startswith(stem)), None)

    def may_spell_match(self, letters: str) -> bool:
        """Whether a spaced-out run whose first letters are ``letters`` can still spell a match once it
        ends: it is short enough to spell a form, or begins with a stem in some reading (a leading
        one-letter word dropped or not)."""
        if len(letters) < self.long_spelling:
            return True
        starts = [letters, letters[1:]] if letters[0] in _ONE_LETTER_WORDS else [letters]
        return any(self.begins_with_stem(reading) for start in starts for reading in _leet_readings(start))

    @property
    def filler_letter(self) -> str | None:
        """A letter in no blocked form or stem: text made of it alone matches nothing and joins no match
        (None if every candidate letter is taken)."""
        return self._filler_letter

    def crosses_match(self, text: str, position: int) -> bool:
        """Whether a whole-word match in ``text`` as written, or a multi-word entry's match in it read as
        leetspeak, starts before ``position`` and ends after it."""
        readings = [(self._plain_re, text)]
        if self._phrase_re is not None:
            readings += [(self._phrase_re, text.translate(table)) for table in (_LEET_AS_I, _LEET_AS_L)]
        return any(m.start() < position < m.end() for pattern, reading in readings for m in pattern.finditer(reading))

    @property
    def has_entry_digits(self) -> bool:
        """Whether an entry (a word, or a multi-word entry's word) holds a digit (then a digit may be
        inside a match)."""
        return self._entry_digits

    @property
    def has_one_letter_phrase_words(self) -> bool:
        """Whether a multi-word entry has a word of one letter (which a spaced-out letter may be)."""
        return self._one_letter_phrase_words

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

    # -- detection over one normalized view -------------------------------------------------------------

    def _spans(self, view: TextView) -> Iterator[_Span]:
        text = view.text
        for start, end, word in self._detections(text):
            yield (*view.original_span(start, end), word)

    def _detections(self, text: str) -> Iterator[tuple[int, int, str]]:
        for match in self._plain_re.finditer(text):
            yield from self._reported(match.start(), match.end(), match.group())
        if _LEET_RE.search(text):
            yield from self._leet_words(text)
        yield from self._spaced_out(text)
        yield from self._joined(text)
        yield from self._stretched(text)
        yield from self._glued(text)

    def _reported(self, start: int, end: int, matched: str) -> Iterator[tuple[int, int, str]]:
        word = self._word_for("".join(_WORD_RE.findall(matched)))
        if word is not None:
            yield start, end, word

    def _word_for(self, key: str) -> str | None:
        word = self._word_by_form.get(key)
        if word is not None:
            return word
        for stem in self._stems:
            if key.startswith(stem):
                return stem + STEM_MARK
        return None

    def _word_for_readings(self, letters: str) -> str | None:
        """The blocked word ``letters`` spells, read as written or as leetspeak (never a bare number)."""
        readings = [letters]
        if _LEET_RE.search(letters) and any(char.isalpha() for char in letters):
            readings += [letters.translate(_LEET_AS_I), letters.translate(_LEET_AS_L)]
        for reading in readings:
            word = self._word_for(reading)
            if word is not None:
                return word
        return None

    def _leet_words(self, text: str) -> Iterator[tuple[int, int, str]]:
        """Words holding digits or symbols, read as leetspeak: each word around a leet character once."""
        for match in _LEET_WORD_RE.finditer(text):
            start, end, token = match.start(), match.end(), match.group()
            if end - start > _LONGEST_CANDIDATE or not any(char.isalpha() for char in token):
                continue  # a number: "1337" is not a word
            unpunctuated = token.strip(_LEET_PUNCTUATION)
            bare = unpunctuated.strip(_LEET_PUNCTUATION + "0123456789")
            for written in dict.fromkeys((token, unpunctuated, bare)):
                offset = token.find(written)
                word = self._leet_reading(written)
                if word is not None:
                    yield start + offset, start + offset + len(written), word
                    break
        if self._phrase_re is not None:  # "k1ll yourself": phrases read as leetspeak too
            for table in (_LEET_AS_I, _LEET_AS_L):
                for match in self._phrase_re.finditer(text.translate(table)):
                    if _LEET_RE.search(text, match.start(), match.end()):
                        yield from self._reported(match.start(), match.end(), match.group())

    def _leet_reading(self, written: str) -> str | None:
        if not written:
            return None
        for reading in (written.translate(_LEET_AS_I), written.translate(_LEET_AS_L)):
            word = self._word_for(reading) or self._eight_reading(reading)
            if word is not None:
                return word
        return None

    def _spaced_out(self, text: str) -> Iterator[tuple[int, int, str]]:
        for run in _SPACED_OUT_RE.finditer(text):
            spelled = "".join(_SPACED_LETTER_RE.findall(text, run.start(), run.end()))
            for first, stop in _spaced_out_windows(spelled):
                word = self._word_for_readings(spelled[first:stop])
                if word is not None:
                    start = run.start() if first == 0 else _next_letter_start(text, run.start() + 1)
                    end = run.end() if stop == len(spelled) else _last_letter_end_before(text, run.end() - 1)
                    yield start, end, word
                    break

    def _eight_reading(self, reading: str) -> str | None:
        """The blocked word when "8" reads as "ate" ("h8", "h8ful") or "at" ("h8er", "h8ed")."""
        if "8" not in reading:
            return None
        return self._word_for(reading.replace("8", "ate")) or self._word_for(reading.replace("8", "at"))

    def _joined(self, text: str) -> Iterator[tuple[int, int, str]]:
        """A chunk without spaces whose letters, read without the punctuation, spell a blocked word."""
        for chunk in self._joined_re.finditer(text):
            start, end = chunk.span()
            letters = list(_SPACED_LETTER_RE.finditer(text, start, end))
            if len(letters) <= self._longest_candidate:
                word = self._word_for_readings("".join(letter.group() for letter in letters))
                if word is not None:
                    yield letters[0].start(), letters[-1].end(), word

    def _stretched(self, text: str) -> Iterator[tuple[int, int, str]]:
        """Words with a letter three times in a row ("haaate") or every letter doubled ("hhaattee"),
        compared with their repeats collapsed: "hatte" and "Hatter" (only some letters doubled) pass."""
        for pattern, whole_word in ((_TRIPLE_RE, False), (_PAIRS_RE, True)):
            position = 0
            while (hit := pattern.search(text, position)) is not None:
                start, end = _extent(text, hit.start(), hit.end(), str.isalnum, _WORD_END_RE)
                position = end
                if end - start > _LONGEST_CANDIDATE or (whole_word and (start, end) != hit.span()):
                    continue
                key = _collapsed(text[start:end])
                word = self._word_by_collapsed.get(key)
                if word is None:
                    word = next((stem + STEM_MARK for stem in self._stems if key.startswith(_collapsed(stem))), None)
                if word is not None:
                    yield start, end, word

    def _glued(self, text: str) -> Iterator[tuple[int, int, str]]:
        """A word made of blocked words and a few short words ("ihateyou", "hatehate")."""
        if self._anywhere_re is None:
            return
        seen: set[int] = set()
        for hit in self._anywhere_re.finditer(text):
            start, end = _word_around(text, hit.start(), hit.end())
            if start in seen or end - start > _LONGEST_GLUED_WORD or (hit.start(), hit.end()) == (start, end):
                continue
            seen.add(start)
            word = self._glued_word(text[start:end])
            if word is not None:
                yield start, end, word

    def _glued_word(self, token: str) -> str | None:
        """The first blocked word when ``token`` splits into blocked and glue words, else None."""
        # reachable[i]: a split of token[:i] exists; the blocked word it contains, or "" if none yet.
        reachable: dict[int, str] = {0: ""}
        for position in range(len(token)):
            if position not in reachable:
                continue
            for stem in self._stems:
                if token.startswith(stem, position):
                    return reachable[position] or stem + STEM_MARK  # a stem takes the rest of the word
            for stop in range(position + 1, min(len(token), position + self._longest_form + 8) + 1):
                piece = token[position:stop]
                if piece in self._glue_pieces:
                    found = reachable[position] or self._word_by_form.get(piece, "")
                    reachable.setdefault(stop, found)
                    if found and reachable[stop] == "":
                        reachable[stop] = found
        return reachable.get(len(token)) or None


def _leet_readings(letters: str) -> tuple[str, str, str]:
    return letters, letters.translate(_LEET_AS_I), letters.translate(_LEET_AS_L)


def _next_letter_start(text: str, position: int) -> int:
    letter = _SPACED_LETTER_RE.search(text, position)
    return len(text) if letter is None else letter.start()


def _last_letter_end_before(text: str, position: int) -> int:
    """One past the last spaced-out letter before ``position``."""
    position -= 1
    while position > 0 and not _SPACED_LETTER_RE.match(text, position):
        position -= 1
    return position + 1


def _word_around(text: str, start: int, end: int) -> tuple[int, int]:
    return _extent(text, start, end, str.isalnum)


def _extent(
    text: str, start: int, end: int, inside: Callable[[str], bool], end_re: re.Pattern[str] | None = None
) -> tuple[int, int]:
    """``start:end`` widened over the characters around it for which ``inside`` holds (``end_re``
    finds the end faster), going back at most _LONGEST_CANDIDATE characters: a longer extent comes
    back starting at 0, so the caller's length check drops it."""
    limit = max(0, start - _LONGEST_CANDIDATE)
    while start > limit and inside(text[start - 1]):
        start -= 1
    if start == limit and start > 0 and inside(text[start - 1]):
        start = 0
    if end_re is not None:
        found = end_re.match(text, end)
        end = end if found is None else found.end()
    else:
        while end < len(text) and inside(text[end]) and end - start <= _LONGEST_CANDIDATE:
            end += 1
    return start, end


def _collapsed(text: str) -> str:
    return _REPEATS_RE.sub(r"\1", text)


def _trie_pattern(words: Iterable[str]) -> str:
    """An alternation of ``words`` as a trie, so the regex engine never retries a shared prefix."""
    trie: dict[str, dict] = {}  # type: ignore[type-arg]
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = {}

    def build(node: dict) -> str:  # type: ignore[type-arg]
        branches = [re.escape(char) + build(child) for char, child in sorted(node.items()) if char]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return build(trie)


def _whole_word_regex(entries: Mapping[str, tuple[str, ...]], stems: Sequence[str]) -> re.Pattern[str]:
    """Every blocked form as a whole word (not touching another letter; digits may touch it: "hate99"),
    phrases with any non-letters (or nothing) between their words, stems followed by any letters."""
    alternatives: list[str] = []
    for parts in sorted((p for p in entries.values() if len(p) > 1), key=len, reverse=True):
        alternatives.append(r"[\W_]*".join(_trie_pattern(_inflected_forms(part)) for part in parts))
    single = [form for parts in entries.values() if len(parts) == 1 for form in _inflected_forms(parts[0])]
    if single:
        alternatives.append(_trie_pattern(single))
    if stems:
        alternatives.append(f"{_trie_pattern(stems)}{_LETTER}*")
    if not alternatives:
        return re.compile(r"(?!x)x")  # matches nothing
    return re.compile(rf"(?<!{_LETTER})(?:{'|'.join(alternatives)})(?!{_LETTER})")


# -- the text as matched: decoded, in display order, normalized ---------------------------------------------


@dataclass(frozen=True)
class TextView:
    """One reading of a text as the detectors see it (``text_views``), mapped back to the original."""

    original: str
    text: str  # normalized
    starts: Sequence[int] | None  # first original index behind each character of ``text``; None: same index
    ends: Sequence[int] | None  # one past the last original index behind it
    ordered: bool = True  # ``starts`` never goes down (False in display order, where runs are reversed)

    def original_span(self, start: int, end: int) -> tuple[int, int]:
        if self.starts is None or self.ends is None:
            original_start, original_end = start, end
        else:
            original_start, original_end = min(self.starts[start:end]), max(self.ends[start:end])
        # Trailing accents belong to the last letter; leaving them would stack them on the replacement.
        while original_end < len(self.original) and _is_combining_mark(self.original[original_end]):
            original_end += 1
        return original_start, original_end


_Mapped = tuple[str, list[int] | None, list[int] | None]


def text_views(original: str, decoded: _Mapped | None = None, filler: str = "") -> list[TextView]:
    """The text as matched: decoded and normalized; plus, with a right-to-left override, in the order
    it is displayed. ``decoded``: ``_decoded(original)``, when the caller has it already. ``filler``:
    text put before each view (mapped to the original's start), standing for what precedes the text."""
    if decoded is None:
        decoded = _decoded(original)
    views = [_normalized(original, *decoded)]
    if _RIGHT_TO_LEFT_OVERRIDE in decoded[0]:
        views.append(replace(_normalized(original, *_display_order(*decoded)), ordered=False))
    return [_after_filler(view, filler) for view in views] if filler else views


def _after_filler(view: TextView, filler: str) -> TextView:
    size = len(view.text)
    starts = list(range(size)) if view.starts is None else list(view.starts)
    ends = list(range(1, size + 1)) if view.ends is None else list(view.ends)
    zeros = [0] * len(filler)
    return TextView(view.original, filler + view.text, zeros + starts, zeros + ends, view.ordered)


def _decoded(text: str) -> _Mapped:
    if "%" not in text and "&" not in text:
        return text, None, None
    if not any(_decode_one(match) is not None for match in _ENCODED_RE.finditer(text)):
        return text, None, None
    starts, ends = list(range(len(text))), list(range(1, len(text) + 1))
    for _ in range(_DECODE_ROUNDS):
        pieces: list[str] = []
        new_starts: list[int] = []
        new_ends: list[int] = []
        cursor = 0
        for match in _ENCODED_RE.finditer(text):
            char = _decode_one(match)
            if char is None:
                continue
            pieces.append(text[cursor : match.start()])
            new_starts += starts[cursor : match.start()]
            new_ends += ends[cursor : match.start()]
            pieces.append(char)
            new_starts += [starts[match.start()]] * len(char)
            new_ends += [ends[match.end() - 1]] * len(char)
            cursor = match.end()
        if cursor == 0:
            break
        pieces.append(text[cursor:])
        text = "".join(pieces)
        starts, ends = new_starts + starts[cursor:], new_ends + ends[cursor:]
    return text, starts, ends


def _decode_one(match: re.Match[str]) -> str | None:
    percent, decimal, hexadecimal, name = match.groups()
    if percent is not None:
        code = int(percent, 16)
        return chr(code) if 0x20 <= code < 0x7F else None
    if name is not None:
        return html.entities.html5.get(name)
    code = int(decimal, 10) if decimal is not None else int(hexadecimal, 16)
    if 0 < code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF:
        return chr(code)
    return None


def _display_order(text: str, starts: list[int] | None, ends: list[int] | None) -> _Mapped:
    """Each right-to-left override run (to its pop, isolate end or line end) reversed, as displayed,
    and set apart by a space on each side (standing for the override and its end), so that no word
    runs from inside a reversed run to the text around it."""
    order: list[int] = []  # indexes into text; -1 and -2 stand for the spaces before and after a run
    anchors: list[int] = []  # for each space, the index of the character it stands for
    position = 0
    while (override := text.find(_RIGHT_TO_LEFT_OVERRIDE, position)) != -1:
        stop = override + 1
        while stop < len(text) and text[stop] not in _OVERRIDE_ENDS:
            stop += 1
        order += range(position, override)
        order.append(-1)
        anchors.append(override)
        order += reversed(range(override + 1, stop))
        order.append(-1)
        anchors.append(min(stop, len(text) - 1))
        position = stop
    order += range(position, len(text))
    chars, new_starts, new_ends = [], [], []
    spaces = iter(anchors)
    for index in order:
        char = text[index] if index >= 0 else " "
        index = index if index >= 0 else next(spaces)
        chars.append(char)
        new_starts.append(index if starts is None else starts[index])
        new_ends.append(index + 1 if ends is None else ends[index])
    return "".join(chars), new_starts, new_ends


def _normalized(original: str, text: str, starts: list[int] | None, ends: list[int] | None) -> TextView:
    if text.isascii():
        return TextView(original, text.lower(), starts, ends)
    # Each distinct character is normalized once (real text repeats few), then the text is translated
    # in one pass; only characters that become zero or several characters move the offsets.
    table: dict[int, str] = dict(_ASCII_LOWER)
    uneven: list[str] = []
    for char in set(text):
        if not char.isascii():
            piece = table[ord(char)] = _normalize_char(char)
            if len(piece) != 1:
                uneven.append(char)
    if not uneven:
        return TextView(original, text.translate(table), starts, ends)
    if starts is None or ends is None:
        starts, ends = list(range(len(text))), list(range(1, len(text) + 1))
    pieces: list[str] = []
    new_starts: list[int] = []
    new_ends: list[int] = []
    cursor = 0
    for match in re.finditer("[" + re.escape("".join(uneven)) + "]", text):
        index = match.start()
        pieces.append(text[cursor:index].translate(table))
        new_starts += starts[cursor:index]
        new_ends += ends[cursor:index]
        piece = table[ord(match.group())]
        pieces.append(piece)
        new_starts += [starts[index]] * len(piece)
        new_ends += [ends[index]] * len(piece)
        cursor = index + 1
    pieces.append(text[cursor:].translate(table))
    new_starts += starts[cursor:]
    new_ends += ends[cursor:]
    return TextView(original, "".join(pieces), new_starts, new_ends)


_ASCII_LOWER: Mapping[int, str] = MappingProxyType({code: chr(code).lower() for code in range(ord("A"), ord("Z") + 1)})


def _normalize_char(char: str) -> str:
    if char.isascii():
        return char.lower()
    normalized: list[str] = []
    for compatible in unicodedata.normalize("NFKC", char):
        capital_lookalike = _CAPITAL_HOMOGLYPHS.get(compatible)
        if capital_lookalike is not None:
            normalized.append(capital_lookalike)
            continue
        folded = compatible.casefold()
        variant = _LATIN_VARIANTS.get(folded)
        if variant is not None:
            normalized.append(variant)
            continue
        for part in unicodedata.normalize("NFD", folded):
            if unicodedata.category(part) not in _INVISIBLE_CATEGORIES:
                normalized.append(_LOWERCASE_HOMOGLYPHS.get(part, _LATIN_VARIANTS.get(part, part)))
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


# A phrase's forms are every combination of its words' forms; past this many only the base words count.
_MAX_PHRASE_FORMS = 4096


def _index_forms(entries: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """Every form of every entry, its words joined without spaces ("killyourself"), mapped to the entry."""
    word_by_form: dict[str, str] = {}
    for word, parts in entries.items():
        choices = [sorted(_inflected_forms(part)) for part in parts]
        combinations = 1
        for forms in choices:
            combinations *= len(forms)
        if combinations > _MAX_PHRASE_FORMS:
            choices = [[part] for part in parts]
        for combination in product(*choices):
            word_by_form.setdefault("".join(combination), word)
    for word, parts in entries.items():
        # When an inflection of one entry is itself an entry ("hater"), report the entry itself.
        word_by_form["".join(parts)] = word
    return word_by_form


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


def _merge_into_matches(spans: list[_Span]) -> list[FilterMatch]:
    matches: list[FilterMatch] = []
    for start, end, word in sorted(spans, key=lambda span: (span[0], -span[1])):
        if matches and start < matches[-1].end:
            # Overlapping detections (a phrase and one of its words, a leet and a plain reading)
            # become one span so that redaction removes everything that was flagged.
            previous = matches[-1]
            if end > previous.end:
                matches[-1] = FilterMatch(previous.word, previous.start, end)
            continue
        matches.append(FilterMatch(word, start, end))
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
    later text could still turn into a match, or change one, is held until more text arrives or the
    stream ends. That is read off the text as the whole-text check sees it (decoded, in display order,
    normalized: ``text_views``), at the text's end and wherever later text can still change how earlier
    text reads (an encoding not complete yet, a right-to-left override not ended yet), and is the earliest of:

    * the chunk without spaces the text ends in, when it is short enough to spell a blocked word joined
      by punctuation ("ha-" + "te"), else the word it ends in, however long (a stem entry such as
      "violen*" matches a word of any length), leetspeak symbols included ("k!" + "ll", "h@" + "te");
    * that word and the words before it that a multi-word entry could still begin with ("kill" + " your"
      + "self"), however far apart they are;
    * a trailing run of spaced-out single letters ("h          a          t"), from its first letter,
      however long its gaps: the whole-text check matches such runs at any width, so the stream must too;
      and a hold that falls inside such a run starts at the run's first letter instead.

    Every detector but spaced-out runs and multi-word entries reads one chunk without spaces of the
    normalized text, so nothing before these points can change whether it matches: the stream shows
    exactly what the final whole-text check would let through, one word behind the generation (not a
    fixed-width tail).

    Only a window around the unsent text is re-scanned on each push. A long run is not held whole once
    it can no longer match however it goes on: a word of ``ContentFilter.long_word`` letters or more that
    does not begin with a stem (every other detector skips such words), a word of letters, digits and
    leetspeak symbols that long (only the pieces at its end are held: its last letters, a short
    alphanumeric word, a spaced-out run still live), or a spaced-out run spelling ``long_spelling``
    letters without beginning with a stem. Its settled part is sent, and the next window starts inside
    the run (``_floor``, at a point no encoding, override or match crosses), after a filler of the same
    kind (a long word, or spaced-out letters, made of a letter in no blocked word) that stands for the
    run before it: read from there, every detector decides as it does on the whole text. A word that long
    beginning with a stem is decided too (one match from its first letter to its end, however it goes on):
    its redaction is sent, and later windows start inside it after a stemmed filler, their match going on
    from the window's start is the same one (``_redact`` sends no second redaction for it). So the cost of
    a push does not grow with the length of the output, even without spaces.
    """

    def __init__(
        self, content_filter: ContentFilter, action: str, holdback: int | None = None, *, stop_at_match: bool = False
    ) -> None:
        self._filter = content_filter
        self._reject = action == "reject"
        # Structured output (tool calls, JSON): the text before the first match is sent and nothing after
        # it (``stopped``), instead of a "[redacted]" that could break the output's schema.
        self._stop_at_match = stop_at_match
        self.stopped = False
        # Context re-scanned before the unsent text on each push (matches are whole words or runs, so the
        # longest entry spelled out with separators is enough).
        self._holdback = holdback if holdback is not None else content_filter.streaming_holdback
        self._text = ""
        self._sent_upto = 0
        self.matched = False
        self.first_match_start: int | None = None  # where the first redacted match began in the raw text
        # Right-to-left overrides, written or encoded ("&#8238;"), in the text up to ``_overrides_upto``
        # (just after a whitespace, or the floor: later text cannot change how the text before it
        # decodes), where each starts, and the one still open there; plus those after it, found again on
        # each push.
        self._overrides: list[int] = []
        self._overrides_upto = 0
        self._open_override_upto: int | None = None
        self._tail_overrides: list[int] = []
        # Where a window may start whatever comes later (the text's start, or a point inside a long run
        # that can no longer match), and the filler that stands for the run before it. ``_inside_run``:
        # the text sent ends inside such a run, so the next window starts there.
        self._floor = 0
        self._filler = ""
        self._inside_run = False
        letter = content_filter.filler_letter
        self._letter = letter or ""

    @property
    def released(self) -> int:
        """Characters of the raw text decided so far (sent, or replaced by the redaction)."""
        return self._sent_upto

    def push(self, delta: str) -> str:
        """Add text; return what is safe to send now (redacted). Raises ContentRejectedError on a match
        when the action is ``reject``."""
        self._text += delta
        if self.stopped:
            return ""
        reading = self._read()
        hold, relaxed = self._hold_start(reading, relax=bool(self._letter))
        cut = self._cut_before(hold, reading) if relaxed else None
        end, decided = self._decided(hold, reading)
        if relaxed and (cut is None or end < cut[0]):
            # No window could start inside the run sent: hold it whole, as if it could still match.
            cut = None
            end, decided = self._decided(self._hold_start(reading, relax=False)[0], reading)
        sent_before = self._sent_upto
        released = self._send(end, decided)
        if cut is not None:
            self._floor, self._filler = cut
            self._inside_run = True
        elif self._sent_upto > sent_before:
            self._inside_run = False
        return released

    def finish(self) -> str:
        if self.stopped or len(self._text) <= self._sent_upto:
            return ""
        return self._send(*self._decided(len(self._text), self._read()))

    # -- what is read ------------------------------------------------------------------------------------

    def _read(self) -> _Reading:
        """The window re-scanned on this push, decoded once: the same decoding gives the window's views
        and the right-to-left overrides after ``_overrides_upto``."""
        self._commit_overrides()
        text, settled = self._text, self._overrides_upto
        start = self._scan_start([])
        if start <= settled:  # every override before the window is settled already
            decoded = _decoded(text[start:])
            tail, open_override = self._overrides_after(decoded, start)
        else:  # an override after the settled text may move the window's start back
            settled_decoded = _decoded(text[settled:])
            tail, open_override = self._overrides_after(settled_decoded, settled)
            start = self._scan_start(tail)
            decoded = settled_decoded if start == settled else _decoded(text[start:])
        self._tail_overrides = tail
        filler = self._filler if start == self._floor else ""
        return _Reading(start, text_views(text[start:], decoded, filler), open_override, filler)

    def _commit_overrides(self) -> None:
        """Moves ``_overrides_upto`` on to the last point before which later text cannot change how the
        text decodes (after the last whitespace, or the floor), recording the overrides up to it."""
        text, upto = self._text, self._overrides_upto
        boundary = max(upto, self._floor)
        space = _THROUGH_LAST_SPACE_RE.match(text, boundary)
        if space is not None:
            boundary = space.end()
        if boundary > upto:
            self._open_override_upto = self._scan_overrides(upto, boundary, self._open_override_upto, self._overrides)
            self._overrides_upto = boundary

    def _overrides_after(self, decoded: _Mapped, offset: int) -> tuple[list[int], int | None]:
        """The overrides from ``_overrides_upto`` on in ``decoded`` (the text from ``offset``, decoded),
        and where the last one starts if it has not ended."""
        text, starts, _ = decoded
        skip = self._overrides_upto - offset
        first = skip if starts is None else bisect.bisect_left(starts, skip)
        found: list[int] = []
        position = text.find(_RIGHT_TO_LEFT_OVERRIDE, first)
        while position != -1:
            found.append(offset + (position if starts is None else starts[position]))
            position = text.find(_RIGHT_TO_LEFT_OVERRIDE, position + 1)
        last_end = max(text.rfind(end, first) for end in _OVERRIDE_ENDS)
        if found and text.rfind(_RIGHT_TO_LEFT_OVERRIDE, first) > last_end:
            return found, found[-1]
        return found, None if last_end != -1 else self._open_override_upto

    def _scan_overrides(self, start: int, stop: int, open_at: int | None, found: list[int]) -> int | None:
        """Adds the overrides in ``text[start:stop]`` (decoded) to ``found``; the override still open at
        ``stop`` given the one open at ``start``."""
        segment = self._text[start:stop]
        if open_at is None and _RIGHT_TO_LEFT_OVERRIDE not in segment and not _ENCODING_START_RE.search(segment):
            return None  # the common case: no override, and nothing to decode into one
        decoded, starts, _ = _decoded(segment)
        position = decoded.find(_RIGHT_TO_LEFT_OVERRIDE)
        while position != -1:
            found.append(start + (position if starts is None else starts[position]))
            position = decoded.find(_RIGHT_TO_LEFT_OVERRIDE, position + 1)
        last_override = decoded.rfind(_RIGHT_TO_LEFT_OVERRIDE)
        last_end = max(decoded.rfind(end) for end in _OVERRIDE_ENDS)
        if last_override > last_end:
            return found[-1]
        return None if last_end != -1 else open_at

    def _scan_start(self, tail_overrides: list[int]) -> int:
        """Where the re-scanned window begins: enough context before the unsent text for every match that
        reaches into it, and for every encoding and override that changes how it reads; never before the
        floor, which no match, encoding or open override crosses."""
        floor = self._floor
        if self._inside_run:
            return floor
        window_start = self._chunk_start_before(self._sent_upto - self._holdback)
        # Text sent before may still decode together with what follows ("%68" sent, then "ate").
        encoded_from = max(floor, self._sent_upto - self._filter.longest_chunk * ENCODED_CHAR_MAX)
        encoded = _ENCODING_START_RE.search(self._text, encoded_from, self._sent_upto)
        if encoded is not None:
            window_start = min(window_start, self._chunk_start_before(encoded.start()))
        # A right-to-left override before the window changes how the window's text reads.
        overrides = self._overrides + tail_overrides if tail_overrides else self._overrides
        before = bisect.bisect_left(overrides, window_start)
        if before:
            override = overrides[before - 1]
            between = self._text[override:window_start]
            if not any(end in between for end in _OVERRIDE_ENDS) or window_start - override < self._holdback:
                window_start = self._chunk_start_before(override)
        return max(window_start, floor)

    def _chunk_start_before(self, position: int) -> int:
        """``position`` moved back to the start of its word, and on to the start of its chunk without
        spaces when that chunk is short enough to hold a blocked word joined by punctuation (not before
        the floor: the caller never starts a window before it)."""
        text = self._text
        position = _word_start_before(text, max(position, self._floor), self._floor)
        limit = max(0, position - self._filter.longest_chunk)
        start = position
        while start > limit and not text[start - 1].isspace():
            start -= 1
        return start if start == 0 or text[start - 1].isspace() else position

    # -- what to hold ------------------------------------------------------------------------------------

    def _hold_start(self, reading: _Reading, *, relax: bool) -> tuple[int, bool]:
        """Where the text that later text could still make part of a match begins (read from the window's
        start on: the text before it is sent, so a hold reaching back that far holds everything unsent);
        and whether a long run that can no longer match was let go (``relax``: only with a single view,
        no override open)."""
        text, window = self._text, reading.start
        # Points where later text continues what is there: the end, an encoding that is not complete
        # yet ("%6" + "8"), and a right-to-left override that has not ended (later text displays at it).
        cuts = [len(text)]
        encoding = _open_encoding_start(text)
        if encoding is not None:
            cuts.append(encoding)
        if reading.open_override is not None:
            cuts.append(reading.open_override)
        relax = relax and len(reading.views) == 1 and reading.open_override is None
        hold, relaxed = len(text), False
        for view in reading.views:
            for cut in cuts:
                index = _view_index(view, cut - window)
                reading.stemmed_end = False
                held, let_go = self._tail_hold(view.text, index, reading, relax=relax)
                relaxed = relaxed or let_go
                start = window + _view_start(view, held, len(text) - window)
                if reading.stemmed_end and held == index > 0:
                    # Invisible characters after a stemmed word's last letter may go on inside it.
                    start = window + view.original_span(index - 1, index)[1]
                hold = min(hold, cut, start)
        return hold, relaxed

    def _tail_hold(self, text: str, end: int, reading: _Reading, *, relax: bool) -> tuple[int, bool]:
        """Where, in ``text[:end]`` (a normalized view), a match that text after ``end`` could still
        complete or change may start; 0 when that may be before ``text`` begins. And whether a long run
        that can no longer match was let go (``relax``)."""
        if relax:
            held = self._long_word_hold(text, end, reading)
            if held is not None:
                return held, True
        limit = max(3, self._filter.longest_chunk)
        chunk = _run_start(text, end, _is_not_space, limit + 1)
        if end - chunk > limit:  # too long to spell a word joined by punctuation
            chunk = end
        # The word the text ends in (every detector but runs and phrases stays inside it), and the
        # complete words before it that a multi-word entry may begin with, counted in each reading: a
        # leetspeak symbol between two words is a separator as written ("kill | yourself") and a word
        # of its own read as a letter ("kill i yourself"), and it joins pieces into one word ("k!ll").
        complete = self._filter.longest_phrase - 1
        words = min(_words_start(text, end, complete, str.isalnum), _words_start(text, end, complete, _is_leet_letter))
        spaced = _spaced_run_start(text, end, end)
        if relax and spaced < end and self._dead_spaced_run(text, spaced, end, reading):
            return min(chunk, words), True
        held = min(chunk, words, spaced)
        if held < end and _is_word_or_leet_char(text[held]) and _is_lone_before(text, held, end):
            # Never inside a spaced-out run: the re-scan window starts shortly before the unsent text, and
            # the end of a run seen without its start may spell a word the whole run does not ("x h a t e").
            held = _spaced_run_start(text, held + 1, end)
        return held, False

    def _long_word_hold(self, text: str, end: int, reading: _Reading) -> int | None:
        """The hold when ``text[:end]`` ends in a word of letters, digits and leetspeak symbols at least
        ``long_word`` long (no leetspeak, stretched, glued or joined reading matches it, however it goes
        on): only the live pieces at its end are held, namely its last run of letters if short enough to
        be a form or begun with a stem, its last alphanumeric word if short enough to be read whole, its
        last letters read as leetspeak if a multi-word entry may end there, and a live spaced-out run.
        None when the text does not end in such a word."""
        long_word = self._filter.long_word
        if end <= long_word and not reading.filler:
            return None  # the common case: a window too short to hold a long word
        word = end - _matched_length(_LEET_WORD_BACK_RE, text[max(0, end - long_word - 1) : end][::-1])
        if not self._is_long(word, end, reading):
            return None
        backwards = text[:end][::-1]
        held = end
        alphanumeric = end - _matched_length(_ALNUM_BACK_RE, backwards)
        if not self._is_long(alphanumeric, end, reading):
            held = _words_start(text, end, self._filter.longest_phrase - 1, str.isalnum)
        else:
            # Letters after a digit, or the whole long word: a plain match only if short or a stemmed word.
            # A long stemmed word is decided: a match from its first letter to its last, however it goes
            # on (no other detector reads a word that long), so it is redacted now and what follows is
            # read after a stemmed filler (``_filler_at``), not held.
            letters = end - _matched_length(_LETTERS_BACK_RE, backwards)
            short = not self._is_long(letters, end, reading)
            live = end - letters <= self._filter.longest_form or self._filter.begins_with_stem(text[letters:end])
            if letters < end and short and live:
                held = letters
            reading.stemmed_end = letters < end and not short and live
        if self._filter.longest_phrase > 1:  # "k1llyourself": the letters a multi-word entry may end in
            leet = end - _matched_length(_LEET_LETTERS_BACK_RE, backwards)
            if end - leet <= self._filter.longest_form:
                held = min(held, leet)
        spaced = _spaced_run_start(text, end, end)
        if spaced < end and not self._dead_spaced_run(text, spaced, end, reading):
            held = min(held, spaced)
        return held

    def _is_long(self, start: int, end: int, reading: _Reading) -> bool:
        """Whether the word ``text[start:end]`` of a view is at least ``long_word`` long: measured when its
        start is known, and always when it reaches back into a filler word."""
        if start == 0:
            measured = reading.start == 0 and not reading.filler
            return self._filler_is_word(reading) or (measured and end >= self._filter.long_word)
        return end - start >= self._filter.long_word

    def _filler_is_word(self, reading: _Reading) -> bool:
        """Whether the window's filler is a long word (spaced-out filler letters alternate with a separator;
        a stemmed filler begins with a stem, which never holds the filler letter)."""
        return len(reading.filler) > 1 and (reading.filler[1] == self._letter or self._filler_is_stemmed(reading))

    def _filler_is_stemmed(self, reading: _Reading) -> bool:
        """Whether the window's filler is a long stemmed word: the window starts inside a stemmed word
        redacted already, whose match goes on from the window's start (``_redact`` sends it no more)."""
        return bool(reading.filler) and reading.filler[0] != self._letter

    def _dead_spaced_run(self, text: str, start: int, end: int, reading: _Reading) -> bool:
        """Whether the spaced-out run ``text[:end]`` ends in (its first letter at or after ``start``, from
        ``_spaced_run_start``) already spells too many letters to match, without beginning with a stem."""
        if start == 0 and not (reading.start == 0 and not reading.filler):
            return bool(reading.filler) and not self._filler_is_word(reading)  # it goes on from the floor's run
        runs = list(_SPACED_OUT_RE.finditer(text, start, end))
        if not runs or _SPACED_LETTER_RE.search(text, runs[-1].end(), end) is not None:
            return False  # the letters it ends in are not (yet) a run
        spelled = "".join(_SPACED_LETTER_RE.findall(text, runs[-1].start(), runs[-1].end()))
        if runs[-1].end() == end:
            spelled = spelled[:-1]  # its last letter may not stay single
        return not self._filter.may_spell_match(spelled)

    # -- where a later window may start ------------------------------------------------------------------

    def _cut_before(self, hold: int, reading: _Reading) -> tuple[int, str] | None:
        """The last point after the floor, at or before ``hold``, where a later window may start: inside a
        long run that can no longer match, where no encoding joins characters on both sides (the window
        has no override). With the filler that stands for the run before it; None if none is near."""
        view, text, window = reading.views[0], self._text, reading.start
        lowest = max(self._floor + 1, window + 1, hold - _CUT_SEARCH)
        for position in range(min(hold, len(text)), lowest - 1, -1):
            index = _view_index(view, position - window)
            if index < len(view.text) and view.starts is not None and view.starts[index] != position - window:
                continue  # inside what one character of the view is read from
            filler = self._filler_at(view.text, index, reading)
            if filler is not None and _decode_separable(text, position):
                return position, filler
        return None

    def _filler_at(self, text: str, index: int, reading: _Reading) -> str | None:
        """The filler for a window starting at ``index`` of a view: a long word of the filler letter inside
        a long word that can no longer match, or spaced-out filler letters at a single letter of a
        spaced-out run that can no longer match; None where a window may not start."""
        if index == 0:
            return None
        before = text[index - 1]
        if _is_letter(before):
            start = index - _matched_length(_LETTERS_BACK_RE, text[:index][::-1])
            stop = index + _matched_length(_LETTERS_RE, text, index)
            if start == 0 and self._filler_is_word(reading):
                return reading.filler if self._filler_is_stemmed(reading) else self._letter * self._filter.long_word
            known = start > 0 or (reading.start == 0 and not reading.filler)
            if known and stop - start >= self._filter.long_word:
                # A long stemmed word (redacted whole as this push sends it) goes on after its stem.
                stem = self._filter.stem_beginning(text[start:stop])
                return (stem or "") + self._letter * self._filter.long_word
            return None
        if before in _LEET_CUT_SYMBOLS and (self._filter.longest_phrase == 1 or self._no_phrase_across(text, index)):
            return self._leet_word_filler(text, index, reading)
        if index + 1 >= len(text) or self._filter.has_one_letter_phrase_words:
            return None
        letter, after = text[index], text[index + 1]
        # A single letter, one word in every reading ("x!" reads "xi"), after a plain separator.
        if not _is_word_or_leet_char(letter) or after.isalnum() or after in _LEET_LETTER_SYMBOLS:
            return None
        if not (before.isspace() or (before not in _LEET_LETTER_SYMBOLS and before != "_" and not before.isalnum())):
            return None
        if not before.isspace() and not self._in_long_chunk(text, index, reading):
            return None
        run = _spaced_run_start(text, index + 1, len(text))
        if run > index or not self._dead_spaced_run(text, run, index + 1, reading):
            return None
        size = (
            self._filter.long_spelling
            if before.isspace()
            else max(self._filter.long_spelling, self._filter.longest_chunk // 2 + 2)
        )
        return (self._letter + before) * size

    def _leet_word_filler(self, text: str, index: int, reading: _Reading) -> str | None:
        """The filler for a window starting at ``index`` of a view, after a digit or a leetspeak symbol in
        a long word of letters, digits and leetspeak symbols ("h4t3a1b2x!y!..."), which no detector reads
        whole: a long word of the filler letter ending in the same character, so that every detector
        reads what follows as on the whole text. With multi-word entries (which read leetspeak symbols
        as separators) only where none of their matches crosses ``index`` (``_no_phrase_across``); and
        only where no spaced-out run, alphanumeric word or run of letters goes on across ``index``."""
        before = text[index - 1]
        if index < 3 or not (text[index - 2].isalnum() and (before.isalnum() or text[index - 3].isalnum())):
            return None  # the character before may be a spaced-out letter, or one beside a separator
        word = index - _matched_length(_LEET_WORD_BACK_RE, text[:index][::-1])
        if not self._is_long(word, index, reading):
            return None
        after = text[index] if index < len(text) else "a"  # what comes next is not known: say a letter
        if before.isalnum() and after.isalnum():
            alphanumeric = index - _matched_length(_ALNUM_BACK_RE, text[:index][::-1])
            if not self._is_long(alphanumeric, index, reading):
                return None  # an alphanumeric word short enough to be read whole goes on
        if _is_letter(before) and _is_letter(after):
            return None  # a run of letters goes on (the letter filler's case)
        return self._letter * self._filter.long_word + before

    def _no_phrase_across(self, text: str, index: int) -> bool:
        """Whether no multi-word entry's match, as written or read as leetspeak, crosses ``index`` of a
        view (they read leetspeak symbols as separators, and as letters, so any may be inside one).
        No match holds a digit that no reading makes a letter (``_PHRASE_BARRIERS``, unless an entry
        holds digits): the stretch between two of them, both known, is read as the whole text reads it."""
        if self._filter.has_entry_digits:
            return False
        limit = self._filter.long_word
        left = _run_start(text, index, _is_not_phrase_barrier, limit) - 1
        right = index + _matched_length(_NOT_PHRASE_BARRIERS_RE, text[index : index + limit + 1])
        if left < 0 or text[left] not in _PHRASE_BARRIERS or right >= len(text) or right - index > limit:
            return False
        return not self._filter.crosses_match(text[left + 1 : right], index - left - 1)

    def _in_long_chunk(self, text: str, index: int, reading: _Reading) -> bool:
        """Whether the chunk without spaces ``text[:index]`` ends in is too long to spell a word joined by
        punctuation (so a window starting at ``index`` after a filler chunk reads it the same)."""
        limit = max(3, self._filter.longest_chunk)
        start = _run_start(text, index, _is_not_space, limit + 1)
        if start == 0:
            filler_chunk = bool(reading.filler) and not any(char.isspace() for char in reading.filler)
            return filler_chunk or (reading.start == 0 and not reading.filler and index > limit)
        return index - start > limit

    # -- what to send ------------------------------------------------------------------------------------

    def _decided(self, end: int, reading: _Reading) -> tuple[int, list[tuple[int, int]]]:
        """``end`` moved back so as not to cut a match, and the matches in the text to send up to it."""
        if end <= self._sent_upto:
            return end, []  # nothing to send: no need to look for matches
        if reading.matches is None:
            window = reading.start
            reading.matches = [
                (m.start + window, m.end + window)
                for m in self._filter.find_in_views(reading.views)
                if m.end + window > self._sent_upto
            ]
        for start, stop in reading.matches:
            if start < end < stop:
                end = start  # never send part of a match
        return end, [m for m in reading.matches if m[0] < end]

    def _send(self, end: int, decided: list[tuple[int, int]]) -> str:
        """Sends the text up to ``end``, with the ``decided`` matches in it redacted."""
        if self.stopped or end <= self._sent_upto:
            return ""
        if self._stop_at_match and decided:
            return self._stop(min(start for start, _ in decided))
        released = self._redact(self._sent_upto, end, decided)
        self._sent_upto = end
        return released

    def _stop(self, match_start: int) -> str:
        """The first match ends the stream: release what precedes it (or reject), then nothing more."""
        self.matched = True
        self.first_match_start = max(match_start, self._sent_upto)
        if self._reject:
            raise ContentRejectedError("The generated text was withheld by the content filter.")
        released = self._text[self._sent_upto : self.first_match_start]
        self._sent_upto = self.first_match_start
        self.stopped = True
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
            # A window after a stemmed filler: the stemmed word's match goes on from the floor, and its
            # redaction was sent with its start (``_long_word_hold``).
            continued = match_start == self._floor <= start and self._filler[:1] not in ("", self._letter)
            pieces += [self._text[cursor : max(cursor, match_start)], "" if continued else REDACTION]
            cursor = max(cursor, match_end)
        pieces.append(self._text[cursor:end])
        return "".join(pieces)


@dataclass
class _Reading:
    """One push's reading of the stream: the window re-scanned (from ``start``, after ``filler``), its
    views, the right-to-left override still open at the text's end, and (once found) the window's
    matches that reach past the text sent."""

    start: int
    views: list[TextView]
    open_override: int | None
    filler: str
    matches: list[tuple[int, int]] | None = None
    # Set while holding: the view read ends in a long stemmed word, decided (``_long_word_hold``).
    stemmed_end: bool = False


# What may end the text before a window that starts inside a long word of letters, digits and leetspeak
# symbols: a digit or a symbol that is never a spaced-out letter ("@" and "$" may be).
_LEET_CUT_SYMBOLS = frozenset("0123456789!|+€")
# Digits that no leetspeak reading makes a letter: inside no multi-word entry's match, in any reading
# (unless an entry holds digits).
_PHRASE_BARRIERS = frozenset("0123456789") - frozenset(_LEET_SYMBOLS)
_NOT_PHRASE_BARRIERS_RE = re.compile(f"[^{''.join(sorted(_PHRASE_BARRIERS))}]*")


def _is_not_phrase_barrier(char: str) -> bool:
    return char not in _PHRASE_BARRIERS


# Candidates tried, back from the hold, for where a later window may start inside a long run.
_CUT_SEARCH = 64
_THROUGH_LAST_SPACE_RE = re.compile(r".*\s", re.DOTALL)
# The runs a view's text ends in, matched on the text reversed: leetspeak words (letters, digits and the
# symbols read as letters), alphanumeric words, letters, and letters once leetspeak is read.
_LEET_WORD_BACK_RE = re.compile(r"(?:[^\W_]|[@$!|+€])*")
_ALNUM_BACK_RE = re.compile(r"[^\W_]*")
_LETTERS_BACK_RE = re.compile(r"[^\W\d_]*")
_LETTERS_RE = _LETTERS_BACK_RE
_LEET_LETTERS_BACK_RE = re.compile(rf"(?:[^\W\d_]|[{re.escape(_LEET_SYMBOLS)}])*")
# The longest text ``_ENCODED_RE`` matches: "&" + a 32-character entity name + ";".
_LONGEST_ENCODED_MATCH = 34


def _is_letter(char: str) -> bool:
    """A letter as the whole-word match reads it (``[^\\W\\d_]``)."""
    return char.isalnum() and not char.isdecimal()


def _matched_length(pattern: re.Pattern[str], text: str, position: int = 0) -> int:
    match = pattern.match(text, position)
    return 0 if match is None else match.end() - position


# Leetspeak symbols that read as letters: in some reading they are part of a word ("k!ll", "h@te").
_LEET_LETTER_SYMBOLS = frozenset("@$!|+€")
# Every character an encoded character can be written with ("%68", "&#x68;", "&amp;#104;"), and the most
# of them one encoded character takes over the decoding rounds ("&amp;amp;" and a 32-letter entity name).
_ENCODING_CHARS = frozenset("%&#;0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_LONGEST_ENCODING = 64
# The most text before a cut that ``_layers_separable`` decodes to tell whether encodings cross it.
_LAYERED_SPAN_MAX = 2048
_NOT_ENCODING_RE = re.compile(r"[^%&#;0-9A-Za-z]")


def _is_not_space(char: str) -> bool:
    return not char.isspace()


def _is_leet_letter(char: str) -> bool:
    """A letter or digit, or a symbol that leetspeak reads as a letter."""
    return char.isalnum() or char in _LEET_LETTER_SYMBOLS


def _run_start(text: str, end: int, inside: Callable[[str], bool], limit: int | None = None) -> int:
    """Where the run of characters for which ``inside`` holds that ``text[:end]`` ends in begins (looking
    back at most ``limit`` characters)."""
    lowest = 0 if limit is None else max(0, end - limit)
    start = end
    while start > lowest and inside(text[start - 1]):
        start -= 1
    return start


def _words_start(text: str, end: int, count: int, is_letter: Callable[[str], bool]) -> int:
    """Where the word ``text[:end]`` ends in (if it ends in one) and the ``count`` words before it begin,
    a word being a run of characters for which ``is_letter`` holds."""
    position = _run_start(text, end, is_letter)
    for _ in range(max(0, count)):
        while position > 0 and not is_letter(text[position - 1]):
            position -= 1
        position = _run_start(text, position, is_letter)
    return position


def _spaced_run_start(text: str, stop: int, end: int) -> int:
    """The first letter of the spaced-out run ``text[:stop]`` ends in (single letters in ``text[:end]``
    with anything but a longer word between them); ``stop`` when it does not end in one, 0 when the run
    may go on before ``text``."""
    start = stop
    for position in range(stop - 1, -1, -1):
        if _is_word_or_leet_char(text[position]):
            if not _is_lone_before(text, position, end):
                return start
            start = position
    return 0


def _is_lone_before(text: str, position: int, end: int) -> bool:
    """Whether ``text[position]`` is a single letter (or a spaced-out "@"/"$") in ``text[:end]``: what
    follows ``end`` is not known yet, so it counts as a space. (A letter next to "@" counts as single:
    more runs than ``_SPACED_OUT_RE`` finds, never fewer.)"""
    before = text[position - 1] if position > 0 else " "
    after = text[position + 1] if position + 1 < end else " "
    char = text[position]
    if char.isalnum():
        return not before.isalnum() and not after.isalnum()
    return char in "@$" and not _is_word_or_leet_char(before) and not _is_word_or_leet_char(after)


def _open_encoding_start(text: str) -> int | None:
    """The first "%" or "&" among the characters at the text's end that may still decode differently
    once more text arrives ("%6" + "8", "&#10" + "4;", "%26" + "#104;"); None if there is none. In a run
    of encodings ("%41%42%4") that is the last "%" or "&" before which the text decodes the same whatever
    follows (``_decode_separable``), not the first of the run."""
    first: int | None = None
    position = len(text) - 1
    while position >= max(0, len(text) - _LONGEST_ENCODING) and text[position] in _ENCODING_CHARS:
        if text[position] in "%&":
            first = position
        position -= 1
    if first is None or position >= max(0, len(text) - _LONGEST_ENCODING):
        return first  # the characters that may decode together end before the limit: nothing to narrow
    position = len(text)
    for _ in range(3):
        position = max(text.rfind("%", first + 1, position), text.rfind("&", first + 1, position))
        if position < 0:
            break
        if _decode_separable(text, position):
            return position
    return first


def _decode_separable(text: str, position: int) -> bool:
    """Whether the text before ``position`` decodes the same whatever follows it, and the text from it
    the same whatever precedes it: no encoding, in any decoding round, takes characters from both sides
    (the quick check, else, for encodings of encodings, the one that decodes the rounds)."""
    return _decode_separable_quickly(text, position) or _layers_separable(text, position)


def _decode_separable_quickly(text: str, position: int) -> bool:
    """``_decode_separable`` for text whose encodings decode in one round (the common case).

    A round-one encoding starts at a "%" or "&" (none is inside another), so the last ones before
    ``position`` are found again from the end; each must decode (a "%" or "&" left as it is could begin
    a later round's encoding), to neither "%" nor "&", and end before ``position``. A later round's
    encoding is at most ``_LONGEST_ENCODED_MATCH`` characters of the round before's output, so enough
    such characters before ``position`` keep every round apart."""
    needed = (_DECODE_ROUNDS - 1) * _LONGEST_ENCODED_MATCH
    lowest = max(0, position - (needed + 1) * _LONGEST_ENCODED_MATCH)
    outputs, cursor = 0, position
    while outputs < needed:
        start = max(text.rfind("%", lowest, cursor), text.rfind("&", lowest, cursor))
        if _NOT_ENCODING_RE.search(text, max(start + 1, lowest), cursor) is not None:
            return True  # a character no encoding is written with: no round reads across it
        if start < 0:
            # Plain characters down to ``lowest``; the first few may belong to an encoding begun before it.
            return lowest == 0 or outputs + cursor - (lowest + _LONGEST_ENCODED_MATCH) >= needed
        match = _ENCODED_RE.match(text, start)
        char = None if match is None else _decode_one(match)
        if match is None or char is None or "%" in char or "&" in char or match.end() > cursor:
            return False
        if match.end() == len(text) and match.group(1) is None and not match.group().endswith(";"):
            return False  # "&#10" may go on ("&#104;")
        outputs += cursor - match.end() + len(char)
        cursor = start
    return True


def _layers_separable(text: str, position: int) -> bool:
    """``_decode_separable`` for encodings of encodings ("%2541" decodes to "%41", then "A"), where the
    quick check gives up: each round's output before ``position`` is worked out from a stretch of text
    before it, long enough that its end is exact, and no encoding of the next round may start in its
    last ``_LONGEST_ENCODED_MATCH`` characters and reach past it (or be still open there).

    An encoding starts at a "%" or "&" and reads to its right only, and none holds a "%" or "&" past
    its first character: so a round's encodings are the same in any stretch that starts at a "%" or "&"
    (or at the text's start), and the text from ``position`` decodes the same whatever precedes it once
    no encoding of any round crosses it."""
    span = 8 * _LONGEST_ENCODED_MATCH
    while span <= _LAYERED_SPAN_MAX:
        lowest = max(0, position - span)
        first = _first_encoding_start(text, lowest, position)
        if first is None:
            return True  # nothing to decode before it for a stretch longer than any encoding
        verdict = _layers_separable_from(text[first:position], from_start=first == 0)
        if verdict is not None:
            return verdict
        if lowest == 0:
            return False
        span *= 2
    return False


def _first_encoding_start(text: str, start: int, stop: int) -> int | None:
    found = [index for index in (text.find("%", start, stop), text.find("&", start, stop)) if index >= 0]
    return 0 if start == 0 else (min(found) if found else None)


def _layers_separable_from(layer: str, *, from_start: bool) -> bool | None:
    """Whether no round's encoding crosses the end of ``layer`` (text from a "%" or "&", or from the
    text's start, so decoded exactly): None when a round's output is too short to tell."""
    for round_number in range(_DECODE_ROUNDS):
        # An encoding begun before the layer covers at most its first characters: it ends before the
        # last ``_LONGEST_ENCODED_MATCH``, where the encodings that may cross the end begin.
        if len(layer) < _LONGEST_ENCODED_MATCH and not from_start:
            return None
        for start in _encoding_starts(layer, len(layer) - _LONGEST_ENCODED_MATCH):
            match = _ENCODED_RE.match(layer, start)
            if match is None:
                if start + _LONGEST_ENCODED_MATCH > len(layer):
                    return False  # what follows may complete it ("%4" + "1")
                continue
            if match.end() == len(layer) and match.group(1) is None and not match.group().endswith(";"):
                return False  # "&#10" may go on ("&#104;")
        if round_number + 1 < _DECODE_ROUNDS:
            # The next round's output, decoded exactly: from the layer's start, else from its first "%" or
            # "&" (no encoding holds one past its first character), else past what an encoding begun
            # before the layer could cover (without a "%" or "&" the layer decodes to itself).
            starts = _encoding_starts(layer, 0)
            first = 0 if from_start else min(starts[:1] or [_LONGEST_ENCODED_MATCH])
            layer = _ENCODED_RE.sub(lambda m: _decode_one(m) or m.group(), layer[first:])
    return True


def _encoding_starts(text: str, start: int) -> list[int]:
    return [match.start() for match in _ENCODING_START_RE.finditer(text, start)]


def _view_index(view: TextView, position: int) -> int:
    """The first character of ``view`` that comes from the original text at or after ``position``."""
    if view.starts is None:
        return max(0, min(position, len(view.text)))
    if position >= len(view.original):
        return len(view.text)
    if view.ordered:
        return bisect.bisect_left(view.starts, position)
    return next((index for index, start in enumerate(view.starts) if start >= position), len(view.text))


def _view_start(view: TextView, index: int, length: int) -> int:
    """Where the view's characters from ``index`` on begin in the original text (of ``length``); 0 for
    the view's start, ``length`` past its end. In display order a later character may come from earlier
    text (a reversed run), so it is the first of them all."""
    if index <= 0:
        return 0
    if index >= len(view.text):
        return length
    if view.starts is None:
        return index
    return view.starts[index] if view.ordered else min(view.starts[index:])


def _word_start_before(text: str, position: int, lowest: int = 0) -> int:
    """``position`` (clamped to the text) moved back to the start of the word it falls in, or to
    ``lowest`` (leetspeak "@" and "$" count as letters: "h@te" is one word)."""
    position = max(lowest, min(position, len(text)))
    while (
        lowest < position < len(text)
        and _is_word_or_leet_char(text[position - 1])
        and _is_word_or_leet_char(text[position])
    ):
        position -= 1
    return position
