"""Choose the card-name sampling settings on selection samples, never on the samples that are reported.

    python benchmarks/select_name_sampling.py MODEL_FOLDER [--names 200] [--seeds 1000 1001]

Samples --names names per seed for each setting of a small grid (temperature x top-p; the library's two
card-name filters, card-name characters and a capital first, always on) from MODEL_FOLDER (e.g. a sweep run's best checkpoint), with seeds that the
demo and the sweep never use (they sample with seed 1337), and prints validity, uniqueness and novelty
(against every real card name) per setting. The rule: the highest validity among the settings whose
uniqueness >= 95% and novelty >= 90% (the targets of issue 11), the higher temperature, then top-p, on a tie. The chosen
setting is what `flash_experts.mtg.names.NAME_SAMPLING` holds; the demo then reports its own fresh samples.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table  # noqa: E402

TEMPERATURES = (0.7, 0.8)
TOP_PS = (0.95, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--names", type=int, default=200)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001])
    args = parser.parse_args()

    from flash_experts.model.loading import load_model
    from flash_experts.mtg.cards import load_mtg_records
    from flash_experts.mtg.names import evaluate_names, generate_card_names, name_sampling_config

    model, tokenizer = load_model(args.model)
    model.eval()
    reference = [r.name for r in load_mtg_records()]
    rows, scored = [], []
    for temperature in TEMPERATURES:
        for top_p in TOP_PS:
            config = name_sampling_config(temperature=temperature, top_p=top_p)
            raw = []
            for seed in args.seeds:
                metrics = generate_card_names(model, tokenizer, args.names, config=config, seed=seed, max_rounds=1,
                                              batch_size=args.names)
                raw += [s.raw for s in metrics.samples]
            m = evaluate_names(raw, reference)
            scored.append((m, temperature, top_p))
            rows.append([temperature, top_p, m.total, f"{m.validity:.1%}", f"{m.uniqueness:.1%}", f"{m.novelty:.1%}"])
            print(f"  t={temperature} top_p={top_p}: {m.summary()}", file=sys.stderr, flush=True)
    eligible = [s for s in scored if s[0].uniqueness >= 0.95 and s[0].novelty >= 0.90]
    print(f"## Card-name sampling, selection samples (seeds {', '.join(map(str, args.seeds))})\n")
    print(f"- model: {args.model}\n- machine: {machine_description()}\n")
    print(markdown_table(["temperature", "top-p", "samples", "validity", "uniqueness", "novelty"], rows))
    if eligible:
        best = max(eligible, key=lambda s: (s[0].validity, s[1], s[2]))
        print(f"\nChosen: temperature {best[1]}, top-p {best[2]} (validity {best[0].validity:.1%}, uniqueness "
              f"{best[0].uniqueness:.1%}, novelty {best[0].novelty:.1%})")
    else:
        print("\nNo setting reaches uniqueness >= 95% and novelty >= 90%")


if __name__ == "__main__":
    main()
