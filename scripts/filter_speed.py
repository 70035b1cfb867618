"""Time the default content filter on 1 MB of several kinds of text and on the largest prompt the
default limits let through: ``python -m scripts.filter_speed``."""

from __future__ import annotations

import time
from pathlib import Path

from textgen.config import DEFAULT_BLOCKED_WORDS
from textgen.content_filter import ContentFilter
from textgen.generation import MAX_CHARS_PER_TOKEN

MEGABYTE = 1_000_000


def _seconds(content_filter: ContentFilter, text: str) -> float:
    started = time.perf_counter()
    content_filter.find(text)
    return time.perf_counter() - started


def main() -> None:
    content_filter = ContentFilter(DEFAULT_BLOCKED_WORDS)
    docs = "".join(path.read_text("utf-8") for path in sorted(Path("docs").glob("*.md")))
    samples = {
        "English prose (docs/*.md)": docs,
        "Russian": "Привет, как дела? Всё хорошо, нате вам. ",
        "one letter": "x",
        "spaced letters": "a ",
        "dense matches": "whatever you say, I love this chateau; a b c 1337 h4t3. ",
    }
    for name, sample in samples.items():
        text = (sample * (MEGABYTE // len(sample) + 1))[:MEGABYTE]
        print(f"{name}: {_seconds(content_filter, text):.2f} s per MB")
    largest = (docs * 2)[: 1023 * MAX_CHARS_PER_TOKEN]
    print(f"largest prompt ({len(largest)} characters): {_seconds(content_filter, largest) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
