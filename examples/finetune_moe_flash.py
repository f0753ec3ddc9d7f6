"""Upcycle GPT-2 into a Mixture-of-Experts model and fine-tune it on WikiText-2 with our Flash Attention.

    python examples/finetune_moe_flash.py                        # configs/wikitext_moe.yaml, attention=flash
    python examples/finetune_moe_flash.py model.attention=triton optim.max_steps=200
    torchrun --nproc_per_node=2 examples/finetune_moe_flash.py   # data parallel: the same loss curve, faster

The CLI equivalent: `flash-experts prepare-data wikitext --out data_cache/wikitext2`, then
`flash-experts finetune --config configs/wikitext_moe.yaml model.attention=flash`.
"""

import os
import sys
from pathlib import Path

from flash_experts.data import load_tokenizer, prepare_token_splits, wikitext_documents
from flash_experts.training.config import load_config
from flash_experts.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
cfg = load_config(ROOT / "configs" / "wikitext_moe.yaml", ["model.attention=flash", *sys.argv[1:]])

# Tokenise WikiText-2 once (rank 0 only when launched by torchrun; the others wait for the files).
if not (Path(cfg.data.dir) / "meta.json").is_file():
    if int(os.environ.get("RANK", "0")) != 0:
        sys.exit("run once without torchrun to prepare the data, then launch the data-parallel run")
    prepare_token_splits(wikitext_documents(), load_tokenizer(cfg.model.base), cfg.data.dir,
                         source="wikitext-2-raw-v1", data_format="wikitext-articles")

result = train(cfg, resume="auto")  # picks up the latest checkpoint after a crash or preemption
if int(os.environ.get("RANK", "0")) == 0:
    print(f"{result.stopped} after {result.steps} steps ({result.tokens:,} tokens, {result.seconds:.0f}s): "
          f"validation perplexity {result.final_val_ppl:.2f}, best {result.best_val_ppl:.2f}")
