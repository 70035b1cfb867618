"""Token ids to text, one token at a time, with stop strings. Shared by both engines.

Decoding a whole sequence after every token costs O(n) per token; instead only a short window is
decoded (the tokens since the last emitted boundary), and text is held back while it ends in an
incomplete UTF-8 character or could still be the start of a stop string, so a streamed client
never sees half a character or part of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers.tokenization_utils_base import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        text = self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if not isinstance(text, str):  # a list of ids decodes to one string; a batch would be a list
            raise TypeError(f"the tokenizer decoded one sequence into {type(text).__name__}")
        return text

    def push(self, token_id: int) -> str:
        """Add a token; return the text it completes (may be empty while a character is partial)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back (a trailing partial character comes out as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


def held_back_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class TextAssembler:
    """Builds one sequence's output text; tells when a stop string ends it.

    Disarmed (``armed=False``, for min_tokens), stop strings are not looked for and nothing is held
    back; once ``arm_stops()`` is called, a stop string counts when it starts in text added after that
    (text already streamed is never taken back)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stops: Sequence[str], *, armed: bool = True) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = tuple(stop for stop in stops if stop)
        self._text = ""
        self._emitted = 0
        self._floor = 0  # stop strings are searched from here on
        self.stops_armed = armed
        self.stopped = False

    def arm_stops(self) -> None:
        self._floor = len(self._text)
        self.stops_armed = True

    @property
    def text(self) -> str:
        return self._text

    def push(self, token_id: int) -> str:
        """Add a token; return the text that is now safe to send to a streaming client."""
        if self.stopped:
            return ""
        self._append(self._detokenizer.push(token_id))
        return self._emit(final=self.stopped)

    def finish(self) -> str:
        """End of generation: release everything still held back."""
        if not self.stopped:
            self._append(self._detokenizer.flush())
        return self._emit(final=True)

    def _append(self, delta: str) -> None:
        if not delta:
            return
        search_from = max(self._floor, len(self._text) - max((len(s) for s in self._stops), default=0))
        self._text += delta
        if not self.stops_armed:
            return
        cut = self._first_stop_at(search_from)
        if cut is not None:
            self._text = self._text[:cut]
            self.stopped = True

    def _first_stop_at(self, search_from: int) -> int | None:
        found = [i for stop in self._stops if (i := self._text.find(stop, search_from)) >= 0]
        return min(found) if found else None

    def _emit(self, *, final: bool) -> str:
        held = held_back_length(self._text[self._floor :], self._stops) if self.stops_armed else 0
        upto = len(self._text) if final else len(self._text) - held
        if upto <= self._emitted:
            return ""
        delta = self._text[self._emitted : upto]
        self._emitted = upto
        return delta
