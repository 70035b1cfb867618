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
from dataclasses import dataclass
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
        return self._find_in_views(_views(text))

    def _find_in_views(self, views: Iterable[_View]) -> list[FilterMatch]:
        """``find`` over a text's views (``_views``), for a caller that reads them too."""
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

    def _spans(self, view: _View) -> Iterator[_Span]:
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
class _View:
    original: str
    text: str  # normalized
    starts: Sequence[int] | None  # first original index behind each character of ``text``; None: same index
    ends: Sequence[int] | None  # one past the last original index behind it

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


def _views(original: str) -> list[_View]:
    """The text as matched: decoded and normalized; plus, with a right-to-left override, in the order
    it is displayed."""
    decoded = _decoded(original)
    views = [decoded]
    if _RIGHT_TO_LEFT_OVERRIDE in decoded[0]:
        views.append(_display_order(*decoded))
    return [_normalized(original, *view) for view in views]


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


def _normalized(original: str, text: str, starts: list[int] | None, ends: list[int] | None) -> _View:
    if text.isascii():
        return _View(original, text.lower(), starts, ends)
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
        return _View(original, text.translate(table), starts, ends)
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
    return _View(original, "".join(pieces), new_starts, new_ends)


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
    normalized: ``_views``), at the text's end and wherever later text can still change how earlier text
    reads (an encoding not complete yet, a right-to-left override not ended yet), and is the earliest of:

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
    fixed-width tail). Only a window around the unsent text is re-scanned on each push, so the cost per
    token does not grow with the length of the output.
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
        # (just after a whitespace: later text cannot change how the text before it decodes), where each
        # starts, and the one still open there; plus those after it, found again on each push.
        self._overrides: list[int] = []
        self._overrides_upto = 0
        self._open_override_upto: int | None = None
        self._tail_overrides: list[int] = []

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
        open_override = self._track_overrides()
        window = self._scan_start()
        views = _views(self._text[window:])  # read once: for what to hold and for the re-scan
        return self._release(self._hold_start(window, views, open_override), window, views)

    def finish(self) -> str:
        return self._release(len(self._text))

    # -- what to hold ------------------------------------------------------------------------------------

    def _hold_start(self, window: int, views: list[_View], open_override: int | None) -> int:
        """Where the text that later text could still make part of a match begins (read from ``window``
        on: the text before it is sent, so a hold reaching back that far holds everything unsent)."""
        text = self._text
        # Points where later text continues what is there: the end, an encoding that is not complete
        # yet ("%6" + "8"), and a right-to-left override that has not ended (later text displays at it).
        cuts = [len(text)]
        encoding = _open_encoding_start(text)
        if encoding is not None:
            cuts.append(encoding)
        if open_override is not None:
            cuts.append(open_override)
        hold = len(text)
        for view in views:
            for cut in cuts:
                index = _view_index(view, cut - window)
                held = self._tail_hold(view.text, index)
                hold = min(hold, cut, window + _view_start(view, held, len(text) - window))
        return hold

    def _tail_hold(self, text: str, end: int) -> int:
        """Where, in ``text[:end]`` (a normalized view), a match that text after ``end`` could still
        complete or change may start; 0 when that may be before ``text`` begins."""
        chunk = _run_start(text, end, _is_not_space)
        if end - chunk > max(3, self._filter.longest_chunk):  # too long to spell a word joined by punctuation
            chunk = end
        # The word the text ends in (every detector but runs and phrases stays inside it), and the
        # complete words before it that a multi-word entry may begin with, counted in each reading: a
        # leetspeak symbol between two words is a separator as written ("kill | yourself") and a word
        # of its own read as a letter ("kill i yourself"), and it joins pieces into one word ("k!ll").
        complete = self._filter.longest_phrase - 1
        words = min(_words_start(text, end, complete, str.isalnum), _words_start(text, end, complete, _is_leet_letter))
        held = min(chunk, words, _spaced_run_start(text, end, end))
        if held < end and _is_word_or_leet_char(text[held]) and _is_lone_before(text, held, end):
            # Never inside a spaced-out run: the re-scan window starts shortly before the unsent text, and
            # the end of a run seen without its start may spell a word the whole run does not ("x h a t e").
            held = _spaced_run_start(text, held + 1, end)
        return held

    def _track_overrides(self) -> int | None:
        """Updates the overrides seen in the text; where the last one starts if it has not ended."""
        text = self._text
        boundary = self._overrides_upto
        for position in range(len(text) - 1, self._overrides_upto - 1, -1):
            if text[position].isspace():
                boundary = position + 1
                break
        if boundary > self._overrides_upto:
            self._open_override_upto = self._scan_overrides(
                self._overrides_upto, boundary, self._open_override_upto, self._overrides
            )
            self._overrides_upto = boundary
        self._tail_overrides = []
        return self._scan_overrides(boundary, len(text), self._open_override_upto, self._tail_overrides)

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

    # -- what to send ------------------------------------------------------------------------------------

    def _scan_start(self) -> int:
        """Where the re-scanned window begins: enough context before the unsent text for every match that
        reaches into it, and for every encoding and override that changes how it reads."""
        window_start = self._chunk_start_before(self._sent_upto - self._holdback)
        # Text sent before may still decode together with what follows ("%68" sent, then "ate").
        encoded_from = max(0, self._sent_upto - self._filter.longest_chunk * ENCODED_CHAR_MAX)
        encoded = _ENCODING_START_RE.search(self._text, encoded_from, self._sent_upto)
        if encoded is not None:
            window_start = min(window_start, self._chunk_start_before(encoded.start()))
        # A right-to-left override before the window changes how the window's text reads.
        overrides = self._overrides + self._tail_overrides
        before = bisect.bisect_left(overrides, window_start)
        if before:
            override = overrides[before - 1]
            between = self._text[override:window_start]
            if not any(end in between for end in _OVERRIDE_ENDS) or window_start - override < self._holdback:
                window_start = self._chunk_start_before(override)
        return window_start

    def _chunk_start_before(self, position: int) -> int:
        """``position`` moved back to the start of its word, and on to the start of its chunk without
        spaces when that chunk is short enough to hold a blocked word joined by punctuation."""
        text = self._text
        position = _word_start_before(text, position)
        limit = max(0, position - self._filter.longest_chunk)
        start = position
        while start > limit and not text[start - 1].isspace():
            start -= 1
        return start if start == 0 or text[start - 1].isspace() else position

    def _release(self, end: int, window_start: int | None = None, views: list[_View] | None = None) -> str:
        """Sends the text up to ``end`` (less any match it would cut), redacted; ``window_start`` and the
        ``views`` of the text from it, when the caller has them already."""
        if self.stopped or end <= self._sent_upto:
            return ""
        if window_start is None or views is None:
            window_start = self._scan_start()
            views = _views(self._text[window_start:])
        matches = [
            (m.start + window_start, m.end + window_start)
            for m in self._filter._find_in_views(views)
            if m.end + window_start > self._sent_upto
        ]
        for start, stop in matches:
            if start < end < stop:
                end = start  # never send part of a match
        if end <= self._sent_upto:
            return ""
        decided = [m for m in matches if m[0] < end]
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
            pieces += [self._text[cursor : max(cursor, match_start)], REDACTION]
            cursor = max(cursor, match_end)
        pieces.append(self._text[cursor:end])
        return "".join(pieces)


