"""Turn raw model output into clean text: special tokens and byte-level BPE / SentencePiece artifacts out,
cut at stop strings (or the last sentence end), whitespace normalised. (Card names have their stricter
cleaning in `flash_experts.mtg.cleaning`.)
"""

from __future__ import annotations

import re
from typing import Iterable

# <|endoftext|>, <|im_start|>, <s>, </s>, <pad>, <unk>, <bos>, <eos>, [PAD], [CLS], ...
SPECIAL_TOKEN_RE = re.compile(r"<\|[^|<>]*\|>|</?s>|<(?:pad|unk|bos|eos|mask)>|\[(?:PAD|UNK|CLS|SEP|MASK|BOS|EOS)\]")
# Byte-level BPE shows a space as "Ġ" and a newline as "Ċ" when tokens are printed raw; SentencePiece
# uses "▁" for a space. "\ufffd" is half of a multi-byte character that was cut off.
ARTIFACTS = {"\u0120": " ", "\u010a": "\n", "\u2581": " ", "\ufffd": "", "\u200b": ""}
ARTIFACT_RE = re.compile("|".join(map(re.escape, ARTIFACTS)))
SENTENCE_END_RE = re.compile(r"[.!?][\"')\]]*(?=\s|$)")

def strip_special_tokens(text: str) -> str:
    return SPECIAL_TOKEN_RE.sub("", text)


def strip_artifacts(text: str) -> str:
    return ARTIFACT_RE.sub(lambda m: ARTIFACTS[m.group(0)], text)


def normalize_whitespace(text: str) -> str:
    """Spaces and tabs collapse to one space, lines are stripped, 3+ newlines become one blank line."""
    lines = [" ".join(line.split()) for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def cut_at_stop(text: str, stop_strings: Iterable[str]) -> str:
    """Everything before the earliest stop string (the whole text when none occurs)."""
    cuts = [i for s in stop_strings if s and (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text


def cut_at_sentence_end(text: str) -> str:
    """Drop an unfinished last sentence: keep up to the last ".", "!" or "?" (plus closing quotes or
    brackets). Text without any sentence end is returned whole rather than emptied."""
    ends = list(SENTENCE_END_RE.finditer(text))
    return text[: ends[-1].end()] if ends else text


def clean_text(text: str, stop_strings: Iterable[str] = (), sentence_end: bool = False) -> str:
    text = strip_artifacts(strip_special_tokens(text))
    text = cut_at_stop(text, stop_strings)
    if sentence_end:
        text = cut_at_sentence_end(text)
    return normalize_whitespace(text)
