"""Step 2 of the MTG chain: upcycle the base to a Mixture-of-Experts model, fine-tune it on the card names.

    python examples/finetune_mtg_names.py                       # data/mtg -> models/mtg-names (laptop-sized)
    python examples/finetune_mtg_names.py optim.max_steps=400   # any config override (configs/mtg_moe.yaml)
    python examples/finetune_mtg_names.py moe=null              # the dense baseline, same data and schedule
    python examples/finetune_mtg_names.py --full                # configs/mtg_moe.yaml as it is (hours on a CPU)
    python examples/finetune_mtg_names.py --resume              # continue after Ctrl-C (which saves a checkpoint)

The base is the one examples/prepare_mtg_data.py tokenised the names for (recorded in data/mtg/meta.json).
By default the run is sized for a laptop CPU and trains the main job's MoE recipe (`flash-experts demo`):
4 experts (top-1, exact copies) on every other layer, all weights trained, routers that learn (their own
learning rate, a balancing loss that keeps every expert in use), 60 steps of 8 x 64 tokens, 16 validation
batches evaluated every 20 (a checkpoint at the end; Ctrl-C saves one too). It ends with what the demo prints
of the routers: how far they moved from uniform, and the expert atlas (which tokens each expert takes).
`--full` trains the config's 8 experts (top-2), 2,000 steps.
Metrics go to models/mtg-names/metrics.jsonl, TensorBoard and Weights & Biases (offline files without an
API key; `flash-experts plot models/mtg-names` draws them). The CLI equivalent: `flash-experts finetune
--config configs/mtg_moe.yaml data.dir=data/mtg run.out_dir=models/mtg-names`.
"""

import argparse
from pathlib import Path

from common import CONFIGS, MTG_DATA, MTG_MODEL, laptop_defaults, main, refuse_to_overwrite


def laptop_recipe() -> list[str]:
    """The demo's MoE recipe (flash_experts/contest/defaults.py), at a laptop's step count."""
    from flash_experts.contest.defaults import ROUTER_AUX_LOSS_COEF, ROUTER_LR_SCALE

    return ["moe.num_experts=4", "moe.num_experts_per_tok=1", "moe.expert_noise=0", "model.train=all",
            f"moe.router_aux_loss_coef={ROUTER_AUX_LOSS_COEF}", f"optim.router_lr_scale={ROUTER_LR_SCALE}",
            "moe.router_detach_input=true",
            "data.block_size=64", "data.batch_size=8", "optim.lr=3e-4", "optim.min_lr=3e-5", "optim.max_steps=60",
            "optim.warmup_steps=6", "eval.interval=20", "eval.batches=16", "checkpoint.interval=0",
            "checkpoint.keep_last=1"]


TINY_RUN = ["optim.max_steps=2", "optim.warmup_steps=1", "eval.interval=1", "eval.batches=1", "data.batch_size=2",
        "data.block_size=16", "checkpoint.interval=0"]


def finetune() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.add_argument("--data", default=str(MTG_DATA), help=f"prepared card names (default {MTG_DATA})")
    parser.add_argument("--out", default=str(MTG_MODEL), help=f"run folder for the model (default {MTG_MODEL})")
    parser.add_argument("--base", default=None, help="base model (default: the one the data was prepared for)")
    parser.add_argument("--full", action="store_true", help="train as configs/mtg_moe.yaml says, not laptop-sized")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    args = parser.parse_args()

    from flash_experts.data.tokens import load_meta
    from flash_experts.errors import UserError
    from flash_experts.training.config import load_config
    from flash_experts.training.trainer import train

    data, out = Path(args.data), Path(args.out)
    if not (data / "meta.json").is_file():
        raise UserError(f"no prepared card names in {data}: run examples/prepare_mtg_data.py first (or pass --data)")
    base = args.base or load_meta(data).get("base") or "gpt2"
    refuse_to_overwrite(out, args.resume)
    cfg = load_config(CONFIGS / "mtg_moe.yaml", args.overrides,
                      defaults=[f"model.base={base}", f"data.dir={data}", f"run.out_dir={out}",
                                *laptop_defaults(laptop_recipe(), TINY_RUN, args.full)])
    if args.base:  # the ids must be the base's: another tokenizer's ids would train on noise
        from flash_experts.evaluation.perplexity import check_data_tokenizer
        from flash_experts.model.loading import base_tokenizer

        check_data_tokenizer(data, base_tokenizer(base))
    moe = "dense" if cfg.moe is None else f"{cfg.moe.num_experts} experts, top-{cfg.moe.num_experts_per_tok}, {cfg.moe.moe_layers} layers"
    print(f"fine-tuning {base} ({moe}; trained: {cfg.model.train}) for {cfg.optim.max_steps} steps -> {out}",
          flush=True)

    result = train(cfg, resume="auto" if args.resume else None)
    if result.best_val_ppl is None:
        raise UserError(f"training stopped ({result.stopped}) before its first evaluation: run again with --resume")
    before = "n/a (resumed)" if result.initial_val_ppl is None else f"{result.initial_val_ppl:.2f}"
    print(f"{result.stopped}: {result.steps} steps, {result.tokens:,} tokens in {result.seconds / 60:.1f} min; "
          f"validation perplexity {before} -> {result.best_val_ppl:.2f} (best, step {result.best_step})")
    if cfg.moe is not None:  # what the routers learned, as the demo prints it
        from flash_experts.contest.upcycling import expert_atlas_of, routing_lines, save_routing

        atlas = expert_atlas_of(result, str(data), cfg.data.block_size)
        save_routing(result, atlas)
        print("\n".join(routing_lines(result, atlas)))
    print(f"model: {out / 'best'}\nnext: python examples/generate_mtg_names.py")


if __name__ == "__main__":
    main(finetune)
