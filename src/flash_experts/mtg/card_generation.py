"""Whole cards from a model fine-tuned on card documents (mtg/whole_cards.py), each judged by the card grammar.

Every card comes with its verdict (parses, passes every rule check, the failed rules), its nearest real card by
name and by rules text, and whether it is new (its name is no real card's). A document starts with the name, so
a request for a type line, colours or a mana cost is met by sampling and keeping the cards that match it (the
samples drawn are counted and reported), not by a prompt.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

from flash_experts.data.tokens import document_start_ids
from flash_experts.errors import ConfigError
from flash_experts.generation.generate import generate
from flash_experts.generation.sampling import SamplingConfig
from flash_experts.mtg.card_grammar import COST_SYMBOL, CardVocabulary, check_cost, judge, split_name_and_cost
from flash_experts.mtg.cards import COLOR_ORDER, name_key, normalize_colors
from flash_experts.mtg.whole_cards import WholeCard

CARD_TEMPERATURE = 0.8  # a starting point; cards are long, and a hotter sampler breaks their grammar sooner
CARD_MAX_NEW_TOKENS = 160  # a card document is about 50 GPT-2 tokens; the longest real ones about 150


@dataclass(frozen=True)
class CardRequest:
    """What the caller wants of a card: a type line it starts with, its exact colours, its exact mana cost."""

    type_line: str | None = None
    colors: str | None = None  # WUBRG letters in order, "" colourless
    mana_cost: str | None = None

    @staticmethod
    def of(type_line: str | None = None, colors: str | None = None, mana_cost: str | None = None) -> "CardRequest":
        """Checked: an unknown colour or a malformed cost is a ConfigError (before any model loads)."""
        if colors is not None:
            if not colors.strip():  # an empty --colors is a slip, not a request for colourless (that is C)
                raise ConfigError("--colors must not be empty: give W, U, B, R, G (or their names), or C for "
                                  "colourless")
            try:
                colors = "" if colors.strip().upper() in ("C", "COLORLESS", "COLOURLESS") else normalize_colors(colors)
            except ValueError as error:
                raise ConfigError(f"--colors: {error}") from None
        if mana_cost is not None:
            reason = check_cost(mana_cost.replace(" ", ""), [])
            if reason or not mana_cost.strip():
                raise ConfigError(f"--cost {mana_cost!r} is not a mana cost ({reason or 'empty'}), e.g. '{{1}}{{G}}'")
            mana_cost = mana_cost.replace(" ", "")
        if type_line is not None and not type_line.strip():
            raise ConfigError("--type must not be empty")
        return CardRequest(type_line and " ".join(type_line.split()), colors, mana_cost)

    def accepts(self, mana_cost: str, type_line: str) -> bool:
        if self.type_line is not None and not type_line.startswith(self.type_line):
            return False
        if self.colors is not None and cost_colors(mana_cost) != self.colors:
            return False
        return self.mana_cost is None or mana_cost == self.mana_cost


def cost_colors(mana_cost: str) -> str:
    """The colours a mana cost's symbols give a card (its colour, but for colour indicators and devoid)."""
    letters = {letter for symbol in COST_SYMBOL.findall(mana_cost) for letter in symbol if letter in COLOR_ORDER}
    return "".join(c for c in COLOR_ORDER if c in letters)


@dataclass
class GeneratedCard:
    document: str
    parses: bool
    passes: bool
    failures: dict[str, str]
    name: str | None
    is_new: bool | None  # its name is no real card's; None when it does not parse
    nearest_by_name: str | None
    nearest_by_text: str | None
    text_similarity: float | None  # Jaccard of rules-text words with the nearest by text, 0-1

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CardBatch:
    cards: list[GeneratedCard]  # those that match the request, in the order drawn
    samples: int  # every sample drawn, matching or not
    judged: list[GeneratedCard] = field(default_factory=list)  # every sample, for the rates

    def rates(self) -> dict[str, float]:
        total = len(self.judged) or 1
        parsed = [c for c in self.judged if c.parses]
        names = [name_key(c.name) for c in parsed if c.name]
        return {"parse": len(parsed) / total, "pass": sum(c.passes for c in self.judged) / total,
                "unique": len(set(names)) / len(names) if names else 0.0,
                "new": sum(bool(c.is_new) for c in parsed) / len(parsed) if parsed else 0.0}

    def failures_by_rule(self) -> dict[str, int]:
        """How many samples fail each rule ("parse": those that do not parse; a card may fail several), most
        failed first."""
        return dict(Counter(rule for card in self.judged for rule in card.failures).most_common())


