"""A card grammar: read a whole-card document back into fields and say whether it is a real Magic card.

Two separate answers, as mtgencode's validator gives (good / bad per rule) and more strictly:
- **parses**: the document has the layout of mtg/whole_cards.py (name and cost, type line, rules text,
  P/T or loyalty) and every field reads: `parse_card` returns a WholeCard, or a ParseError saying where not.
- **passes every rule check**: `check_card` runs the checks below and reports each one:
  cost         the mana cost's grammar: {N} generic, {W}{U}{B}{R}{G} coloured, {C} colourless, {S} snow,
               {X}{Y}{Z}, hybrid {W/U} and {2/W}, Phyrexian {W/P} and {W/U/P}; X first, then one generic
               number, then the rest; a land has no cost
  type_line    supertypes and card types from the rules (205.4, 205.2), at least one card type, and every
               subtype belongs to one of the card's types (a creature type only on a creature or tribal card,
               "Aura" only on an enchantment, ...), by the game's own dictionary (`CardVocabulary`)
  pt           power/toughness exactly when the card is a creature or a Vehicle, each a number, *, X or n+*
  loyalty      loyalty exactly when the card is a planeswalker
  text         every rules-text line has one of Magic's shapes: a line of keyword abilities ("Flying,
               vigilance", "Equip {2}", "Protection from red"; a keyword CR 702 gives no parameter takes none,
               "Flying 3" fails, and one that needs its cost or number has it, "Cycling" alone fails), an
               activated ability ("{2}{R}, {T}: ..." with
               a cost that reads), a loyalty ability ("+1: ...", "−2: ..."), a triggered ability ("When",
               "Whenever", "At" ... ", " ...), a chapter or level line, a modal bullet, or a sentence that
               ends as Magic's sentences end, with its parentheses and quotes balanced; the card's own name
               is written "~", never spelled out
  consistency  an Aura has an "Enchant" line, Equipment "Equip", a Vehicle "Crew"; an instant or sorcery
               has rules text and no permanent's abilities (an activated ability or a trigger that neither
               says where the card is, as "Return ~ from your graveyard" does, nor is delayed); X in the cost
               is used by the text; "kicked" needs Kicker; level lines need "Level up"
The parse rate and the pass rate on the real cards, and the share of deliberately broken cards caught, are
tested (tests/test_card_grammar.py) and written in docs/CARDS.md. The module reads top-down: `judge` and
`check_card` first, then the reading (`parse_card`), then each rule's check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from flash_experts.mtg.whole_cards import SELF, WholeCard

SUPERTYPES = ("Basic", "Legendary", "Snow", "World", "Ongoing", "Host")
CARD_TYPES = ("Artifact", "Battle", "Creature", "Enchantment", "Instant", "Kindred", "Land", "Planeswalker",
              "Sorcery", "Tribal")
SPELL_TYPES = ("Instant", "Sorcery")
PERMANENT_TYPES = frozenset({"Artifact", "Battle", "Creature", "Enchantment", "Land", "Planeswalker"})
# Where an instant or sorcery is when an ability of its own works (see _spell_ability).
SPELL_IN_A_ZONE = re.compile(r"(?:cycle|cast|discard|exile|reveal|return|put) ~|~ (?:is|from|haunts) |counters? on ~")
# Keyword abilities (Comprehensive Rules 702), lower case; a keyword line is a list of these, each with its
# own parameters (a cost, a number, "from ...").
KEYWORDS = frozenset(keyword.strip() for keyword in """
deathtouch, defender, double strike, enchant, equip, first strike, flash, flying, haste, hexproof, hexproof from,
indestructible, intimidate, landwalk, swampwalk, islandwalk, forestwalk, mountainwalk, plainswalk, desertwalk,
legendary landwalk, nonbasic landwalk, snow swampwalk, snow forestwalk, snow islandwalk, snow mountainwalk,
snow plainswalk, snow landwalk, lifelink, protection, protection from, reach, shroud, trample, vigilance, ward,
banding, bands with other, rampage, cumulative upkeep, flanking, phasing, buyback, shadow, cycling, landcycling,
basic landcycling, plainscycling, islandcycling, swampcycling, mountaincycling, forestcycling, wizardcycling,
slivercycling, typecycling, echo, horsemanship, fading, kicker, multikicker, flashback, madness, fear, morph,
megamorph, amplify, provoke, storm, affinity, entwine, modular, sunburst, bushido, soulshift, splice, offering,
ninjutsu, commander ninjutsu, epic, convoke, dredge, transmute, bloodthirst, haunt, replicate, forecast, graft,
recover, ripple, split second, suspend, vanishing, absorb, aura swap, delve, fortify, frenzy, gravestorm,
poisonous, transfigure, champion, changeling, evoke, hideaway, prowl, reinforce, conspire, persist, wither,
retrace, devour, exalted, unearth, cascade, annihilator, level up, rebound, totem armor, infect, battle cry,
living weapon, undying, miracle, soulbond, overload, scavenge, unleash, cipher, evolve, extort, fuse, bestow,
tribute, dethrone, hidden agenda, double agenda, outlast, prowess, dash, exploit, menace, renown, awaken, devoid,
ingest, myriad, surge, skulk, emerge, escalate, melee, crew, fabricate, partner, undaunted, improvise, aftermath,
embalm, eternalize, afflict, ascend, assist, jump-start, mentor, afterlife, riot, spectacle, escape, companion,
mutate, encore, boast, foretell, demonstrate, daybound, nightbound, disturb, decayed, cleave, training, compleated,
reconfigure, blitz, casualty, enlist, read ahead, ravenous, squad, prototype, toxic, backup, bargain, craft,
disguise, plot, saddle, spree, freerunning, gift, offspring, impending, exhaust
""".replace("\n", " ").split(","))
MULTI_WORD = sorted((k for k in KEYWORDS if " " in k), key=len, reverse=True)
# Keyword abilities that take no parameter at all (CR 702: "Flying", never "Flying 3"), and those that cannot
# stand without their cost or number (CR 702.29 "Cycling [cost]", 702.6 "Equip [cost]", 702.122 "Crew N", ...).
NO_PARAMETER = frozenset("""
deathtouch defender flash flying haste indestructible intimidate lifelink reach shroud trample vigilance menace
prowess changeling convoke delve devoid exalted infect persist undying wither storm cascade fear shadow
horsemanship flanking rebound cipher evolve extort fuse unleash soulbond epic gravestorm conspire retrace
sunburst skulk melee undaunted improvise ascend riot mentor phasing
""".split()) | {"double strike", "first strike", "split second", "battle cry", "living weapon"}
NEEDS_PARAMETER = frozenset("""
cycling equip kicker multikicker flashback madness morph megamorph ninjutsu unearth dash bestow embalm eternalize
buyback echo entwine evoke prowl transmute scavenge overload encore blitz disturb spectacle surge emerge fortify
crew afflict annihilator bushido rampage fading modular graft bloodthirst absorb frenzy poisonous devour tribute
renown fabricate dredge soulshift ripple amplify reinforce afterlife toxic backup landcycling
""".split()) | {"level up", "basic landcycling", "commander ninjutsu", "cumulative upkeep"}

MANA_SYMBOL = re.compile(r"\{(?:\d+|[WUBRGCSXYZ]|[WUBRG2]/[WUBRG]|[WUBRG]/P|[WUBRG]/[WUBRG]/P|C/[WUBRG])\}")
COST_SYMBOL = re.compile(r"\{[^{}]*\}")
PT_VALUE = re.compile(r"^(?:-?\d+|\*|X|\d+\+\*|\*\+\d+|\d+-\*|\*²|½|\d+½|\?)$")
PT_LINE = re.compile(r"^([^/\s]+)/([^/\s]+)$")
LOYALTY_LINE = re.compile(r"^Loyalty (\S+)$")
LOYALTY_ABILITY = re.compile(r"^[+−\-]?(?:\d+|X): ")
TRIGGER = re.compile(r"^(?:When|Whenever|At) ")
CHAPTER = re.compile(r"^[IVX]+(?:, [IVX]+)* — ")
LEVEL = re.compile(r"^LEVEL \d+(?:-\d+|\+)$")
ABILITY_WORD = re.compile(r"^[A-Z][a-z'-]+(?: [a-z'-]+)* — ")  # Landfall, Metalcraft, Hellbent, Will of the council ...
SENTENCE_END = re.compile(r"""(?:[.!)"]|\.\)|\.")$""")
# What may stand in an activated ability's cost, besides mana symbols: tapping, untapping, energy, and the
# verbs of costs (Comprehensive Rules 118, 602.1).
COST_WORDS = re.compile(r"^(?:\{[TQE]\}|Sacrifice|Discard|Pay|Remove|Exile|Return|Tap|Untap|Put|Reveal|Mill|"
                        r"Collect|Forage|Unattach|Choose|Blight|Exert|Behold|Waterbend|Airbend|Earthbend|Expend)\b")


class ParseError(ValueError):
    """A document that does not have a card's layout; the message says where."""


