"""Options and helpers shared by several verbs (verbs import this module, never each other).

- inference: the sampling controls, --device/--dtype/--quantize, and loading a model for generation;
- evaluation data: --wikitext/--data/--text and the window options (`evaluate`, `compare`);
- training: --config, overrides and --resume, and running the trainer (`finetune`, `pretrain`).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------ inference


def add_sampling_arguments(parser: argparse.ArgumentParser, temperature: float | None = 0.8, top_k: int = 50,
                           top_p: float | None = 0.95, max_new_tokens: int = 100) -> None:
    """The sampling controls shared by `generate` and `generate-names` (None: the verb fills in its own default
    when it runs, named in the help as the card-name setting)."""
    def default(value: float | None) -> str:
        return "the card-name setting, docs/UPCYCLING.md" if value is None else str(value)

    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N",
                       help=f"tokens to generate at most (default {max_new_tokens})")
    group.add_argument("--temperature", type=float, default=temperature,
                       help=f"softmax temperature; 0 = greedy (default {default(temperature)})")
    group.add_argument("--top-k", type=int, default=top_k,
                       help=f"keep the k most likely tokens, 0 = off (default {top_k})")
    group.add_argument("--top-p", type=float, default=top_p,
                       help=f"nucleus sampling: smallest set with this much probability, 1 = off (default {default(top_p)})")
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
    group.add_argument("--first-token-regex", default=None, metavar="REGEX",
                       help="the first generated token's text must fully match REGEX (never EOS), e.g. \" ?[A-Z].*\"")
    group.add_argument("--greedy", action="store_true", help="greedy decoding (same as --temperature 0)")
    group.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    add_device_arguments(parser)


def training_dtype_word(text: str) -> str:
    """argparse type of a training verb's --dtype: "auto" (run.precision's default) or a precision word."""
    return "auto" if text == "auto" else dtype_word(text)


def dtype_word(text: str) -> str:
    """argparse type of --dtype: the project's precision words (run.precision's), other spellings named."""
    from flash_experts.training.config_convert import (  # no torch: --help stays instant
        OTHER_PRECISION_SPELLINGS,
        PRECISIONS,
    )

    if text in PRECISIONS:
        return text
    if text.lower() in OTHER_PRECISION_SPELLINGS:
        raise argparse.ArgumentTypeError(f"{text!r} is spelled {OTHER_PRECISION_SPELLINGS[text.lower()]} here")
    raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(PRECISIONS)}")

QUANTIZATIONS = ("none", "int8", "int4")  # --quantize: none, or a scheme of flash_experts.model.quantize


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """--device and --dtype, for every verb that runs a model for inference."""
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", type=dtype_word, default="fp32", metavar="{fp32,bf16,fp16}",
                        help="precision of the weights: bf16 halves the bytes every decoded token reads (faster "
                             "where the CPU or GPU computes bf16 natively; BENCHMARKS.md has the measured speeds), at "
                             "the cost of slightly different logits; fp16 needs CUDA (default fp32)")
    add_quantize_argument(parser)


class RenamedOption(argparse.Action):
    """An option that was renamed: using it is one error line naming the new spelling."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kwargs: Any):
        super().__init__(option_strings, dest, nargs=0, help=argparse.SUPPRESS, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None):  # noqa: ANN001 (argparse's protocol)
        parser.error(f"{option_string} is now {self.new}")


def add_quantize_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default="none",
                        help="weight-only quantized matrices and experts: int8 (a scale per output channel) reads a "
                             "quarter of the fp32 bytes per decoded token, int4 (a scale and a zero per 32 weights) "
                             "about a sixth, at the cost of slightly different logits. Faster for small batches on "
                             "CPU, where decoding is bound by the bytes it reads; elsewhere the weights are "
                             "dequantized per call: less memory, not faster (measured speed and quality cost: "
                             "BENCHMARKS.md; default none)")


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
        first_token_regex=args.first_token_regex,
    )


