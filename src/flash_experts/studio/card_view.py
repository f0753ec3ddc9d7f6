"""A whole card as the studio draws it: its fields, each token in its field with the expert that took it, the
grammar's verdict, and per MoE layer how much the experts divide the fields (the field atlas).

The field atlas is the race's domain atlas (evaluation/domain_atlas.py) with the card's fields as the domains:
the mutual information between a token's field and the expert its router chose first, in bits, against the
entropy of the field (its ceiling), and each field's share of each expert. On one card it is a sketch (tens
of tokens); the page says so.
"""

from __future__ import annotations

import math
from typing import Any

from flash_experts.mtg.card_grammar import LOYALTY_LINE, CardVocabulary, is_pt_line, judge, split_name_and_cost

FIELDS = ("name", "cost", "type", "text", "pt")


def field_spans(document: str) -> list[tuple[int, int, str]]:
    """(start, end, field) character ranges of a whole-card document (mtg/whole_cards.py's layout); a line's
    newline belongs to its field."""
    spans, offset = [], 0
    lines = document.split("\n")
    for index, line in enumerate(lines):
        end = offset + len(line) + (1 if index < len(lines) - 1 else 0)
        if index == 0:
            name_end = offset + len(split_name_and_cost(line)[0])
            spans += [(offset, name_end, "name"), (name_end, end, "cost")]
        elif index == 1:
            spans.append((offset, end, "type"))
        elif index == len(lines) - 1 and index >= 2 and (is_pt_line(line) or LOYALTY_LINE.match(line)):
            spans.append((offset, end, "pt"))
        else:
            spans.append((offset, end, "text"))
        offset = end
    return spans


def token_pieces(tokenizer: Any, document: str) -> tuple[list[int], list[str], list[str]]:
    """The document's token ids, each token's own piece of the document's text, and its field (where the
    piece's first visible character falls). The pieces come from the tokenizer's character offsets, so a
    character split over several byte-level tokens ("—" is three) stands whole on its first token and the
    others show nothing, instead of three broken bytes."""
    encoded = tokenizer(document, add_special_tokens=False, return_offsets_mapping=True)
    spans = field_spans(document)
    pieces, fields, covered = [], [], 0
    for start, end in encoded["offset_mapping"]:
        piece = document[start:end] if start >= covered else ""
        covered = max(covered, end)
        at = start + len(piece) - len(piece.lstrip()) if piece.strip() else start
        pieces.append(piece)
        fields.append(next((field for lo, hi, field in spans if lo <= at < hi), spans[-1][2]))
    return list(encoded["input_ids"]), pieces, fields


def field_atlas(fields: list[str | None], experts_by_layer: list[list[int]], moe_layers: list[int],
                num_experts: int) -> list[dict[str, Any]]:
    """Per MoE layer: I(field; top-1 expert) in bits, H(field), and each field's share of each expert."""
    out = []
    for layer, experts in zip(moe_layers, experts_by_layer):
        pairs = [(f, e) for f, e in zip(fields, experts) if f is not None]
        total = len(pairs)
        if not total:
            continue
        joint: dict[tuple[str, int], int] = {}
        for pair in pairs:
            joint[pair] = joint.get(pair, 0) + 1
        field_count = {f: sum(c for (g, _), c in joint.items() if g == f) for f in FIELDS}
        expert_count = {e: sum(c for (_, x), c in joint.items() if x == e) for e in range(num_experts)}
        information = sum(c / total * math.log2(c * total / (field_count[f] * expert_count[e]))
                          for (f, e), c in joint.items())
        entropy = -sum(c / total * math.log2(c / total) for c in field_count.values() if c)
        shares = {f: [joint.get((f, e), 0) / field_count[f] if field_count[f] else 0.0 for e in range(num_experts)]
                  for f in FIELDS}
        out.append({"layer": layer, "information_bits": information, "field_entropy_bits": entropy,
                    "tokens": {f: field_count[f] for f in FIELDS}, "shares": shares})
    return out


def card_view(document: str, tokenizer: Any, trace_of: Any, vocabulary: CardVocabulary, start_ids: list[int],
              num_experts: int) -> dict[str, Any]:
    """What the page draws of one card (module docstring). `trace_of(token_ids)` is studio/trace.py's trace of
    the start tokens (data/tokens.py's document_start_ids: a document boundary as in training) and then the
    document's tokens."""
    verdict = judge(document, vocabulary)
    card = verdict.card
    ids, pieces, fields = token_pieces(tokenizer, document)
    trace = trace_of([*start_ids, *ids])
    top1 = [[choices[0] for choices in layer] for layer in trace.experts]
    return {
        "document": document,
        "verdict": {"parses": verdict.parses, "passes": verdict.passes, "failures": verdict.failures},
        "card": None if card is None else {
            "name": card.name, "cost": card.mana_cost, "type": card.type_line, "text": list(card.text),
            "pt": f"{card.power}/{card.toughness}" if card.power is not None else (
                f"Loyalty {card.loyalty}" if card.loyalty is not None else None)},
        "tokens": [*({"text": "", "field": None, "id": token} for token in start_ids),
                   *({"text": piece, "field": field, "id": token} for piece, field, token in zip(pieces, fields, ids))],
        "moe_layers": trace.moe_layers,
        "experts": top1,
        "atlas": field_atlas([None] * len(start_ids) + fields, top1, trace.moe_layers, num_experts),
    }
