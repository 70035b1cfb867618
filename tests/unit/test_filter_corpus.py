"""The default blocked-word list against a corpus of known evasions (each must be caught) and of
innocent texts (each must pass), from issue 20's review of the filter: URL/HTML encodings, bidi
controls, split, joined and glued words, stretched letters, look-alike letters and leetspeak, against
Scunthorpe-style words that contain or resemble the blocked ones."""

from __future__ import annotations

import pytest

from textgen.config import DEFAULT_BLOCKED_WORDS
from textgen.content_filter import ContentFilter

DEFAULT = ContentFilter(DEFAULT_BLOCKED_WORDS)

EVASIONS = {
    "url encoding": ["%68ate", "%68%61%74%65", "I %68ate you", "h%61te", "%2568ate"],
    "html references": ["&#104;ate", "&#x68;&#x61;te", "&#104ate", "h&#97;te", "&amp;#104;ate", "&#x56;iolence"],
    "bidi controls": ["\u202eetah", "I \u202eetah\u202c you", "\u202eecneloiv", "h\u200fate", "ha\u2066te\u2069"],
    "spaced out": ["h a t e", "h.a.t.e", "h-a-t-e", "I h a t e you", "v i o l e n c e"],
    "joined by punctuation": ["ha-te", "h-ate", "hat_e", "ha.te", "vio-lence", "(ha-te)", "h'ate"],
    "glued": ["hatehate", "ihateyou", "ihate", "hateyou", "soviolent", "hatethem"],
    "stretched": ["haaate", "hhaattee", "hateeeee", "viiiolence", "hatttred", "HAAAATE"],
    "look-alikes": ["ʜᴀᴛᴇ", "ɦate", "𝐡𝐚𝐭𝐞", "𝔥𝔞𝔱𝔢", "ｈａｔｅ", "Ⓗⓐⓣⓔ", "һаtе", "ᎻᎪᎢᎬ", "ΗΑΤΕ", "vіolence", "hαte"],
    "leetspeak": ["h8", "h8ful", "h8er", "h8ers", "v!olence", "v1olence", "vi0lent", "h4te", "h@t3", "ha+e", "hat€"],
    "leetspeak with punctuation": ["v|olent", "h4tr3d", "h@te!", "so h8!", "#v!olence"],
    # Policy (docs/content-filter.md): a blocked word counts wherever it stands as a word, compounds
    # and inflections included; the filter is lexical and cannot tell a hate-free zone from hate.
    "policy: the word itself": ["hate-free", "haters gonna hate", "hater's", "anti-violence", "hate_speech"],
}

INNOCENT = [
    "whatever", "Whatever happens, stay curious.", "chateau", "Château Margaux", "Manhattan", "phosphate",
    "theater", "hatch", "hatchet", "Cape Hatteras", "Er hatte keine Zeit.", "The Mad Hatter", "hatted",
    "shatter", "violet", "violin", "viola", "violinist", "violation", "nonviolent", "ultraviolet", "class",
    "assassin", "therapist", "Scunthorpe", "Dick Van Dyke", "H.A.T. team", "c-h-a-t-e-a-u", "w h a t e v e r",
    "1337 404 4473", "AT&T", "H&M", "50% off", "100%effective", "Tom &amp; Jerry", "&nbsp;", "a%20b",
    "I ate at 8", "5 + 3 = 8", "sk8 park", "gr8 work", "l8r", "B8", "Haaappy birthday", "Sooo good",
    "coffee", "bookkeeper", "aaa batteries", "what a tee", "that's great", "Hatem", "heathen", "Kathe",
    "the chat ended", "hat-trick", "e-mail", "what-ever", "Thatcher", "I love this", "нате",
    "שלום עולם", "مرحبا بالعالم", "\u202eolleh", "hat 3", "h. a. t.", "Ate", "sate", "he ate", "I ate",
    "oath", "heat", "hot", "the hat, eh", "hat.e-mail.com", "whatevers", "violets are blue",
]  # fmt: skip


@pytest.mark.parametrize(
    "text", [pytest.param(text, id=f"{kind}: {text!r}") for kind, texts in EVASIONS.items() for text in texts]
)
def test_evasion_is_caught(text: str) -> None:
    assert DEFAULT.find(text), text


@pytest.mark.parametrize("text", INNOCENT)
def test_innocent_text_passes(text: str) -> None:
    assert DEFAULT.find(text) == [], text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I %68ate you", "I [redacted] you"),
        ("I &#104;ate you", "I [redacted] you"),
        ("a \u202eetah\u202c b", "a \u202e[redacted]\u202c b"),
        ("so ha-te it", "so [redacted] it"),
        ("I haaate it", "I [redacted] it"),
        ("ʜᴀᴛᴇ!", "[redacted]!"),
        ("so h8!", "so [redacted]!"),
        ("just v!olence.", "just [redacted]."),
    ],
)
def test_redaction_covers_the_disguised_word_in_the_sent_text(text: str, expected: str) -> None:
    assert DEFAULT.redact(text) == expected