# ---------------------------------------------------------------------------------- the entry points

@dataclass
class Verdict:
    """What the grammar says of one document."""

    parses: bool
    passes: bool
    failures: dict[str, str]
    card: WholeCard | None = None


def judge(document: str, vocabulary: CardVocabulary) -> Verdict:
    """Parse, then check: the two answers and the reasons."""
    try:
        card = parse_card(document)
    except ParseError as error:
        return Verdict(False, False, {"parse": str(error)})
    check = check_card(card, vocabulary)
    return Verdict(True, check.passes, check.failures, card)


@dataclass
class CardCheck:
    """Each rule's verdict on one card: the failures, by rule, with a reason each."""

    failures: dict[str, str] = field(default_factory=dict)

    @property
    def passes(self) -> bool:
        return not self.failures

    def fail(self, rule: str, reason: str) -> None:
        self.failures.setdefault(rule, reason)


RULES = ("name", "cost", "type_line", "pt", "loyalty", "text", "consistency")


def check_card(card: WholeCard, vocabulary: CardVocabulary) -> CardCheck:
    """Every rule's verdict on a parsed card (module docstring)."""
    result = CardCheck()
    _, types, subtypes = split_type_line(card.type_line)
    for rule, reason in (("name", check_name(card.name)),
                         ("cost", check_cost(card.mana_cost, types)),
                         ("type_line", check_type_line(card.type_line, vocabulary)),
                         ("pt", check_pt(card, types, subtypes)),
                         ("loyalty", check_loyalty(card, types)),
                         ("consistency", check_consistency(card, types, subtypes))):
        if reason:
            result.fail(rule, reason)
    for line in card.text:
        reason = check_text_line(line, card.name)
        if reason:
            result.fail("text", reason)
            break
    return result


