"""`flash-experts generate MODEL --prompt TEXT [sampling controls]`: continue a prompt, streaming as it goes."""

from __future__ import annotations

import argparse
import sys

from flash_experts.cli.common import add_sampling_arguments, load_for_generation, sampling_config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from a prompt with sampling controls (streams to the terminal)",
        description="Continue PROMPT with MODEL (a checkpoint folder, hub id or 'smollm2'), streaming sample 1.",
    )
    parser.add_argument("model", metavar="MODEL", help="checkpoint folder, Hugging Face hub id, or 'smollm2'")
    parser.add_argument("--prompt", action="append", default=None,
                        help="text to continue (repeat for several prompts; default: unconditional, from EOS)")
    parser.add_argument("--stop", action="append", default=[], metavar="TEXT",
                        help="stop when TEXT appears (repeatable); \\n and \\t mean a newline and a tab")
    parser.add_argument("--num-samples", type=int, default=1, metavar="N", help="samples per prompt (default 1)")
    parser.add_argument("--no-stream", action="store_true", help="print only when everything is done")
    parser.add_argument("--compile", action="store_true",
                        help="run the one-token decode step through torch.compile (our models; the first call "
                             "compiles, which takes a while, then each token is faster, most with --quantize; "
                             "anything that cannot compile decodes eagerly, with a warning)")
    parser.add_argument("--clean", action="store_true",
                        help="tidy the output: normalise whitespace, cut at the last sentence end")
    add_sampling_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from flash_experts.errors import UserError
    from flash_experts.generation.cleaning import clean_text
    from flash_experts.generation.generate import generate

    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    config = sampling_config_from_args(args)
    prompts = [p for p in (args.prompt or [""]) for _ in range(args.num_samples)]
    model, tokenizer = load_for_generation(args.model, args.device, args.dtype, args.quantize)

    stream = None
    if not args.no_stream:
        print(prompts[0], end="", flush=True)

        def stream(pieces: list[str]) -> None:
            print(pieces[0], end="", flush=True)

    start = time.perf_counter()
    result = generate(model, tokenizer, prompts, config, args.max_new_tokens, stop_strings=[_unescape(s) for s in args.stop],
                      seed=args.seed, stream=stream, compile=args.compile)
    seconds = time.perf_counter() - start
    texts = [clean_text(t, sentence_end=True) for t in result.texts] if args.clean else result.texts

    for i, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
        if i == 0 and stream is not None:
            print()
            if args.clean and text != result.texts[0]:
                print(f"[cleaned] {prompt}{text}")
            continue
        if len(prompts) > 1:
            print(f"--- sample {i + 1}/{len(prompts)} ({result.finish_reasons[i]})")
        print(prompt + text)
    tokens = sum(result.num_new_tokens)
    if result.compile_seconds is not None:
        # the rate without the compiling call, which is neither decoding nor paid again in this process
        rest = seconds - result.compile_seconds
        after = f"; the other {tokens - 1} in {rest:.2f} s, {(tokens - 1) / rest:.1f} tokens/s" if tokens > 1 and rest > 0 else ""
        print(f"[decode step compiled: its first call took {result.compile_seconds:.1f} s of these{after}]",
              file=sys.stderr)
    print(f"[{tokens} new tokens in {seconds:.2f} s, {tokens / max(seconds, 1e-9):.1f} tokens/s, "
          f"finish: {', '.join(sorted(set(result.finish_reasons)))}]", file=sys.stderr)
    return 0


def _unescape(text: str) -> str:
    """`--stop '\\n'` means a newline: a shell passes the two characters backslash and n."""
    return text.replace("\\n", "\n").replace("\\t", "\t")
