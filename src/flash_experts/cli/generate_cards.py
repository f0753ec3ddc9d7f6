"""`flash-experts generate-cards MODEL [-n 20] [--type "Creature — Elf"] [--colors G] [--cost "{1}{G}"] [--json]`:
whole Magic cards from a model fine-tuned on card documents (`prepare-data mtg --cards`), each judged by the
card grammar (mtg/card_grammar.py) and set beside its nearest real card."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from flash_experts.cli.common import add_sampling_arguments

    parser = subparsers.add_parser(
        "generate-cards",
        help="generate whole Magic cards (cost, type, rules text, P/T), each with its validity and nearest real card",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint folder fine-tuned on `prepare-data mtg --cards`")
    parser.add_argument("-n", "--num-cards", type=int, default=20, metavar="N", help="cards wanted (default 20)")
    parser.add_argument("--type", dest="type_line", default=None, metavar="TYPE",
                        help='keep cards whose type line starts with TYPE, e.g. "Creature — Elf"')
    parser.add_argument("--colors", default=None, help="keep cards of exactly these colours (W U B R G letters or "
                                                       "names; C = colourless), read from the mana cost")
    parser.add_argument("--cost", default=None, help='keep cards with exactly this mana cost, e.g. "{1}{G}"')
    parser.add_argument("--max-rounds", type=int, default=5, metavar="N",
                        help="sampling batches at most while looking for N matching cards (default 5)")
    parser.add_argument("--json", action="store_true", help="print every card's fields and verdict as JSON")
    add_sampling_arguments(parser, temperature=0.8, top_k=0, top_p=0.95, max_new_tokens=160)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flash_experts.cli.common import load_for_generation, sampling_config_from_args
    from flash_experts.errors import UserError
    from flash_experts.mtg.card_generation import CardRequest, card_lines, generate_cards
    from flash_experts.mtg.card_grammar import CardVocabulary

    if args.num_cards < 1:
        raise UserError(f"-n/--num-cards must be >= 1, got {args.num_cards}")
    if args.max_rounds < 1:
        raise UserError(f"--max-rounds must be >= 1, got {args.max_rounds}")
    request = CardRequest.of(args.type_line, args.colors, args.cost)  # before the model loads
    config = sampling_config_from_args(args)
    real, source = _real_cards()
    vocabulary = CardVocabulary.from_cards(real.cards) if real else CardVocabulary({})
    model, tokenizer = load_for_generation(args.model, args.device, args.dtype, args.quantize)
    batch = generate_cards(model, tokenizer, args.num_cards, vocabulary, request=request, real=real, config=config,
                           seed=args.seed, max_rounds=args.max_rounds, max_new_tokens=args.max_new_tokens)
    rates = batch.rates()
    if args.json:
        print(json.dumps({"cards": [card.as_dict() for card in batch.cards], "samples": batch.samples,
                          "rates": rates, "reference": source}, indent=1))
        return 0
    for index, card in enumerate(batch.cards, 1):
        print(f"card {index}:")
        print("\n".join(card_lines(card)))
    if len(batch.cards) < args.num_cards:
        print(f"[only {len(batch.cards)} cards matched the request in {batch.samples} samples]", file=sys.stderr)
    print(f"[{batch.samples} samples: parse {rates['parse']:.0%}, pass every rule check {rates['pass']:.0%}, "
          f"unique names {rates['unique']:.0%}, new names {rates['new']:.0%}; reference: {source}]", file=sys.stderr)
    return 0


def _real_cards():
    """(RealCards, where they came from): the offline MTGJSON when cached (no download here), else none, and
    without it the type-line check knows no subtype."""
    from flash_experts.errors import UserError
    from flash_experts.mtg.card_generation import RealCards
    from flash_experts.mtg.whole_cards import load_offline_whole_cards

    try:
        cards = load_offline_whole_cards(fetch=False)
    except (UserError, OSError):
        return None, "none (the offline MTGJSON is not cached: subtypes and novelty cannot be judged)"
    return RealCards(cards), f"{len(cards)} real cards of the offline MTGJSON"
