"""`flash-experts upcycle SOURCE OUT`: turn a dense GPT-2 / Llama-family model into our MoE form and save it.

    flash-experts upcycle gpt2 models/gpt2-moe --experts 8 --top-k 2 --layers every_other
    flash-experts upcycle smollm2 models/smollm2-moe --experts 4 --layers 0,2,4

Every expert starts as a copy of the MLP it replaces, so the saved model computes the dense model's function;
the command proves it on the spot (max |logit difference| on random tokens) before saving.
"""

from __future__ import annotations

import argparse
import math


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "upcycle",
        help="convert a dense GPT-2 / Llama-family model to Mixture-of-Experts (exact at step 0) and save it",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="hub id, local model folder, or 'smollm2' (offline base)")
    parser.add_argument("out", help="folder to write the MoE model and its tokenizer to")
    parser.add_argument("--experts", type=int, default=8, help="experts per MoE layer (default 8)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument("--layers", default="every_other",
                        help="'all', 'every_other' or comma-separated layer indices (default every_other)")
    parser.add_argument("--drop-ratio", type=float, default=0.0,
                        help="Drop-Upcycling: share of each expert's hidden units re-initialised, in [0, 1] "
                             "(default 0: exact copies; > 0 gives up parity with the dense model)")
    parser.add_argument("--expert-noise", type=float, default=0.0,
                        help="relative Gaussian noise on each expert copy (default 0; > 0 gives up parity)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Drop-Upcycling draw and the noise")
    parser.add_argument("--capacity-factor", type=float, default=0.0, help="0 = dropless (default)")
    parser.add_argument("--attention", default="auto", help="attention implementation: auto|sdpa|flash|eager|triton")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from flash_experts.errors import UserError
    from flash_experts.export.common import refuse_existing_output
    from flash_experts.model import upcycle
    from flash_experts.model.loading import load_model, quiet_transformers_progress

    layers: str | list[int] = args.layers
    if layers not in ("all", "every_other"):
        try:
            layers = [int(part) for part in args.layers.split(",") if part.strip()]
        except ValueError:
            raise UserError(f"--layers must be 'all', 'every_other' or indices like 0,2,4 (got {args.layers!r})") from None
    if not 1 <= args.top_k <= args.experts:
        raise UserError(f"--top-k must be in [1, --experts={args.experts}], got {args.top_k}")
    if not 0.0 <= args.drop_ratio <= 1.0:
        raise UserError(f"--drop-ratio must be in [0, 1], got {args.drop_ratio}")
    if not (math.isfinite(args.expert_noise) and args.expert_noise >= 0):
        raise UserError(f"--expert-noise must be a finite number >= 0, got {args.expert_noise}")
    refuse_existing_output(args.out, empty_folder_ok=True)
    dense, tokenizer = load_model(args.source)
    model = upcycle(dense, num_experts=args.experts, top_k=args.top_k, moe_layers=layers,
                    capacity_factor=args.capacity_factor, attention_implementation=args.attention,
                    drop_ratio=args.drop_ratio, expert_noise=args.expert_noise, seed=args.seed)

    dense.eval(), model.eval()
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, dense.get_input_embeddings().num_embeddings, (2, 32), generator=generator)
    with torch.no_grad():
        difference = (model(input_ids=tokens).logits - dense(input_ids=tokens).logits).abs().max().item()
    with quiet_transformers_progress():
        model.save_pretrained(args.out)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out)
    total = sum(p.numel() for p in model.parameters())
    print(f"{args.source} -> {args.out}: {model.config.num_experts} experts, top-{model.config.num_experts_per_tok}, "
          f"MoE layers {model.config.moe_layer_indices()}, {total:,} parameters")
    exact = args.drop_ratio == 0 and args.expert_noise == 0
    print(f"{'parity with' if exact else 'distance from (symmetry broken on purpose)'} the dense model: "
          f"max |logit difference| {difference:.2e} on 2 x 32 random tokens")
    return 0
