"""`flash-experts compare MODEL_A MODEL_B [...] --out DIR`: side-by-side size, perplexity, speed, samples."""

from __future__ import annotations

import argparse

DEFAULT_PROMPTS = ["The history of the city begins", "In the first half of the season,"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from flash_experts.cli.common import QUANTIZATIONS, add_sampling_arguments, add_source_arguments

    parser = subparsers.add_parser(
        "compare",
        help="compare 2+ models: parameters (total and active), perplexity, speed, generations",
        description="Measure every model the same way and write report.md, results.json and PNG charts to --out.",
        conflict_handler="resolve",  # --seed is redefined below to take several seeds
    )
    parser.add_argument("models", nargs="+", metavar="MODEL", help="checkpoint folders, hub ids, or 'smollm2' (2 or more)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for report.md, results.json and the charts")
    parser.add_argument("--name", action="append", default=None, metavar="NAME",
                        help="display name per model, in order (default: each MODEL's last path component when those "
                             "differ, else the MODEL arguments)")
    parser.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                        help=f"prompt to continue with every model (repeatable; default: {DEFAULT_PROMPTS})")
    add_source_arguments(parser)
    add_sampling_arguments(parser, max_new_tokens=40)
    parser.add_argument("--seed", type=int, nargs="+", default=[0, 1], help="sampling seeds, each used for every model (default 0 1)")
    parser.add_argument("--quantize", nargs="+", choices=QUANTIZATIONS, default=["none"], metavar="|".join(QUANTIZATIONS),
                        help="weight-only int8 or int4 (see `generate --help`): one value for every model, or one per model "
                             "in order, e.g. `compare M M --quantize none int8` to measure what int8 costs (default none)")
    parser.add_argument("--speed-batch-size", type=int, default=4, metavar="N", help="batch of the forward-speed test (default 4)")
    parser.add_argument("--speed-seq-len", type=int, default=256, metavar="N", help="sequence length of the forward-speed test (default 256)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console

    from flash_experts.cli.common import check_source_arguments, load_for_generation, sampling_config_from_args
    from flash_experts.errors import UserError
    from flash_experts.evaluation.compare import ModelEntry, compare_models, comparison_table
    from flash_experts.evaluation.perplexity import check_data_tokenizer, read_text_file, wikitext_test_text
    from flash_experts.evaluation.router_stats import router_stats_table

    if len(args.models) < 2:
        raise UserError("compare needs at least 2 models")
    quantize = args.quantize * len(args.models) if len(args.quantize) == 1 else args.quantize
    if len(quantize) != len(args.models):
        raise UserError(f"{len(quantize)} --quantize values for {len(args.models)} models: give one, or one per model")
    names = args.name or [name + (f" ({q})" if q != "none" else "")
                          for name, q in zip(_default_names(args.models), quantize)]
    if len(names) != len(args.models):
        raise UserError(f"{len(names)} --name values for {len(args.models)} models: give one per model or none")
    sampling = sampling_config_from_args(args)
    check_source_arguments(args)
    if Path(args.out).exists() and not Path(args.out).is_dir():  # fail before loading any model
        raise UserError(f"--out exists and is not a folder: {args.out}")

    eval_text = eval_tokens = None
    eval_source = ""
    if args.text is not None:
        eval_text, eval_source = read_text_file(args.text), f"text file {args.text}"
    elif args.wikitext is not None:
        eval_text = wikitext_test_text(None if args.wikitext is True else args.wikitext)
        eval_source = "WikiText-2 raw test split"
    elif args.data is not None:
        from flash_experts.data.tokens import load_split
        from flash_experts.evaluation.perplexity import as_token_tensor

        eval_tokens = as_token_tensor(load_split(args.data, args.split), args.max_tokens)
        eval_source = f"{args.data} ({args.split} split)"
    if args.max_tokens is not None and eval_source:
        eval_source += f", first {args.max_tokens:,} tokens"

    entries = []
    for name, source, quantization in zip(names, args.models, quantize):
        model, tokenizer = load_for_generation(source, args.device, args.dtype, quantization)
        if args.data is not None:
            check_data_tokenizer(args.data, tokenizer)
        entries.append(ModelEntry(name=name, model=model, tokenizer=tokenizer))

    result = compare_models(
        entries, prompts=args.prompt or DEFAULT_PROMPTS, seeds=args.seed, sampling=sampling,
        max_new_tokens=args.max_new_tokens, eval_text=eval_text, eval_tokens=eval_tokens, eval_source=eval_source,
        context=args.context, stride=args.stride, max_eval_tokens=args.max_tokens, eval_batch_size=args.batch_size,
        speed_batch_size=args.speed_batch_size, speed_seq_len=args.speed_seq_len, out_dir=Path(args.out),
        quiet=args.quiet,
    )
    console = Console()
    console.print(comparison_table(result))
    for report in result.models:
        if report.routing is not None and not report.routing.is_empty:
            console.print(router_stats_table(report.routing, title=f"Routing of {report.name}"))
    for note in result.notes:
        console.print(f"note: {note}")
    console.print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _default_names(models: list[str]) -> list[str]:
    """Short display names: the folders' own names ("runs/moe-ft" -> "moe-ft") when they tell the models
    apart, else the arguments as given."""
    from pathlib import Path

    short = [Path(m.rstrip("/")).name or m for m in models]
    return short if len(set(short)) == len(short) else list(models)