# -------------------------------------------------------------------------------------- the reading



def split_name_and_cost(line: str) -> tuple[str, str]:
    """A card's first line: (the name, the mana cost after it), the cost "" where there is none."""
    found = re.match(r"^(.*?)\s*((?:\{[^{}]*\})*)$", line)
    return found.group(1), found.group(2)


def is_pt_line(line: str) -> bool:
    """A power/toughness line ("2/2", "*/1+*"): never a letter in lower case, which every rules-text line has."""
    return bool(PT_LINE.match(line)) and not re.search(r"[a-z]", line)


def parse_card(document: str) -> WholeCard:
    """The fields of a whole-card document (mtg/whole_cards.py's layout); ParseError where it has none."""
    lines = [line.strip() for line in document.strip().split("\n")]
    if len(lines) < 2 or not all(lines):
        raise ParseError("a card needs a name line and a type line, and no empty line")
    name, cost = split_name_and_cost(lines[0])
    if not name or "{" in name or "}" in name:
        raise ParseError(f"the first line must be the name, then the mana cost: {lines[0]!r}")
    power = toughness = loyalty = None
    rest = lines[2:]
    if rest and is_pt_line(rest[-1]):
        power, toughness = PT_LINE.match(rest[-1]).groups()
        rest = rest[:-1]
    elif rest and (found := LOYALTY_LINE.match(rest[-1])):
        loyalty = found.group(1)
        rest = rest[:-1]
    for index, line in enumerate(rest):  # a leveler's P/T stands under its LEVEL line, nowhere else
        if is_pt_line(line) and not (index and LEVEL.match(rest[index - 1])):
            raise ParseError("a power/toughness line stands before the end of the card")
    # the card's colours are its mana cost's (CR 202.2); a parsed card has no colour indicator or other layout
    colors = "".join(c for c in "WUBRG" if any(c in symbol for symbol in COST_SYMBOL.findall(cost)))
    return WholeCard(name, cost, lines[1], tuple(rest), power, toughness, loyalty, colors=colors, layout="normal")


