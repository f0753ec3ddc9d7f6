"""Choose the card-name sampling settings on selection samples, never on the samples that are reported.

    python benchmarks/select_name_sampling.py MODEL_FOLDER [--names 200] [--seeds 1000 1001]

Samples --names names per seed for each setting of a small grid (temperature x top-p; the library's
card-name filters always on: card-name characters, a capital first, 3+ letters) from MODEL_FOLDER (e.g. a
sweep run's best checkpoint), with seeds that the demo and the sweep never report (they report seed 1337), and prints
validity, uniqueness and novelty (against every real card name) per setting. The rule is
`flash_experts.mtg.names.select_name_sampling`'s: of the settings meeting the targets of issue 11 (validity
>= 95%, uniqueness >= 95%, novelty >= 90%), the one clearing the nearest target by the widest margin. The
library's default (`NAME_TEMPERATURE`, `NAME_TOP_P`) was chosen by this script (under its earlier rule, the
highest validity: docs/UPCYCLING.md); the demo chooses again for each of its models on its own selection samples.
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
    from flash_experts.mtg.names import select_name_sampling

    model, tokenizer = load_model(args.model)
    model.eval()
    reference = [r.name for r in load_mtg_records()]
    chosen, trials = select_name_sampling(model, tokenizer, reference, temperatures=TEMPERATURES, top_ps=TOP_PS,
                                          count=args.names, seeds=args.seeds)
    rows = [[t.temperature, t.top_p, t.metrics.total, f"{t.metrics.validity:.1%}", f"{t.metrics.uniqueness:.1%}",
             f"{t.metrics.novelty:.1%}"] for t in trials]
    print(f"## Card-name sampling, selection samples (seeds {', '.join(map(str, args.seeds))})\n")
    print(f"- model: {args.model}\n- machine: {machine_description()}\n")
    print(markdown_table(["temperature", "top-p", "samples", "validity", "uniqueness", "novelty"], rows))
    if chosen:
        m = chosen.metrics
        print(f"\nChosen: temperature {chosen.temperature}, top-p {chosen.top_p} (validity {m.validity:.1%}, "
              f"uniqueness {m.uniqueness:.1%}, novelty {m.novelty:.1%})")
    else:
        print("\nNo setting reaches validity >= 95%, uniqueness >= 95% and novelty >= 90%")


if __name__ == "__main__":
    main()
