"""`flash-experts export MODEL OUT --format mixtral|gguf`: our MoE model in a format other tools load.

    flash-experts export runs/demo/moe/best models/demo-mixtral --format mixtral
    flash-experts export runs/demo/moe/best models/demo.gguf --format gguf --outtype q8_0

mixtral: a vanilla transformers `MixtralForCausalLM` folder (no remote code); layers that stayed dense become
identical experts, which compute the same function. gguf: one file for llama.cpp (its `llama` architecture
with experts), f32, f16 or q8_0. Only Llama-family MoE models map; a GPT-2 MoE folder travels as remote code
(`trust_remote_code=True`) instead. OUT must not exist; a failed export leaves nothing there.
"""

from __future__ import annotations

import argparse

FORMATS = ("mixtral", "gguf")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write a Llama-family MoE model as a Mixtral folder (transformers) or a GGUF file (llama.cpp)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="MODEL", help="our MoE checkpoint folder")
    parser.add_argument("out", metavar="OUT", help="folder (mixtral) or file (gguf) to create; must not exist")
    parser.add_argument("--format", required=True, choices=FORMATS, help="mixtral or gguf")
    parser.add_argument("--outtype", default="f16", choices=("f32", "f16", "q8_0"),
                        help="GGUF tensor type (llama.cpp's words; norms and routers stay f32; default f16)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from flash_experts.errors import UserError
    from flash_experts.export import export_gguf, export_mixtral
    from flash_experts.export.common import refuse_existing_output
    from flash_experts.model.loading import load_model, quiet_transformers_progress

    out = Path(args.out).expanduser()
    refuse_existing_output(out)
    if args.format == "mixtral" and args.outtype != "f16":
        raise UserError("--outtype is for --format gguf (a Mixtral folder is written in float32)")
    model, tokenizer = load_model(args.model)
    model.eval()
    with quiet_transformers_progress():
        if args.format == "gguf":
            export_gguf(model, tokenizer, out, args.outtype)
            print(f"{args.model} -> {out}: GGUF ({args.outtype}), {out.stat().st_size / 2**20:.1f} MiB, "
                  f"{model.config.num_experts} experts, top-{model.config.num_experts_per_tok}; "
                  f"run it with llama.cpp: llama-cli -m {out}")
            return 0
        export_mixtral(model, tokenizer, out)
        from transformers import MixtralForCausalLM

        mixtral = MixtralForCausalLM.from_pretrained(out).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (mixtral(input_ids=tokens).logits - model(input_ids=tokens).logits).abs().max().item()
    print(f"{args.model} -> {out}: MixtralForCausalLM, {model.config.num_experts} experts, "
          f"top-{model.config.num_experts_per_tok}; max |logit difference| from ours {difference:.2e} on 2 x 32 "
          f"random tokens (the reloaded folder)")
    return 0