# ------------------------------------------------------------------------------------ the rule checks


def split_type_line(type_line: str) -> tuple[list[str], list[str], list[str]]:
    """(supertypes, card types, subtypes) as written: the words before " — " that are supertypes, the other
    words before it, and the words after it (a subtype of several words, e.g. "Urza's", stays one word)."""
    head, _, tail = type_line.partition(" — ")
    words = head.split()
    supertypes = [w for w in words if w in SUPERTYPES]
    types = [w for w in words if w not in SUPERTYPES]
    return supertypes, types, tail.split()


@dataclass(frozen=True)
class CardVocabulary:
    """The game's dictionary of subtypes, each with the card types it belongs to, read from real cards."""

    subtypes: dict[str, frozenset[str]]

    @staticmethod
    def from_type_lines(type_lines: Iterable[str]) -> "CardVocabulary":
        found: dict[str, set[str]] = {}
        for line in type_lines:
            _, types, subtypes = split_type_line(line)
            # a Tribal / Kindred card's subtypes are creature types ("Tribal Instant — Elf"): Elf is a
            # creature type, not an instant's
            owners = {"Creature"} if {"Tribal", "Kindred"} & set(types) else set(types)
            for subtype in subtypes:
                found.setdefault(subtype, set()).update(owners)
        return CardVocabulary({name: frozenset(owners) for name, owners in found.items()})

    @staticmethod
    def from_cards(cards: Iterable[WholeCard]) -> "CardVocabulary":
        return CardVocabulary.from_type_lines(card.type_line for card in cards)


def check_cost(cost: str, types: list[str]) -> str | None:
    """None when `cost` is a well-formed mana cost for a card of `types`, else the reason."""
    if not cost:
        return None
    if "Land" in types:
        return "a land has no mana cost"
    symbols = COST_SYMBOL.findall(cost)
    if "".join(symbols) != cost:
        return f"{cost!r} is not a sequence of {{...}} symbols"
    bad = [s for s in symbols if not MANA_SYMBOL.fullmatch(s)]
    if bad:
        return f"{bad[0]} is not a mana symbol"
    kinds = ["x" if s in ("{X}", "{Y}", "{Z}") else "n" if s[1:-1].isdigit() else "c" for s in symbols]
    if kinds.count("n") > 1:
        return "more than one generic number"
    if "".join(kinds) != "".join(sorted(kinds, key="xnc".index)):
        return "X, then the generic number, then the other symbols"
    return None


def check_type_line(type_line: str, vocabulary: CardVocabulary) -> str | None:
    supertypes, types, subtypes = split_type_line(type_line)
    if not types:
        return "no card type"
    unknown = [t for t in types if t not in CARD_TYPES]
    if unknown:
        return f"{unknown[0]!r} is not a card type"
    if len(set(supertypes)) != len(supertypes) or len(set(types)) != len(types):
        return "a type written twice"
    owners = {"Creature" if t in ("Tribal", "Kindred") else t for t in types}
    for subtype in subtypes:
        known = vocabulary.subtypes.get(subtype)
        if known is None:
            return f"{subtype!r} is not a subtype of any real card"
        if not known & owners:
            return f"{subtype!r} is a subtype of {'/'.join(sorted(known))}, not of {'/'.join(types)}"
    return None


def check_pt(card: WholeCard, types: list[str], subtypes: list[str]) -> str | None:
    needs = "Creature" in types or "Vehicle" in subtypes
    has = card.power is not None
    if needs and not has:
        return "a creature (or Vehicle) needs power/toughness"
    if has and not needs:
        return "power/toughness on a card that is not a creature"
    if has and not (PT_VALUE.match(card.power) and PT_VALUE.match(card.toughness)):
        return f"{card.power}/{card.toughness} is not a power/toughness"
    return None


def check_loyalty(card: WholeCard, types: list[str]) -> str | None:
    needs = "Planeswalker" in types
    if needs and card.loyalty is None:
        return "a planeswalker needs loyalty"
    if card.loyalty is not None and not needs:
        return "loyalty on a card that is not a planeswalker"
    if card.loyalty is not None and not re.fullmatch(r"\d+|X|\*", card.loyalty):
        return f"loyalty {card.loyalty!r} is not a number"
    return None