class RealCards:
    """The real cards a generated one is compared with: names for novelty and the nearest name, rules-text
    words for the nearest text."""

    def __init__(self, cards: Iterable[WholeCard]):
        self.cards = list(cards)
        self.names = [card.name for card in self.cards]
        self.keys = {name_key(name) for name in self.names}
        self.words = [_words(" ".join(card.text)) for card in self.cards]
        # Each name's character counts, so that difflib's quick_ratio (an upper bound of its ratio) is one
        # matrix operation over every name at once; see nearest_name.
        self._alphabet = {char: i for i, char in enumerate(sorted({c for name in self.names for c in name}))}
        self._counts = np.zeros((len(self.names), len(self._alphabet) + 1), dtype=np.int32)
        for row, name in enumerate(self.names):
            for char in name:
                self._counts[row, self._alphabet[char]] += 1
        self._lengths = np.array([len(name) for name in self.names], dtype=np.int64)

    def nearest_name(self, name: str) -> str | None:
        """The real name difflib.get_close_matches(name, names, n=1, cutoff=0) returns, found without scoring
        all 16K names: every name's quick_ratio bounds its ratio from above, so names are scored in falling
        bound and the search stops when no bound left can reach the best (ties go to the greater string, as
        difflib's nlargest orders them)."""
        if not self.names:
            return None
        mine = np.zeros(self._counts.shape[1], dtype=np.int32)
        for char in name:
            mine[self._alphabet.get(char, len(self._alphabet))] += 1
        mine[-1] = 0  # characters no real name has match nothing
        total = self._lengths + len(name)
        bounds = 2.0 * np.minimum(self._counts, mine).sum(axis=1) / np.maximum(total, 1)
        best: tuple[float, str] | None = None
        matcher = difflib.SequenceMatcher()
        matcher.set_seq2(name)
        for row in np.argsort(-bounds, kind="stable"):
            if best is not None and bounds[row] < best[0]:
                break
            matcher.set_seq1(self.names[row])
            scored = (matcher.ratio(), self.names[row])
            if best is None or scored > best:
                best = scored
        return best[1]

    def nearest_text(self, text: str) -> tuple[str | None, float | None]:
        words = _words(text)
        if not words:
            return None, None
        best, score = None, -1.0
        for name, theirs in zip(self.names, self.words):
            if theirs:
                similarity = len(words & theirs) / len(words | theirs)
                if similarity > score:
                    best, score = name, similarity
        return best, (score if best is not None else None)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z~]+|\{[^}]+\}|[+\-−]?\d+", text.lower()))


def judge_generated(document: str, vocabulary: CardVocabulary, real: RealCards | None) -> GeneratedCard:
    verdict = judge(document, vocabulary)
    card = verdict.card
    if card is None:
        return GeneratedCard(document, False, False, verdict.failures, None, None, None, None, None)
    nearest_text, similarity = real.nearest_text(" ".join(card.text)) if real else (None, None)
    return GeneratedCard(document, True, verdict.passes, verdict.failures, card.name,
                         None if real is None else name_key(card.name) not in real.keys,
                         real.nearest_name(card.name) if real else None, nearest_text, similarity)


def generate_cards(model, tokenizer, count: int, vocabulary: CardVocabulary, *, request: CardRequest = CardRequest(),
                   real: RealCards | None = None, config: SamplingConfig | None = None, seed: int | None = None,
                   max_rounds: int = 5, batch_size: int | None = None,
                   max_new_tokens: int = CARD_MAX_NEW_TOKENS) -> CardBatch:
    """Sample whole cards until `count` match `request` (or `max_rounds` batches ran), each judged."""
    if not isinstance(count, int) or count < 1:
        raise ConfigError(f"the number of cards must be >= 1, got {count!r}")
    if not isinstance(max_rounds, int) or max_rounds < 1:
        raise ConfigError(f"max_rounds must be >= 1, got {max_rounds!r}")
    config = config or SamplingConfig(temperature=CARD_TEMPERATURE)
    batch_size = batch_size or min(2 * count, 64)
    batch = CardBatch([], 0)
    start = document_start_ids(tokenizer)  # a new document, as in training (not BOS: see document_start_ids)
    for round_index in range(max_rounds):
        result = generate(model, tokenizer, torch.tensor([start] * batch_size), config, max_new_tokens,
                          seed=None if seed is None else seed + round_index)
        for text in result.texts:
            judged = judge_generated(text.strip(), vocabulary, real)
            batch.judged.append(judged)
            batch.samples += 1
            fields = judged.document.split("\n")
            cost_line = split_name_and_cost(fields[0])[1]
            type_line = fields[1] if len(fields) > 1 else ""
            if len(batch.cards) < count and request.accepts(cost_line, type_line):
                batch.cards.append(judged)
        if len(batch.cards) >= count:
            break
    return batch


def card_lines(card: GeneratedCard) -> list[str]:
    """A card for the terminal: its document, then one line of verdict."""
    verdict = ("passes every rule check" if card.passes else
               "parses; fails " + "; ".join(f"{rule}: {why}" for rule, why in card.failures.items()) if card.parses
               else "does not parse: " + card.failures.get("parse", ""))
    origin = "" if card.is_new is None else (" new" if card.is_new else " real card")
    nearest = ""
    if card.nearest_by_name:
        nearest = f"; nearest real card by name {card.nearest_by_name!r}"
    if card.nearest_by_text:
        nearest += f", by text {card.nearest_by_text!r} ({card.text_similarity:.2f})"
    return [*("  " + line for line in card.document.split("\n")), f"  [{verdict}{origin}{nearest}]"]