# Leetspeak symbols that read as letters: in some reading they are part of a word ("k!ll", "h@te").
_LEET_LETTER_SYMBOLS = frozenset("@$!|+€")
# Every character an encoded character can be written with ("%68", "&#x68;", "&amp;#104;"), and the most
# of them one encoded character takes over the decoding rounds ("&amp;amp;" and a 32-letter entity name).
_ENCODING_CHARS = frozenset("%&#;0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_LONGEST_ENCODING = 64


def _is_not_space(char: str) -> bool:
    return not char.isspace()


def _is_leet_letter(char: str) -> bool:
    """A letter or digit, or a symbol that leetspeak reads as a letter."""
    return char.isalnum() or char in _LEET_LETTER_SYMBOLS


def _run_start(text: str, end: int, inside: Callable[[str], bool]) -> int:
    """Where the run of characters for which ``inside`` holds that ``text[:end]`` ends in begins."""
    start = end
    while start > 0 and inside(text[start - 1]):
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
    once more text arrives ("%6" + "8", "&#10" + "4;", "%26" + "#104;"); None if there is none."""
    first: int | None = None
    position = len(text) - 1
    while position >= max(0, len(text) - _LONGEST_ENCODING) and text[position] in _ENCODING_CHARS:
        if text[position] in "%&":
            first = position
        position -= 1
    return first


def _view_index(view: _View, position: int) -> int:
    """The first character of ``view`` that comes from the original text at or after ``position``."""
    if view.starts is None:
        return min(position, len(view.text))
    if position >= len(view.original):
        return len(view.text)
    return next((index for index, start in enumerate(view.starts) if start >= position), len(view.text))


def _view_start(view: _View, index: int, length: int) -> int:
    """Where the view's characters from ``index`` on begin in the original text (of ``length``); 0 for
    the view's start, ``length`` past its end. In display order a later character may come from earlier
    text (a reversed run), so it is the first of them all."""
    if index <= 0:
        return 0
    if index >= len(view.text):
        return length
    return index if view.starts is None else min(view.starts[index:])


def _word_start_before(text: str, position: int) -> int:
    """``position`` (clamped to the text) moved back to the start of the word it falls in (leetspeak
    "@" and "$" count as letters: "h@te" is one word)."""
    position = max(0, min(position, len(text)))
    while 0 < position < len(text) and _is_word_or_leet_char(text[position - 1]) and _is_word_or_leet_char(
        text[position]
    ):
        position -= 1
    return position
