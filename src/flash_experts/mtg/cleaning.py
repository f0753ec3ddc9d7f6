"""Raw name samples -> clean Magic: The Gathering card names: one line, only the characters real card names
use, MTG title case ("Jace, the Mind Sculptor", "Sword of Fire and Ice"), or None when the sample is not a
plausible name.
"""

from __future__ import annotations

import re

from flash_experts.generation.cleaning import strip_artifacts, strip_special_tokens
from flash_experts.mtg.cards import normalize_name

# Words MTG keeps lowercase inside a name ("Sword of Fire and Ice", "Will-o'-the-Wisp").
SMALL_WORDS = frozenset(
    "a an and as at but by for from in into nor o' of off on onto or over per the to upon via with".split()
)
# A card name: letters (accented ones too: "Lim-Dûl's Vault", "Æther Vial"), spaces, apostrophes,
# commas and hyphens; it starts with a letter and ends with a letter or an apostrophe ("Will-o'-the-Wisp").
NAME_CHARS_RE = re.compile(r"[^\W\d_]|[ ',\-]")
MAX_NAME_CHARS = 40  # the longest names outside joke sets are about 33 characters
MIN_NAME_LETTERS = 3  # "Opt", "Fog": the shortest real names
MAX_NAME_WORDS = 8
SEPARATORS = ("|",)  # the conditioned format: "Creature — Elf | G | Llanowar Elves"
SPLIT_CARD_SEPARATOR = " // "  # "Fire // Ice": two names on one card

# Sampling names in this format (flash_experts.mtg.names.name_sampling_config; here, without torch, so that the
# CLI's parser can show the defaults). Token filter: letters, spaces, apostrophes, commas and hyphens (EOS and
# stop tokens stay allowed).
CARD_NAME_REGEX = r"[A-Za-z ',\-]+"
# A card name starts with a capital letter (after the " | " of the conditioned format, with its space): the
# first token must, so a sample is never empty nor a fragment such as "'s Law" or "-Crucible".
CARD_NAME_FIRST_TOKEN_REGEX = r" ?[A-Z][A-Za-z',\-]*"
# Temperature and top-p, chosen on selection samples by benchmarks/select_name_sampling.py (docs/UPCYCLING.md).
NAME_TEMPERATURE, NAME_TOP_P = 0.7, 1.0


def title_case_card_name(name: str) -> str:
    """MTG title case: every word capitalised except small words in the middle ("Sword of Fire and
    Ice"); a word's other letters are kept ("McKenzie") unless the whole name is shouted in capitals."""
    if name.isupper():
        name = name.lower()
    parts = [part for word in name.split(" ") for part in word.split("-")]
    cased = []
    for i, part in enumerate(parts):
        middle = 0 < i < len(parts) - 1
        small = middle and part.rstrip(",").lower() in SMALL_WORDS
        cased.append(part.lower() if small else part[:1].upper() + part[1:])
    # Put the words and hyphens back exactly where they were.
    out, k = [], 0
    for word in name.split(" "):
        pieces = word.split("-")
        out.append("-".join(cased[k:k + len(pieces)]))
        k += len(pieces)
    return " ".join(out)


def clean_card_name(text: str) -> str | None:
    """One clean, title-cased card name from a raw sample, or None when it is not a plausible name.

    Takes the first non-empty line, drops special tokens, artifacts, a conditioning prefix
    ("Creature — Elf | G | ") and wrapping quotes, then checks the result with `is_valid_card_name`."""
    text = strip_artifacts(strip_special_tokens(text))
    line = next((ln for ln in text.splitlines() if ln.strip()), "")
    for separator in SEPARATORS:
        line = line.rsplit(separator, 1)[-1]
    name = normalize_name(line).strip("\"“”` ").strip()
    name = re.sub(r"\s*,\s*", ", ", name)  # "Jace ,the" -> "Jace, the"
    name = re.sub(r"\s*-\s*", "-", name)
    halves = [half.strip() for half in name.split("//")]  # split cards: "Fire // Ice"
    if len(halves) > 2 or not all(h and all(NAME_CHARS_RE.fullmatch(ch) for ch in h) for h in halves):
        return None
    name = SPLIT_CARD_SEPARATOR.join(title_case_card_name(h) for h in halves)
    return name if is_valid_card_name(name) else None


def is_valid_card_name(name: str) -> bool:
    """The format of a real card name, checked on the name as written (case included): allowed
    characters, 1-8 words, 3+ letters, at most 40 characters, at most 2 capitals a word, punctuation
    only between words ("Jace, the", "Sun's", "Will-o'-the-Wisp"), and MTG title case. A split card is
    two valid names joined by " // "."""
    halves = name.split(SPLIT_CARD_SEPARATOR)
    if len(halves) == 2:
        return all(_is_valid_single_name(half) for half in halves)
    return _is_valid_single_name(name)


def _is_valid_single_name(name: str) -> bool:
    if not name or len(name) > MAX_NAME_CHARS or not all(NAME_CHARS_RE.fullmatch(ch) for ch in name):
        return False
    if not name[0].isalpha() or not (name[-1].isalpha() or name[-1] == "'") or name.count(",") > 1:
        return False
    for i, ch in enumerate(name):
        before = name[i - 1] if i > 0 else ""
        after = name[i + 1] if i + 1 < len(name) else ""
        if ch == " " and not after.isalpha():  # no double spaces, no " ,"
            return False
        if ch == "," and not (before.isalpha() and name[i + 1:i + 2] == " "):
            return False
        if ch == "-" and not ((before.isalpha() or before == "'") and after.isalpha()):
            return False
        if ch == "'" and not (before.isalpha() or after.isalpha()):
            return False
    words = name.split(" ")
    if len(words) > MAX_NAME_WORDS or sum(ch.isalpha() for ch in name) < MIN_NAME_LETTERS:
        return False
    if any(sum(ch.isupper() for ch in part) > 2 for part in re.split(r"[ \-]", name)):  # "McKenzie" at most
        return False
    return name == title_case_card_name(name)
