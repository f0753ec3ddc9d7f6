"""Text and card-name cleaning on hand-made strings with hand-written expected outputs."""

from __future__ import annotations

import pytest

from flash_experts.generation.cleaning import (
    clean_text,
    cut_at_sentence_end,
    cut_at_stop,
    normalize_whitespace,
    strip_special_tokens,
)
from flash_experts.mtg.cleaning import clean_card_name, is_valid_card_name, title_case_card_name


def test_clean_text_hand_made():
    """Hand-written expectations: special tokens, BPE artifacts, whitespace, sentence end."""
    raw = "The elves\u0120sang.<|endoftext|>  Then   they\tleft!\n\n\n\nAnd then the"
    assert clean_text(raw) == "The elves sang. Then they left!\n\nAnd then the"
    assert clean_text(raw, sentence_end=True) == "The elves sang. Then they left!"
    assert clean_text("<s>\u2581Hello\u2581world</s><pad>") == "Hello world"
    assert clean_text("A story. THE END more", stop_strings=["THE END"]) == "A story."
    assert clean_text("no sentence end here", sentence_end=True) == "no sentence end here"


def test_cut_helpers_hand_made():
    """Hand-written expectations for the individual steps."""
    assert cut_at_stop("abc\n\ndef###x", ["###", "\n\n"]) == "abc"
    assert cut_at_stop("abc", ["zz"]) == "abc"
    assert cut_at_sentence_end('He said "stop." and then') == 'He said "stop."'
    assert cut_at_sentence_end("Version 2.5 is out. Next") == "Version 2.5 is out."
    assert strip_special_tokens("a<|im_start|>b<|endoftext|>c[PAD]") == "abc"
    assert normalize_whitespace("  a \t b \r\n c  ") == "a b\nc"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("jace, the mind sculptor", "Jace, the Mind Sculptor"),
        ("sword of fire and ice", "Sword of Fire and Ice"),
        ("LLANOWAR ELVES", "Llanowar Elves"),
        (" Llanowar Elves<|endoftext|>", "Llanowar Elves"),
        ("Creature — Elf Druid | G | llanowar elves", "Llanowar Elves"),
        ("\u0120Path\u0120to\u0120Exile", "Path to Exile"),
        ('"Elspeth, Sun\u2019s Champion"\nSecond line', "Elspeth, Sun's Champion"),
        ("will-o'-the-wisp", "Will-o'-the-Wisp"),
        ("lim-dûl's vault", "Lim-Dûl's Vault"),
        ("Æther Vial", "Aether Vial"),
        ("fire // ice", "Fire // Ice"),
        ("Kozilek ,butcher of truth", "Kozilek, Butcher of Truth"),
        ("\n\n  Ob Nixilis  \n", "Ob Nixilis"),
        ("In Garruk's Wake", "In Garruk's Wake"),  # a small word first is capitalised
        ("", None),
        ("<|endoftext|>", None),
        ("Card 42", None),  # digits
        ("Fire!!", None),
        ("a", None),  # too short
        ("Fire,, Ice", None),
        ("Sword - ", None),
        ("Very Long Name With Far Too Many Words In It Now", None),
        ("Fire // Ice // Water", None),
    ],
)
def test_clean_card_name_hand_made(raw, expected):
    """Hand-written expectations, real card names included."""
    assert clean_card_name(raw) == expected


@pytest.mark.parametrize(
    "name, valid",
    [
        ("Jace, the Mind Sculptor", True), ("Sword of Fire and Ice", True), ("Will-o'-the-Wisp", True),
        ("Fire // Ice", True), ("Séance", True), ("Llanowar elves", False), ("Sword Of Fire", False),
        ("jace", False), ("Jace,the", False), ("Jace ,the", False), (" Jace", False), ("Jace  Beleren", False),
        ("Jace-", False), ("ThLthecbmRDrEth", False), ("McKenzie", True), ("Fire //Ice", False), ("X", False),
        ("A" * 41, False),
    ],
)
def test_is_valid_card_name_hand_made(name, valid):
    """Hand-written verdicts on name formats (case, punctuation, length)."""
    assert is_valid_card_name(name) is valid


def test_title_case_keeps_inner_capitals_hand_made():
    """Hand-written: other letters are kept unless the whole name is in capitals."""
    assert title_case_card_name("mcKenzie of the deep") == "McKenzie of the Deep"
    assert title_case_card_name("THE ABYSS") == "The Abyss"
