"""The rules every generated caption passes, and the clean-up applied before them.

A caption is kept only if it names the object with the identifier ``<new1>`` exactly once, has
between ``min_words`` and ``max_words`` words, contains no control characters, and does not echo
the instruction (no run of 5 words copied from it, none of its meta words such as "caption").
Clean-up (before validation): first line only, surrounding quotes and list markers removed,
whitespace collapsed; when the model wrote the category without the identifier (``a mug on a
desk``), ``<new1>`` is inserted before the first mention of the category, as the reference's
caption files read ("A <new1> mug on a wooden desk").
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field

IDENTIFIER = "<new1>"
ECHO_WORDS = ("caption", "instruction", "identifier", "description", "sentence", "prompt")
ECHO_NGRAM = 5


@dataclass(frozen=True)
class Rules:
    min_words: int = 4
    max_words: int = 40
    insert_identifier: bool = True


def clean(text: str, category: str, insert_identifier: bool = True) -> str:
    line = next((ln for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s*", "", line)  # list markers
    line = line.strip().strip("\"'`\u201c\u201d").strip()
    line = re.sub(r"\s+", " ", line)
    if insert_identifier and IDENTIFIER not in line and category:
        pat = re.compile(rf"\b({re.escape(category)})\b", re.IGNORECASE)
        line = pat.sub(lambda m: f"{IDENTIFIER} {m.group(1)}", line, count=1)
    return line


def _words(text: str) -> list[str]:
    return re.findall(r"[\w<>']+", text.lower())


def problem(caption: str, instruction: str, rules: Rules = Rules()) -> str | None:
    """Why ``caption`` is rejected (a short reason, used to count rejections), or None."""
    n_id = caption.count(IDENTIFIER)
    if n_id == 0:
        return "no identifier"
    if n_id > 1:
        return "identifier more than once"
    if any(unicodedata.category(c).startswith("C") for c in caption):
        return "control characters"
    words = _words(caption)
    if len(words) < rules.min_words:
        return "too short"
    if len(words) > rules.max_words:
        return "too long"
    if any(w in words for w in ECHO_WORDS):
        return "instruction echo"
    inst = _words(instruction)
    grams = {tuple(inst[i:i + ECHO_NGRAM]) for i in range(len(inst) - ECHO_NGRAM + 1)}
    if any(tuple(words[i:i + ECHO_NGRAM]) in grams for i in range(len(words) - ECHO_NGRAM + 1)):
        return "instruction echo"
    return None


def dedup_key(caption: str) -> str:
    return " ".join(_words(caption))


@dataclass
class Tally:
    """Candidates seen and why they were rejected (for the bounded-failure message)."""
    candidates: int = 0
    rejected: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        if not self.rejected:
            return "none rejected"
        return ", ".join(f"{n} {why}" for why, n in self.rejected.most_common())
