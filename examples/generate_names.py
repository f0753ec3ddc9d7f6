"""The quick one: 20 new Magic: The Gathering card names from the fine-tuned model, each marked new or real.

    python examples/generate_names.py                         # models/mtg-names/best
    python examples/generate_names.py models/other-run -n 50

The sampling setting is chosen for the model first, as the main job does (`choose_name_sampling`: selection
names of another seed at temperatures 0.5-0.8, the card-name filters on); then `generate_card_names` samples
until it has enough distinct valid names, and the metrics say how many samples were valid, distinct and new. (examples/generate_mtg_names.py compares sampling settings and type lines;
CLI: `flash-experts generate-names models/mtg-names/best`.)
"""

import argparse

from common import MTG_MODEL, fine_tuned_model, main, mtg_training_data, tiny


def quick_names() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=str(MTG_MODEL), help=f"model or run folder (default {MTG_MODEL})")
    parser.add_argument("-n", "--count", type=int, default=3 if tiny() else 20)
    args = parser.parse_args()

    from flash_experts.errors import UserError
    from flash_experts.model.loading import load_model
    from flash_experts.mtg import generate_card_names
    from flash_experts.mtg.names import choose_name_sampling

    if args.count < 1:
        raise UserError(f"--count must be >= 1, got {args.count}")
    model_dir = fine_tuned_model(args.model, made_by="finetune_mtg_names.py")
    _, real_names = mtg_training_data(model_dir)
    model, tokenizer = load_model(str(model_dir))
    model.eval()
    config, chosen, _ = choose_name_sampling(model, tokenizer, real_names, count=20 if tiny() else 200, seed=1337)
    print(f"temperature {config.temperature:g}, top-p {config.top_p:g} "
          f"({'chosen on selection samples' if chosen else 'the default: no setting met the targets'})")
    metrics = generate_card_names(model, tokenizer, count=args.count, config=config, reference_names=real_names,
                                  seed=1337)
    for sample in metrics.unique_names()[: args.count]:
        print("new " if sample.is_new else "real", sample.name)
    print(metrics.summary())


if __name__ == "__main__":
    main(quick_names)
