"""`flash-experts generate MODEL --prompt TEXT [sampling controls]`: continue a prompt, streaming as it goes."""

from __future__ import annotations

import argparse
import sys


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float = 0.8, top_k: int = 50,
                           top_p: float = 0.95, max_new_tokens: int = 100) -> None:
    """The sampling controls shared by `generate` and `generate-names`."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                       help=f"tokens to generate at most (default {max_new_tokens})")
    group.add_argument("--temperature", type=float, default=temperature,
                       help=f"softmax temperature; 0 = greedy (default {temperature})")
    group.add_argument("--top-k", type=int, default=top_k,
                       help=f"keep the k most likely tokens, 0 = off (default {top_k})")
    group.add_argument("--top-p", type=float, default=top_p,
                       help=f"nucleus sampling: smallest set with this much probability, 1 = off (default {top_p})")
    group.add_argument("--min-p", type=float, default=0.0,
                       help="drop tokens below min_p x the top probability (default 0 = off)")
    group.add_argument("--repetition-penalty", type=float, default=1.0,
                       help="penalise tokens already present, > 1 discourages repeats (default 1 = off)")
    group.add_argument("--no-repeat-ngram", type=int, default=0, metavar="N",
                       help="never repeat an N-gram (default 0 = off)")
    group.add_argument("--min-new-tokens", type=int, default=0, metavar="N",
                       help="no EOS before N new tokens (default 0)")
    group.add_argument("--ban-words", nargs="+", action="extend", default=[], metavar="WORD",
                       help="words or phrases never to generate")
    group.add_argument("--ban-token-ids", nargs="+", action="extend", type=int, default=[], metavar="ID",
                       help="token ids never to generate")
    group.add_argument("--allow-regex", default=None, metavar="REGEX",
                       help="only generate tokens whose text fully matches REGEX, e.g. \"[A-Za-z ',-]+\" "
                            "(EOS always allowed)")
    group.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    group.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    add_device_arguments(parser)


DTYPES = ("fp32", "bf16", "fp16")
QUANTIZATIONS = ("none", "int8")  # --quantize: none, or weight-only int8 (flash_experts.model.quantize)


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype, for every verb that runs a model for inference."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32",
                        help="precision of the weights: bf16 halves the memory every decoded token reads "
                             "(measured on a 2-core AVX-512 BF16 CPU: 1.2-1.3x the fp32 tokens/s at batch 1, 2x at "
                             "batch 16; benchmarks/bench_generate.py), at the cost of slightly different logits; "
                             "fp16 needs CUDA (default fp32)")
    add_quantize_argument(parser)


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                        help="int8: weight-only int8 matrices and experts, a quarter of the fp32 bytes per decoded "
                             "token, at the cost of slightly different logits (SmolLM2: +0.5%% perplexity). For small "
                             "batches on CPU (measured at batch 1 on a 2-core CPU: 2.7-2.9x HF generate's fp32 tokens/s, "
                             "benchmarks/bench_generate.py; at batch 16 bf16 weights are faster); elsewhere the weights "
                             "are dequantized per call: less memory, not faster (default none)")


def sampling_config_from_args(args: argparse.Namespace):
    """The SamplingConfig the shared sampling arguments describe (`--max-new-tokens` is checked here too)."""
    from flash_experts.errors import UserError
    from flash_experts.generation.sampling import SamplingConfig

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")

    return SamplingConfig(
        temperature=0.0 if args.greedy else args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram,
        min_new_tokens=args.min_new_tokens,
        banned_token_ids=tuple(args.ban_token_ids),
        banned_words=tuple(args.ban_words),
        allowed_regex=args.allow_regex,
    )


def load_for_generation(name_or_path: str, device_name: str, dtype_name: str = "fp32", quantize: str = "none"):
    """(model, tokenizer) on the requested device, with weights in `dtype_name` (fp32, bf16, fp16), in eval mode;
    quantize="int8" then stores its matrices as int8 (flash_experts.model.quantize)."""
    import torch

    from flash_experts.errors import UserError
    from flash_experts.model.loading import load_model

    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_name)
    except RuntimeError:
        raise UserError(f"unknown device {device_name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available")
    if dtype_name not in DTYPES:
        raise UserError(f"unknown dtype {dtype_name!r}: use one of {', '.join(DTYPES)}")
    if dtype_name == "fp16" and device.type != "cuda":
        raise UserError("--dtype fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if quantize not in QUANTIZATIONS:
        raise UserError(f"unknown quantization {quantize!r}: use one of {', '.join(QUANTIZATIONS)}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    model, tokenizer = load_model(name_or_path)
    if tokenizer is None:
        raise UserError(f"no tokenizer found for {name_or_path}")
    model = model.to(device=device, dtype=dtype).eval()
    if quantize == "int8":
        from flash_experts.model.quantize import quantize_int8

        quantize_int8(model)
    return model, tokenizer


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
                      seed=args.seed, stream=stream)
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
    print(f"[{tokens} new tokens in {seconds:.2f} s, {tokens / max(seconds, 1e-9):.1f} tokens/s, "
          f"finish: {', '.join(sorted(set(result.finish_reasons)))}]", file=sys.stderr)
    return 0


def _unescape(text: str) -> str:
    """`--stop '\\n'` means a newline: a shell passes the two characters backslash and n."""
    return text.replace("\\n", "\n").replace("\\t", "\t")
