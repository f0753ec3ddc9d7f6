"""Sample new Magic: The Gathering card names from a fine-tuned model and mark which ones are real cards.

    python examples/generate_names.py runs/mtg-names/final     # a checkpoint from `flash-experts finetune`

The one-call version: `generate_card_names` samples until it has enough distinct valid names, and the
returned metrics say how many samples were valid, distinct and new. (CLI: `flash-experts generate-names`.)
"""

import sys

from flash_experts.data.mtg import load_mtg_records
from flash_experts.generation import SamplingConfig, generate_card_names
from flash_experts.generation.generate import CARD_NAME_REGEX
from flash_experts.model.loading import load_model

model_path = sys.argv[1] if len(sys.argv) > 1 else "runs/mtg-names/final"
model, tokenizer = load_model(model_path)
real_names = [card.name for card in load_mtg_records(fetch=False)]  # the cached offline card data

config = SamplingConfig(temperature=0.9, top_p=0.95, allowed_regex=CARD_NAME_REGEX)  # name characters only
metrics = generate_card_names(model, tokenizer, count=20, config=config, reference_names=real_names, seed=0)

for sample in metrics.unique_names()[:20]:
    print("new " if sample.is_new else "real", sample.name)
print(metrics.summary())