def load_for_generation(name_or_path: str, device_name: str, dtype_name: str = "fp32", quantize: str = "none"):
    """(model, tokenizer) on the requested device, with weights in `dtype_name` (fp32, bf16, fp16), in eval mode;
    quantize="int8" / "int4" then stores its matrices in that many bits (flash_experts.model.quantize)."""
    import torch

    from flash_experts.errors import UserError
    from flash_experts.model.loading import load_model
    from flash_experts.model.upcycle import in_our_classes

    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_name)
    except RuntimeError:
        raise UserError(f"unknown device {device_name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available")
    try:
        dtype_name = dtype_word(dtype_name)
    except argparse.ArgumentTypeError as error:
        raise UserError(f"--dtype: {error}") from None
    if dtype_name == "fp16" and device.type != "cuda":
        raise UserError("--dtype fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if quantize not in QUANTIZATIONS:
        raise UserError(f"unknown quantization {quantize!r}: use one of {', '.join(QUANTIZATIONS)}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    model, tokenizer = load_model(name_or_path)
    if tokenizer is None:
        raise UserError(f"no tokenizer found for {name_or_path}")
    model, why_not = in_our_classes(model)  # our attention, cache, quantization and compiled decode apply
    if why_not is not None:
        print(f"note: {name_or_path} runs as transformers' {type(model).__name__}: {why_not}", file=sys.stderr)
    model = model.to(device=device, dtype=dtype).eval()
    if quantize != "none":
        from flash_experts.model.quantize import quantize as quantize_model

        quantize_model(model, quantize)
    return model, tokenizer


# --------------------------------------------------------------------------------------------- evaluation data


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation-data options shared by `evaluate` and `compare`."""
    source = parser.add_argument_group("evaluation data (choose one)").add_mutually_exclusive_group()
    source.add_argument("--wikitext", nargs="?", const=True, default=None, metavar="PATH",
                        help="WikiText-2 raw test split: wiki.test.raw or its folder (no PATH: find it via "
                             "$FLASH_EXPERTS_WIKITEXT_DIR, the datasets cache or the hub)")
    source.add_argument("--data", metavar="DIR", help="a folder made by `flash-experts prepare-data` (see --split)")
    source.add_argument("--text", metavar="FILE", help="any UTF-8 text file, tokenised as one stream")
    parser.add_argument("--split", default="val", help="split of --data to evaluate: train, val or test (default val)")
    parser.add_argument("--context", type=int, default=None, metavar="N",
                        help="window length in tokens (default: the model's maximum positions)")
    parser.add_argument("--stride", type=int, default=None, metavar="N",
                        help="tokens between window starts (default: the context, i.e. non-overlapping windows; "
                             "smaller = more history per scored token, lower perplexity, slower)")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N", help="evaluate only the first N tokens")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N", help="windows per forward pass (default 4)")


def check_source_arguments(args: argparse.Namespace) -> None:
    """Fail on a missing evaluation file before spending time loading models."""
    from flash_experts.errors import UserError

    for flag, value in (("--text", args.text), ("--data", args.data), ("--wikitext", args.wikitext)):
        if isinstance(value, str) and not Path(value).expanduser().exists():
            raise UserError(f"{flag}: not found: {value}")


# ------------------------------------------------------------------------------------------------- training


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML training config (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. optim.lr=1e-4 moe=null"
    )
    parser.add_argument(
        "--resume", nargs="?", const="auto", default=None, metavar="PATH",
        help="continue a run: a checkpoint or run folder; alone (or 'auto'): the latest checkpoint of run.out_dir, "
        "starting fresh when there is none",
    )


def run_training(args: argparse.Namespace, forced: list[str], verb: str) -> int:
    """Load the config (forced overrides first, so the user's can be checked against them), train, report."""
    from flash_experts.training.config import load_config
    from flash_experts.training.trainer import train

    overrides, resume = list(args.overrides), args.resume
    if resume is not None and "=" in resume and not Path(resume).exists():
        overrides.append(resume)  # `--resume optim.lr=1e-4`: argparse took the override for --resume's PATH
        resume = "auto"
    cfg = load_config(args.config, forced + overrides)
    if verb == "pretrain" and cfg.model.base != "scratch":
        from flash_experts.errors import UserError

        raise UserError(
            f"pretrain trains from scratch (model.base=scratch), got model.base={cfg.model.base!r}; use finetune"
        )
    result = train(cfg, resume=resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(_summary(result))
    return 0


def _summary(result: Any) -> str:
    def loss(value: float | None, ppl: float | None) -> str:
        return "n/a" if value is None else f"{value:.4f} (ppl {ppl:.2f})"

    best_at = f" at step {result.best_step}" if result.best_step else ""
    lines = [
        f"{result.stopped}: {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.1f}s",
        f"  val loss  final {loss(result.final_val_loss, result.final_val_ppl)}, "
        f"best {loss(result.best_val_loss, result.best_val_ppl)}{best_at}",
        f"  run folder {result.run_dir}",
    ]
    if result.checkpoint:
        lines.append(f"  checkpoint {result.checkpoint}")
    return "\n".join(lines)
