"""Plain-text helpers shared by the real-text builders: word counts, the dedupe key, and cutting a
text to a word budget at a paragraph, line or sentence boundary."""

from __future__ import annotations

import re

BULLET = re.compile(r"^([*+\-o•]|\d{1,2}[.)])\s")  # a list item's marker: "* ", "- ", "1. ", "2) "
_SPACE = re.compile(r"[ \t\r\f\v]+")
_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)
# A sentence ends at . ! ? (optionally closed by a quote or bracket) followed by whitespace and a
# capital, digit or opening quote: "e.g. foo" and "v1.2 is" stay whole.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(\[])")


def unwrap(lines: list[str]) -> str:
    """Lines of one wrapped paragraph -> one line, or one line per list item when its lines start
    with list markers (a marker-less line continues the item above it)."""
    out: list[str] = []
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if not out or BULLET.match(text):
            out.append(text)
        else:
            out[-1] += " " + text
    return "\n".join(out)


def word_count(text: str) -> int:
    return len(text.split())


def normalise(text: str) -> str:
    """The dedupe key of a text: lowercase words, punctuation and layout dropped."""
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


def squash(text: str) -> str:
    """Collapse runs of spaces and tabs into one space and strip the ends (newlines stay)."""
    return _SPACE.sub(" ", text).strip()


def squash_lines(text: str) -> str:
    """`squash` each line; blank lines stay (as empty lines)."""
    return "\n".join(squash(line) for line in text.splitlines())


def paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks, each stripped; lines inside a block are kept."""
    blocks = re.split(r"\n\s*\n", text.strip())
    return [b.strip() for b in blocks if b.strip()]


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def _pieces(paragraph: str) -> list[str]:
    """The boundaries inside a paragraph: its lines when it is a list (several lines), else its
    sentences."""
    lines = [line for line in paragraph.splitlines() if line.strip()]
    return lines if len(lines) > 1 else sentences(paragraph)


_ENDS_SENTENCE = re.compile(r"[.!?][\"')\]]?$")


def drop_lead_in(paras: list[str]) -> list[str]:
    """Without the trailing sentence that does not end: the lead-in of a list or example that was
    cut off ("It does this by testing", "The integrals are defined as"). A paragraph that is a
    list (several lines) stays."""
    out = list(paras)
    while out and "\n" not in out[-1] and not _ENDS_SENTENCE.search(out[-1]):
        whole = sentences(out.pop())[:-1]
        if whole:
            out.append(" ".join(whole))
    return out


def cap_words(text: str, max_words: int) -> str | None:
    """`text` cut to at most `max_words` words at a paragraph, list-item or sentence boundary.

    Whole paragraphs are kept while they fit; then the lines (list items) or sentences of the
    next paragraph while they fit. A trailing paragraph that ends with ':' (a list's lead-in whose
    list was cut) is dropped. None when not even the first sentence fits.
    """
    kept: list[str] = []
    budget = max_words
    for para in paragraphs(text):
        n = word_count(para)
        if n <= budget:
            kept.append(para)
            budget -= n
            continue
        taken: list[str] = []
        for piece in _pieces(para):
            if word_count(piece) > budget:
                break
            taken.append(piece)
            budget -= word_count(piece)
        if taken:
            joiner = "\n" if len(para.splitlines()) > 1 else " "
            kept.append(joiner.join(taken))
        break
    while len(kept) > 1 and kept[-1].endswith(":"):
        kept.pop()
    return "\n\n".join(kept) if kept else None