def _balanced(line: str) -> bool:
    depth = 0
    for char in line:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0 and (line.count('"') + line.count("“") + line.count("”")) % 2 == 0


# Keywords whose parameter is words ("Enchant creature", "Protection from red", "Affinity for artifacts",
# "Splice onto Arcane {1}{R}", "Champion an Elf", "Equip Knight {1}"); the others take a cost or a number.
TAKES_WORDS = ("enchant", "protection", "hexproof from", "affinity", "splice", "champion", "bands with other",
               "offering", "partner", "equip", "landwalk", "changeling")


def is_keyword_item(item: str) -> bool:
    """One item of a keyword line: a keyword ability with its parameters ("Equip {2}", "Protection from red",
    "Cumulative upkeep—Pay 1 life.", "Rampage 2", "Bushido 1", "Hexproof from blue"): a cost, a number, an
    em dash and a cost phrase that ends, or (for the keywords that take them) a few words."""
    text = re.sub(r"\s*\(.*\)$", "", item.strip())  # reminder text
    lower = text.lower()
    keyword = next((k for k in MULTI_WORD if lower == k or lower.startswith((k + " ", k + "—"))), None)
    if keyword is None:
        keyword = re.split(r"[\s—]", lower, maxsplit=1)[0]
        if keyword not in KEYWORDS and not keyword.endswith(("walk", "cycling")):
            return False
    parameter = text[len(keyword):].strip()
    if keyword in NO_PARAMETER:  # CR 702: these keywords are whole words, no cost, number or quality after them
        return not parameter
    if not parameter:
        return keyword not in NEEDS_PARAMETER and not keyword.endswith("cycling")  # "Cycling" alone: no cost
    if parameter.startswith("—"):
        return parameter.endswith((".", ")"))
    if re.fullmatch(r"(?:\{[^{}]+\})+|\d+|X|N|(?:\d+|X)—(?:\{[^{}]+\})+", parameter.rstrip(".")):
        return True  # a cost, a number, or both ("Reinforce 1—{1}{G}", "Suspend 10—{R}")
    words = parameter.rstrip(".").split()
    return keyword.startswith(TAKES_WORDS) and len(words) <= 6


def is_keyword_line(line: str) -> bool:
    body = re.sub(r"\s*\([^()]*\)$", "", line)  # the reminder text after the keywords
    if not body or not body[0].isupper():
        return False
    items = re.split(r"[,;] (?:and )?", body)
    # "Protection from Vampires, from Werewolves, and from Zombies": the list goes on after its keyword
    if items[0].startswith("Enchant "):  # "Enchant creature, land, or planeswalker"
        return True
    return is_keyword_item(items[0]) and all(is_keyword_item(item) or item.startswith("from ") for item in items[1:])


def check_activated_cost(cost: str) -> bool:
    """An activated ability's cost: comma-separated parts, each mana symbols, {T}/{Q}/{E}, or a cost verb's
    phrase ("Sacrifice a creature", "Pay 2 life", "Discard a card"), whose list may go on in the next parts
    ("Sacrifice a blue creature, a black creature, and a red creature")."""
    verb_seen = False
    for part in re.split(r",\s*(?:and\s+)?| or (?=\{)", cost):  # "{3}, {T} or {R}, {T}": alternative costs
        part = part.strip()
        if not part:
            return False
        symbols = COST_SYMBOL.findall(part)
        if symbols and "".join(symbols) == part.replace(" ", ""):
            if all(MANA_SYMBOL.fullmatch(s) or s in ("{T}", "{Q}", "{E}") for s in symbols):
                continue
            return False
        if COST_WORDS.match(part):
            verb_seen = True
        elif not (verb_seen and (part[0].islower() or part.startswith(SELF))):
            return False
    return True


def activated_cost(line: str) -> str | None:
    """The part before ": " of a line shaped as an activated ability ("{2}{R}, {T}: ..."), else None: not a
    trigger ("When ...: ..."), not a colon inside a quoted ability, not a long sentence that has a colon."""
    cost, colon, _ = line.partition(": ")
    if colon and not TRIGGER.match(line) and '"' not in cost and "“" not in cost and len(cost) < 90:
        return cost
    return None


