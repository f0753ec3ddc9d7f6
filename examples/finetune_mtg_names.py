"""Fine-tune GPT-2, upcycled to an 8-expert Mixture-of-Experts, on Magic: The Gathering card names; then invent some.

    python examples/finetune_mtg_names.py                          # configs/mtg_moe.yaml as it is
    python examples/finetune_mtg_names.py optim.max_steps=300 moe=null   # any config override, e.g. dense

The CLI equivalent: `flash-experts prepare-data mtg --out data_cache/mtg`, then
`flash-experts finetune --config configs/mtg_moe.yaml`, then `flash-experts generate-names --model runs/mtg_moe/best`.
"""

import sys
from pathlib import Path

from flash_experts.data import load_mtg_records, load_tokenizer, mtg_documents, prepare_token_splits
from flash_experts.generation.generate import generate_card_names
from flash_experts.model.loading import load_model
from flash_experts.training.config import load_config
from flash_experts.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
cfg = load_config(ROOT / "configs" / "mtg_moe.yaml", sys.argv[1:])

# 1. Tokenise the card names once (offline sources by default); the trainer memory-maps the result.
if not (Path(cfg.data.dir) / "meta.json").is_file():
    documents = mtg_documents(load_mtg_records())
    prepare_token_splits(documents, load_tokenizer(cfg.model.base), cfg.data.dir, source="mtg", data_format="mtg-names")

# 2. Upcycle and fine-tune: checkpoints, best model, metrics.jsonl and plots data land in cfg.run.out_dir.
result = train(cfg)
print(f"best validation perplexity {result.best_val_ppl:.2f} at step {result.best_step}")

# 3. Sample new names from the best checkpoint, marking which are not real cards.
best = Path(result.run_dir) / "best"
model, tokenizer = load_model(str(best if best.is_dir() else result.checkpoint))
real_names = [card.name for card in load_mtg_records()]
names = generate_card_names(model.eval(), tokenizer, count=20, reference_names=real_names, seed=0)
print(names.summary())
for sample in names.unique_names():
    print(("  new   " if sample.is_new else "  real  ") + sample.name)
