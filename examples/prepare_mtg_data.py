"""Step 1 of the MTG chain: Magic: The Gathering card names as token files, step by step with the library.

    python examples/prepare_mtg_data.py                     # -> data/mtg (offline card data, the base's tokenizer)
    python examples/prepare_mtg_data.py --conditioned       # "type line | colours | name" documents
    python examples/prepare_mtg_data.py --cards             # whole cards -> data/mtg-cards (docs/CARDS.md)
    python examples/prepare_mtg_data.py --source AtomicCards.json --base gpt2 --out data/my-mtg

The ids are the base model's: the base is chosen as `flash-experts demo` chooses it (hub gpt2 when the hub
answers, else the offline SmolLM2) and recorded in meta.json, where examples/finetune_mtg_names.py finds it.
Same files as `flash-experts prepare-data mtg`; plus card_names.txt, every real name (for novelty).
"""

import argparse
import dataclasses
import json

from common import CARD_NAMES_FILE, MTG_CARDS_DATA, MTG_DATA, REAL_CARDS_FILE, main, pick_base
from flash_experts.errors import UserError


def prepare() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help=f"folder for the token files (default {MTG_DATA}, with --cards "
                                                    f"{MTG_CARDS_DATA})")
    parser.add_argument("--cards", action="store_true",
                        help="whole cards: name and cost, type line, rules text, P/T (MTGJSON v3 files)")
    parser.add_argument("--conditioned", action="store_true", help="'type line | colours | name' documents")
    parser.add_argument("--source", action="append", default=[], help="MTGJSON file(s); default: offline packages")
    parser.add_argument("--base", default="auto", help="'auto' (as the demo), 'gpt2', 'smollm2' or a model folder")
    args = parser.parse_args()
    if args.cards and args.conditioned:
        raise UserError("--cards and --conditioned are two different formats: choose one")
    args.out = args.out or str(MTG_CARDS_DATA if args.cards else MTG_DATA)

    from pathlib import Path

    from flash_experts.data import load_split, prepare_token_splits
    from flash_experts.model.loading import base_tokenizer
    from flash_experts.mtg import conditioning_prefix, format_card, load_mtg_records, split_records

    if args.cards:
        prepare_cards(args)
        return

    # 1. Card records: one per unique name (tokens, un-sets, planes, schemes, ... removed; "Fire // Ice" kept whole).
    records = load_mtg_records(args.source)
    splits = split_records(records)  # by a hash of the name: the same card always lands in the same split
    print(f"{len(records):,} unique names:", {split: len(items) for split, items in splits.items()})

    # 2. Text documents, one per card.
    documents = {split: [format_card(record, args.conditioned) for record in items] for split, items in splits.items()}
    print("example documents:", documents["train"][:3])

    # 3. Tokenise once with the base model's tokenizer into token streams, documents separated by its EOS token.
    base = pick_base(args.base)
    tokenizer = base_tokenizer(base)
    meta = prepare_token_splits(documents, tokenizer, args.out, source="mtg", extra_meta={"base": base},
                                data_format="mtg-conditioned" if args.conditioned else "mtg-names")
    (Path(args.out) / CARD_NAMES_FILE).write_text("".join(f"{r.name}\n" for r in records), encoding="utf-8")
    print({split: info["tokens"] for split, info in meta["splits"].items()}, "tokens written to", args.out)

    # 4. What a trainer sees, and how a generator prompts a conditioned model.
    train = load_split(args.out, "train")
    first = tokenizer.decode(train[:24].tolist()).split(tokenizer.eos_token)[0]
    print("first training document back from disk:", repr(first))
    if args.conditioned:
        print("prompt for a green Elf creature:", repr(conditioning_prefix("Creature — Elf", "G")))
    print("next: python examples/finetune_mtg_names.py")


def prepare_cards(args: argparse.Namespace) -> None:
    """Whole cards (mtg/whole_cards.py): one document per card, split by the name's hash as the names are."""
    from pathlib import Path

    from flash_experts.data import prepare_token_splits
    from flash_experts.model.loading import base_tokenizer
    from flash_experts.mtg.card_grammar import CardVocabulary, judge
    from flash_experts.mtg.whole_cards import load_whole_cards, whole_card_documents

    cards = load_whole_cards(args.source)  # MTGJSON v3 files, or the offline package
    documents = whole_card_documents(cards)
    print(f"{len(cards):,} whole cards:", {split: len(items) for split, items in documents.items()})
    print("an example document:\n" + documents["train"][0])
    vocabulary = CardVocabulary.from_cards(cards)
    passing = sum(judge(document, vocabulary).passes for items in documents.values() for document in items)
    print(f"the card grammar passes {passing:,} of {len(cards):,} real cards")
    base = pick_base(args.base)
    meta = prepare_token_splits(documents, base_tokenizer(base), args.out, source="mtg cards",
                                extra_meta={"base": base}, data_format="mtg-cards")
    (Path(args.out) / CARD_NAMES_FILE).write_text("".join(f"{card.name}\n" for card in cards), encoding="utf-8")
    # every real card's fields, which generate_mtg_cards.py compares generated cards with
    (Path(args.out) / REAL_CARDS_FILE).write_text(json.dumps([dataclasses.asdict(card) for card in cards]),
                                                  encoding="utf-8")
    print({split: info["tokens"] for split, info in meta["splits"].items()}, "tokens written to", args.out)
    print(f"next: python examples/finetune_mtg_names.py --data {args.out} --out models/mtg-cards data.block_size=256; "
          "then python examples/generate_mtg_cards.py")


if __name__ == "__main__":
    main(prepare)
