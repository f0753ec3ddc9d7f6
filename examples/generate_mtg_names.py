"""Step 3 of the MTG chain: card names from the fine-tuned model, at the sampling setting it chooses.

    python examples/generate_mtg_names.py                           # models/mtg-names/best, 20 names
    python examples/generate_mtg_names.py --count 50 --seed 7
    python examples/generate_mtg_names.py --type "Creature — Elf" --colors G   # a conditioned model only
    python examples/generate_mtg_names.py --model models/other-run

As the main job (`flash-experts demo`) does: the model first samples selection names (another seed) at
temperatures 0.5-0.8 with the card-name filters on, every setting's validity, uniqueness and novelty is
printed, and the one that clears the three targets by the widest margin is chosen (`choose_name_sampling`);
then fresh names are sampled at it. A model trained on the conditioned format ("Creature — Elf Druid | G |
Llanowar Elves", from `prepare_mtg_data.py --conditioned`) continues the prefix "Creature — Elf | G |" with a
name: it is asked for a few type lines and colours, at the library's card-name setting (the choice samples
plain names). Every name is cleaned and marked new (not a real card) or real.
"""

import argparse

from common import MTG_MODEL, fine_tuned_model, main, mtg_training_data, tiny

TYPE_LINES = [("Creature — Elf", "G"), ("Instant", "R"), ("Legendary Creature — Dragon", "BR")]


def generate_names() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(MTG_MODEL), help=f"model or run folder (default {MTG_MODEL})")
    parser.add_argument("--count", type=int, default=3 if tiny() else 20, help="distinct names per setting")
    parser.add_argument("--type", default=None, help="type line for a conditioned model, e.g. 'Creature — Elf'")
    parser.add_argument("--colors", default=None, help="colours for a conditioned model, e.g. G or BR")
    parser.add_argument("--seed", type=int, default=1337, help="of the reported names; selection uses seed + 1")
    parser.add_argument("--selection", type=int, default=20 if tiny() else 200,
                        help="selection names per temperature (default 200)")
    args = parser.parse_args()

    from flash_experts.errors import UserError
    from flash_experts.model.loading import load_model
    from flash_experts.mtg import generate_card_names
    from flash_experts.mtg.names import choose_name_sampling, name_sampling_config

    for name in ("count", "selection"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
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

    if conditioned:
        config, how = name_sampling_config(), "the library's card-name setting"
    else:
        config, chosen, trials = choose_name_sampling(model, tokenizer, real_names, count=args.selection,
                                                      seed=args.seed)
        print(f"selection samples ({args.selection} names each, seed {args.seed + 1}):")
        for trial in trials:
            print(f"  temperature {trial.temperature:g}, top-p {trial.top_p:g}: {trial.metrics.summary()}")
        how = "chosen on the selection samples" if chosen else "the library's default: no setting met the targets"
    print(f"\n== temperature {config.temperature:g}, top-p {config.top_p:g} ({how})")
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
