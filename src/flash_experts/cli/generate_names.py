"""`flash-experts generate-names MODEL [-n 20] [--type "Creature — Elf"] [--colors G]`: new MTG card names.

Prints each distinct valid name, marked `new` (not a real card) or `real`, then validity / uniqueness /
novelty over every sample drawn."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from flash_experts.cli.common import add_sampling_arguments

    parser = subparsers.add_parser(
        "generate-names",
        help="generate Magic: The Gathering card names, each marked new or real, with name metrics",
        description="Sample card names from MODEL (fine-tuned on MTG names), optionally for a type line and colours.",
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint folder, Hugging Face hub id, or 'smollm2'")
    parser.add_argument("-n", "--num-names", type=int, default=20, metavar="N",
                        help="distinct names wanted (default 20)")
    parser.add_argument("--type", dest="type_line", default=None, metavar="TYPE",
                        help='condition on a type line, e.g. "Creature — Elf" (a conditioned model)')
    parser.add_argument("--colors", default=None,
                        help="condition on colours too: W, U, B, R, G letters or names, C = colourless")
    parser.add_argument("--reference-names", default=None, metavar="FILE",
                        help="real card names, one per line (default: the offline MTG card data when cached)")
    parser.add_argument("--max-rounds", type=int, default=5, metavar="N",
                        help="sampling batches at most while looking for N distinct names (default 5)")
    parser.add_argument("--no-filter", action="store_true",
                        help="let the model emit any token (default: only card-name characters, the first a capital, "
                             "no end before 3 letters)")
    # None: the library's card-name setting (mtg.cleaning.NAME_TEMPERATURE / NAME_TOP_P), read when the verb runs
    # (the mtg package imports torch; the parser must start without it).
    add_sampling_arguments(parser, temperature=None, top_k=0, top_p=None, max_new_tokens=16)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from flash_experts.cli.common import load_for_generation, sampling_config_from_args
    from flash_experts.errors import UserError
    from flash_experts.mtg.cards import conditioning_prefix
    from flash_experts.mtg.names import (
        CARD_NAME_FIRST_TOKEN_REGEX,
        CARD_NAME_REGEX,
        MIN_NAME_LETTERS,
        NAME_TEMPERATURE,
        NAME_TOP_P,
        generate_card_names,
    )

    if args.num_names < 1:
        raise UserError(f"-n/--num-names must be >= 1, got {args.num_names}")
    if args.max_rounds < 1:
        raise UserError(f"--max-rounds must be >= 1, got {args.max_rounds}")
    if args.colors is not None and args.type_line is None:
        raise UserError("--colors needs --type too (the conditioned format is 'type | colors | name')")
    conditioning_prefix(args.type_line, args.colors)  # a bad type line or colour fails before the model loads
    args.temperature = NAME_TEMPERATURE if args.temperature is None else args.temperature
    args.top_p = NAME_TOP_P if args.top_p is None else args.top_p
    config = sampling_config_from_args(args)
    if not args.no_filter:  # card-name characters, a capital letter to start, 3+ letters, unless asked otherwise
        config = replace(config, allowed_regex=config.allowed_regex or CARD_NAME_REGEX,
                         first_token_regex=config.first_token_regex or CARD_NAME_FIRST_TOKEN_REGEX,
                         min_letters=config.min_letters or MIN_NAME_LETTERS)
    reference, source = _reference_names(args.reference_names)
    model, tokenizer = load_for_generation(args.model, args.device, args.dtype, args.quantize)

    metrics = generate_card_names(model, tokenizer, args.num_names, type_line=args.type_line, colors=args.colors,
                                  config=config, reference_names=reference, seed=args.seed,
                                  max_new_tokens=args.max_new_tokens, max_rounds=args.max_rounds)
    names = metrics.unique_names()[: args.num_names]
    for sample in names:
        mark = "    " if sample.is_new is None else ("new " if sample.is_new else "real")
        print(f"{mark}  {sample.name}")
    if len(names) < args.num_names:
        print(f"[only {len(names)} distinct valid names after {metrics.total} samples]", file=sys.stderr)
    print(f"[{metrics.summary()}; reference: {source}]", file=sys.stderr)
    return 0


def _reference_names(path: str | None) -> tuple[list[str] | None, str]:
    """(names, where they came from): the given file, else the cached offline MTG data, else none."""
    from flash_experts.errors import UserError
    from flash_experts.mtg.names import read_reference_names

    if path is not None:
        names = read_reference_names(path)
        return names, f"{len(names)} names from {path}"
    try:
        from flash_experts.mtg.cards import load_mtg_records

        records = load_mtg_records(fetch=False)  # only what is already cached: no downloads here
    except (UserError, ImportError, OSError):
        return None, "none (pass --reference-names FILE to mark names new or real)"
    return [r.name for r in records], f"{len(records)} cards from the offline MTG data"
