"""Dense GPT-2 vs. its MoE + Flash Attention upcycling: fine-tune both on the same tokens, then compare them.

    python examples/combined_moe_flash.py                  # WikiText-2, 500 steps each
    python examples/combined_moe_flash.py optim.max_steps=100

Both runs share data, seed, schedule and token budget; only the model differs. The comparison measures
test perplexity, parameters (total and active per token), speed and sample generations, and writes a
report to runs/combined_moe_flash/.
"""

import sys
from pathlib import Path

import torch

from flash_experts.data import load_split, load_tokenizer, prepare_token_splits, wikitext_documents
from flash_experts.evaluation.compare import ModelEntry, compare_models
from flash_experts.model.loading import load_model
from flash_experts.training.config import load_config
from flash_experts.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
common = ["optim.max_steps=500", *sys.argv[1:]]
runs = {
    "dense": load_config(ROOT / "configs" / "wikitext_dense.yaml", ["run.name=combined_dense", *common]),
    "moe+flash": load_config(ROOT / "configs" / "wikitext_moe.yaml",
                             ["run.name=combined_moe_flash", "model.attention=flash", *common]),
}
data_dir = runs["dense"].data.dir  # both configs read the same prepared folder
if not (Path(data_dir) / "meta.json").is_file():
    prepare_token_splits(wikitext_documents(), load_tokenizer("gpt2"), data_dir,
                         source="wikitext-2-raw-v1", data_format="wikitext-articles")

entries = []
for name, cfg in runs.items():
    result = train(cfg)
    print(f"{name}: best validation perplexity {result.best_val_ppl:.2f} after {result.steps} steps")
    model, tokenizer = load_model(str(Path(result.run_dir) / "best"))
    entries.append(ModelEntry(name, model.eval(), tokenizer))

test_tokens = torch.from_numpy(load_split(data_dir, "test").astype("int64"))
report = compare_models(entries, prompts=["The history of the"], eval_tokens=test_tokens,
                        eval_source="WikiText-2 test", out_dir="runs/combined_moe_flash")
print("report:", ", ".join(report.files))
