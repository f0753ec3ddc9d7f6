"""Step 3 of the MTG chain: card names from the fine-tuned model, with several sampling settings side by side.

    python examples/generate_mtg_names.py                           # models/mtg-names/best, 20 names a setting
    python examples/generate_mtg_names.py --count 50 --seed 7
    python examples/generate_mtg_names.py --type "Creature — Elf" --colors G   # a conditioned model only
    python examples/generate_mtg_names.py --model models/other-run

A model trained on the conditioned format ("Creature — Elf Druid | G | Llanowar Elves", from
`prepare_mtg_data.py --conditioned`) continues the prefix "Creature — Elf | G |" with a name: it is asked
for a few type lines and colours. A model trained on plain names starts from nothing. Every name is
cleaned, marked new (not a real card) or real, and each setting gets validity, uniqueness and novelty.
"""

import argparse

from common import MTG_MODEL, fine_tuned_model, main, mtg_training_data, tiny

TYPE_LINES = [("Creature — Elf", "G"), ("Instant", "R"), ("Legendary Creature — Dragon", "BR")]


def sampling_settings() -> dict:
    """Three ways to sample, from careful to adventurous; every one keeps to name characters."""
    from flash_experts.generation import SamplingConfig
    from flash_experts.mtg.names import CARD_NAME_REGEX

    return {
        "careful (T=0.7, top-p 0.9)": SamplingConfig(temperature=0.7, top_p=0.9, allowed_regex=CARD_NAME_REGEX),
        "balanced (T=0.9, top-p 0.95)": SamplingConfig(temperature=0.9, top_p=0.95, allowed_regex=CARD_NAME_REGEX),
        "adventurous (T=1.1, min-p 0.05, repetition 1.2)": SamplingConfig(
            temperature=1.1, min_p=0.05, repetition_penalty=1.2, allowed_regex=CARD_NAME_REGEX),
    }


def generate_names() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(MTG_MODEL), help=f"model or run folder (default {MTG_MODEL})")
    parser.add_argument("--count", type=int, default=3 if tiny() else 20, help="distinct names per setting")
    parser.add_argument("--type", default=None, help="type line for a conditioned model, e.g. 'Creature — Elf'")
    parser.add_argument("--colors", default=None, help="colours for a conditioned model, e.g. G or BR")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from flash_experts.errors import UserError
    from flash_experts.model.loading import load_model
    from flash_experts.mtg import generate_card_names

    if args.count < 1:
        raise UserError(f"--count must be >= 1, got {args.count}")
    model_dir = fine_tuned_model(args.model, made_by="finetune_mtg_names.py")
    conditioned, real_names = mtg_training_data(model_dir)
    if (args.type or args.colors) and not conditioned:
        raise UserError(f"{model_dir} was trained on plain names, not on 'type | colours | name': drop --type/--colors "
                        "or train on `prepare_mtg_data.py --conditioned` data")
    prompts = [(args.type, args.colors)] if args.type or args.colors else TYPE_LINES if conditioned else [(None, None)]
    model, tokenizer = load_model(str(model_dir))
    model.eval()
    print(f"model: {model_dir} ({'conditioned on type and colours' if conditioned else 'plain names'}); "
          f"{len(real_names):,} real names to tell new from real")

    for setting, config in sampling_settings().items():
        print(f"\n== {setting}")
        for type_line, colors in prompts:
            metrics = generate_card_names(model, tokenizer, args.count, type_line=type_line, colors=colors,
                                          config=config, reference_names=real_names, seed=args.seed)
            if type_line or colors:
                print(f"  {type_line or ''} | {colors or ''} |")
            for sample in metrics.unique_names()[: args.count]:
                print(f"    {'new ' if sample.is_new else 'real'}  {sample.name}")
            print(f"    {metrics.summary()}")


if __name__ == "__main__":
    main(generate_names)
