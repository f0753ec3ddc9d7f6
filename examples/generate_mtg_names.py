"""Card names for a type line and colours, step by step: prompt -> sampling -> cleaning -> metrics.

    python examples/generate_mtg_names.py runs/mtg-conditioned/final

A model fine-tuned on the conditioned format ("Creature — Elf Druid | G | Llanowar Elves") continues the
prefix "Creature — Elf | G |" with a name. This spells out what `generate_card_names` does in one call.
"""

import sys

from flash_experts.data.mtg import conditioning_prefix, load_mtg_records
from flash_experts.evaluation.names import evaluate_names
from flash_experts.generation import SamplingConfig, generate
from flash_experts.model.loading import load_model

model_path = sys.argv[1] if len(sys.argv) > 1 else "runs/mtg-conditioned/final"
model, tokenizer = load_model(model_path)
real_names = [card.name for card in load_mtg_records(fetch=False)]

config = SamplingConfig(
    temperature=0.8,
    top_p=0.95,
    repetition_penalty=1.2,  # discourage "Elf Elf Elves"
    allowed_regex=r"[A-Za-z ',\-]+",  # letters, spaces, apostrophes, commas, hyphens (EOS stays allowed)
)

for type_line, colors in [("Creature — Elf", "G"), ("Instant", "R"), ("Legendary Creature — Dragon", "BR")]:
    prompt = conditioning_prefix(type_line, colors)  # "Creature — Elf | G |"
    result = generate(model, tokenizer, [prompt] * 12, config, max_new_tokens=12, stop_strings=["\n"], seed=1)
    metrics = evaluate_names(result.texts, real_names)  # cleans each sample, dedupes, checks against real cards
    print(f"\n{prompt}")
    for sample in metrics.unique_names():
        print("   ", "new " if sample.is_new else "real", sample.name)
    print("   ", metrics.summary())