def check_text_line(line: str, card_name: str) -> str | None:
    if card_name and card_name in line and card_name != SELF:
        return f"the card's name is spelled out ({card_name!r}) where {SELF!r} stands for it"
    if not _balanced(line):
        return f"unbalanced parentheses or quotes: {line!r}"
    if LEVEL.match(line):
        return None
    line = re.sub(r"^(?:• |[IVX]+(?:, [IVX]+)* — )", "", line)  # a mode or a chapter: its sentence follows
    if line.startswith("(") and line.endswith(")"):  # reminder text alone on its line
        return None
    if is_pt_line(line):  # a leveler's P/T (parse_card placed it)
        return None
    line = ABILITY_WORD.sub("", line, count=1)  # "Metalcraft — {4}: ..." reads as "{4}: ..."
    if is_keyword_line(line):
        return None
    if not re.search(r"[A-Za-z]", line):
        return f"no words: {line!r}"
    if LOYALTY_ABILITY.match(line):
        return None if SENTENCE_END.search(line) else f"a loyalty ability without its end: {line!r}"
    cost = activated_cost(line)
    if cost is not None and not check_activated_cost(cost):
        return f"an activated ability's cost does not read: {cost!r}"
    first = line.lstrip('"“(')[:1]
    if not (first.isupper() or first.isdigit() or first in (SELF, "{", "+", "−", "-")):
        return f"a line starts in the middle of a sentence: {line!r}"
    if not SENTENCE_END.search(line) and not line.endswith(("—", ":")):
        return f"a line that does not end as a sentence: {line!r}"
    return None


def check_consistency(card: WholeCard, types: list[str], subtypes: list[str]) -> str | None:
    text = "\n".join(card.text)
    lower = text.lower()
    if "Aura" in subtypes and not re.search(r"(?m)^Enchant ", text):
        return "an Aura without an Enchant line"
    if "Equipment" in subtypes and not re.search(r"\bEquip\b", text):  # not "Equipped creature ..."
        return "Equipment without Equip"
    if "Vehicle" in subtypes and not re.search(r"\bCrew\b", text):
        return "a Vehicle without Crew"
    is_spell = bool(set(types) & set(SPELL_TYPES))
    if is_spell and not card.text:
        return "an instant or sorcery with no rules text"
    if is_spell and not set(types) & PERMANENT_TYPES:
        for line in card.text:
            reason = _spell_ability(ABILITY_WORD.sub("", line, count=1))
            if reason:
                return reason
    if "{X}" in card.mana_cost and "X" not in text:
        return "X in the cost, not in the text"
    if re.search(r"(?:~|it) was kicked", lower) and "target spell" not in lower and "kicker" not in lower:
        return "'kicked' without Kicker"
    if any(LEVEL.match(line) for line in card.text) and "level up" not in lower:
        return "level lines without Level up"
    return None


def _spell_ability(line: str) -> str | None:
    """An instant or sorcery is never on the battlefield, so a permanent's abilities mean nothing on it. Every
    real one's activated abilities and triggers say where the card is when they work: in its owner's hand or
    graveyard, exiled, suspended, on the stack ("Return ~ from your graveyard", "Reveal ~ from your hand",
    "When you cycle ~", "if ~ is in your graveyard", "counters on ~", "the creature ~ haunts"), or they are
    delayed ("At the beginning of the next end step", "... this turn", "... this combat"). "{1}{U}: ~ deals 3
    damage" and "At the beginning of your upkeep, ..." on an instant are a creature's abilities on a spell."""
    if SPELL_IN_A_ZONE.search(line):
        return None
    if TRIGGER.match(line):
        if re.search(r"\b(?:next|this turn|this combat|that (?:card|player|spell|creature))\b", line):
            return None
        return f"an instant or sorcery with a permanent's trigger: {line[:60]!r}"
    cost = activated_cost(line)
    if cost is not None and check_activated_cost(cost):
        return f"an instant or sorcery with a permanent's activated ability: {cost!r}"
    return None


def check_name(name: str) -> str | None:
    """A name is words: one that ends in a mana cost written without braces ("Glory Seeker 1W") is a cost
    that lost its grammar."""
    last = name.split()[-1]
    if re.fullmatch(r"[\dWUBRGCXP/]+", last) and (re.search(r"[\dWUBRG]", last) or "XX" in last) and (
            len(last) > 1 or last.isdigit()):
        return f"the name ends in {last!r}: a mana cost without its braces"
    return None
