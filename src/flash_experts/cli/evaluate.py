"""`flash-experts evaluate MODEL`: sliding-window perplexity (and, for MoE models, routing statistics)."""

from __future__ import annotations

import argparse

from flash_experts.cli.common import (
    RenamedOption,
    add_device_arguments,
    add_source_arguments,
    check_source_arguments,
    load_for_generation,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="perplexity of a model on WikiText-2, a prepared split or a text file",
        description="Sliding-window perplexity (HF 'perplexity of fixed-length models' method). The NLL comes "
                    "from the logits, never from a loss that includes router auxiliary terms.",
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint folder, Hugging Face hub id, or 'smollm2'")
    add_source_arguments(parser)
    add_device_arguments(parser)  # --device, --dtype (log-softmax stays fp32 whatever the weights), --quantize
    parser.add_argument("--bf16", action=RenamedOption, new="--dtype bf16")
    parser.add_argument("--prefix-bos", action="store_true",
                        help="score the first token too, predicted from the tokenizer's BOS (else EOS), as "
                             "lm-evaluation-harness's rolling perplexity does; with --stride one less than --context "
                             "every token is scored and bits per byte are printed")
    parser.add_argument("--lm-eval-task", metavar="DIR", default=None,
                        help="also write the text as a local lm-evaluation-harness task folder (one document), for "
                             "lm_eval --include_path DIR --tasks flash_experts_text")
    parser.add_argument("--router-stats", action="store_true",
                        help="also report per-layer routing (expert load, entropy / ln E, top-1 probability, the "
                             "experts' distance, drops) and the expert atlas (which tokens each expert takes)")
    parser.add_argument("--json", metavar="FILE", default=None, help="also write the numbers to FILE as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from rich.console import Console

    from flash_experts.errors import UserError
    from flash_experts.evaluation.perplexity import (
        evaluate_perplexity,
        load_eval_text,
        load_eval_tokens,
        perplexity_with_routing,
    )
    from flash_experts.evaluation.router_stats import router_stats_table

    if args.wikitext is None and args.data is None and args.text is None:
        raise UserError("choose the evaluation data: --wikitext [PATH], --data DIR (with --split) or --text FILE")
    check_source_arguments(args)
    if args.json and Path(args.json).expanduser().is_dir():  # before the evaluation, not after it
        raise UserError(f"--json {args.json} is a folder: name a file to write the numbers to")
    if args.json and not Path(args.json).expanduser().resolve().parent.is_dir():
        raise UserError(f"--json: the folder for {args.json} does not exist")
    console = Console()
    model, tokenizer = load_for_generation(args.model, args.device, args.dtype, quantize=args.quantize)
    text = None if args.data is not None else load_eval_text(wikitext=args.wikitext, text_file=args.text)
    tokens = load_eval_tokens(tokenizer, data_dir=args.data, split=args.split, text=text, max_tokens=args.max_tokens)
    whole_text = text if args.max_tokens is None else None  # what bits per byte and an lm-eval task are of
    text_tokens = tokens.numel()
    if args.prefix_bos:
        import torch

        from flash_experts.evaluation.lm_eval_task import prefix_token_id

        tokens = torch.cat([torch.tensor([prefix_token_id(tokenizer)], dtype=tokens.dtype), tokens])
    measure = dict(context=args.context, stride=args.stride, batch_size=args.batch_size,
                   quiet=args.quiet)
    if args.router_stats:
        result, routing = perplexity_with_routing(model, tokens, **measure)
    else:
        result = evaluate_perplexity(model, tokens, **measure)
    weights = f" ({args.quantize} weights)" if args.quantize != "none" else f" ({args.dtype} weights)" if args.dtype != "fp32" else ""
    console.print(f"[bold]{args.model}[/bold]{weights}: {result.summary()}")
    numbers = {"model": args.model, "dtype": args.dtype, "quantize": args.quantize, **result.as_dict()}
    text_bytes = None if whole_text is None else len(whole_text.encode("utf-8"))
    if args.lm_eval_task:
        from flash_experts.evaluation.lm_eval_task import write_text_task

        if whole_text is None:
            raise UserError("--lm-eval-task needs the whole text: --text or --wikitext, without --max-tokens")
        task = write_text_task([whole_text], Path(args.lm_eval_task).expanduser())
        console.print(f"lm-eval task {task!r} written to {args.lm_eval_task}")
    if text_bytes is not None and result.tokens_scored == text_tokens:  # every token of the text was scored
        import math

        numbers["bits_per_byte"] = result.nll * result.tokens_scored / text_bytes / math.log(2)
        console.print(f"bits per byte {numbers['bits_per_byte']:.5f} ({text_bytes:,} UTF-8 bytes, every token scored)")
    if args.router_stats:
        if routing.is_empty:
            console.print("dense model: no router statistics")
        else:
            console.print(router_stats_table(routing, title=f"Routing of {args.model}"))
            from flash_experts.evaluation.expert_atlas import expert_atlas

            # what each expert takes from this text (every token routed once, in windows of the context)
            atlas = expert_atlas(model, tokenizer, tokens, context=min(result.context, tokens.numel()),
                                 batch_size=args.batch_size)
            console.print(f"expert atlas: each expert's share of its layer, then its tokens of highest lift "
                          f"(routed there at least {atlas.min_count} times; all of it in --json)", highlight=False)
            for layer in atlas.layers:
                console.print("  " + layer.line(tokens_each=3), highlight=False, markup=False)
            numbers["expert_atlas"] = atlas.as_dict()
        numbers["routing"] = routing.as_dict()
    if args.json:
        Path(args.json).expanduser().write_text(json.dumps(numbers, indent=2) + "\n")
    return 0
