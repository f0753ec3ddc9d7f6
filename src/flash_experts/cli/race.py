"""`flash-experts race`: where a Mixture of Experts pays. A small byte-level GPT and its iso-FLOP MoE twin, trained
from scratch on prose, Python source and card names, taking turns on the same batches, set side by side.

    flash-experts race                      # the default race (~15-20 minutes on a 2-core CPU)
    flash-experts race --experts 16 --top-k 4
    flash-experts race --quick              # a one-minute smoke run of the same pipeline

1. the corpus, offline: Wikipedia summaries (prose), this Python's standard library (code), MTG card names
   (names), as bytes: at a vocabulary of 256 the MLPs carry the FLOPs;
2. the twins: dense MLP of hidden 4d against E experts of hidden 4d/k, k per byte, every layer (the same matrix
   FLOPs per token, printed); the same seed, the same batches, the same schedule;
3. training, the two taking turns step by step, each step timed; validation loss per domain at every
   evaluation, so the two are compared at equal tokens exactly;
4. the result: per domain at equal tokens, at equal seconds, and on the test split (scored once); the step-cost
   ratio and the one at which the MoE's per-token lead would pay; which experts took which domain; a PNG of loss
   against tokens and against seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from flash_experts.cli.common import training_dtype_word

TARGET_RATIO = 0.98  # issue 28: the MoE's validation loss at most 0.98x the dense model's, every domain
TRAIN_BYTES, EVAL_BYTES = 4_000_000, 262_144  # per domain
QUICK = dict(width=64, layers=2, heads=2, context=64, batch_size=12, experts=4, top_k=2, steps=60, eval_every=20,
             warmup_steps=6, eval_windows=16, test_windows=32)
QUICK_TRAIN_BYTES = 300_000


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "race",
        help="from scratch: a small dense GPT against its iso-FLOP MoE twin on prose, code and card names",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="runs/race", help="folder for the corpus, race.json, the atlas and the PNG")
    parser.add_argument("--steps", type=int, default=None, help="training steps of each twin (default 800)")
    parser.add_argument("--experts", type=int, default=None, help="experts per layer (default 8)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="routed experts per byte (default 2); each expert's hidden size is 4 x width / (top-k + "
                             "shared experts)")
    parser.add_argument("--shared-experts", type=int, default=None,
                        help="experts every byte goes through beside its routed ones (DeepSeekMoE; default 0)")
    parser.add_argument("--moe-layers", choices=("all", "every_other"), default=None,
                        help="MoE in every layer (default) or every other (layers 1, 3, ...; the others dense)")
    parser.add_argument("--width", type=int, default=None, help="model width d (default 256)")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default 4)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads, dividing the width (default 4)")
    parser.add_argument("--aux-loss", type=float, default=None, help="Switch balancing loss weight (default 0.01)")
    parser.add_argument("--z-loss", type=float, default=None, help="router z-loss weight (default 0.001)")
    parser.add_argument("--router-gradient", choices=("held-sum", "through-sum"), default=None,
                        help="how the router learns from the top-k weights' renormalising sum: differentiated (HF "
                             "Mixtral's gradient; the default for top-k >= 2) or held constant (the Switch gradient; "
                             "the default for top-1)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate of both (default 2e-3)")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default 50)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--dtype", type=training_dtype_word, default="auto", metavar="{auto,fp32,bf16}",
                        help="auto = bf16 autocast where the CPU computes bf16 natively, else fp32")
    parser.add_argument("--quick", action="store_true", help="tiny twins, 60 steps: checks the pipeline in a minute")
    parser.set_defaults(func=run)


def race_settings(args: argparse.Namespace):
    """RaceSettings from the arguments (the quick shapes under --quick); raises UserError on a bad value."""
    from flash_experts.errors import UserError
    from flash_experts.training.config import resolve_precision
    from flash_experts.training.race import RaceSettings

    if args.dtype == "fp16":
        raise UserError("--dtype fp16 needs a CUDA device; the race runs on the CPU: use bf16 or fp32")
    given = {name: getattr(args, name) for name in ("steps", "experts", "top_k", "shared_experts", "moe_layers", "width",
                                                    "layers", "heads", "aux_loss", "z_loss", "lr", "eval_every")
             if getattr(args, name) is not None}
    if args.router_gradient is not None:
        given["renormalize_through_sum"] = args.router_gradient == "through-sum"
    settings = RaceSettings(**{**(QUICK if args.quick else {}), **given}, seed=args.seed,
                            dtype=resolve_precision(args.dtype, "cpu"))
    if settings.experts < 2:
        raise UserError(f"--experts must be >= 2 for a Mixture of Experts, got {settings.experts}")
    settings.check()
    return settings


def recipe(s: Any) -> str:
    """The MoE twin in words: "8 experts of 512, top-2, every layer, Mixtral router gradient"."""
    shared = f" + {s.shared_experts} shared" if s.shared_experts else ""
    where = "every layer" if s.moe_layers == "all" else "every other layer"
    gradient = "Mixtral" if s.through_sum else "Switch"  # the top-k sum differentiated, or held
    return f"{s.experts} experts of {s.expert_hidden}, top-{s.top_k}{shared}, {where}, {gradient} router gradient"


def build_corpus(out: Path, quick: bool):
    """prose, code, names: the offline sources, as byte streams saved under out/ (rebuilt each run: a minute)."""
    from flash_experts.data.domains import DomainCorpus, python_source_documents
    from flash_experts.data.text import wikipedia_documents
    from flash_experts.mtg.cards import load_offline_mtg, mtg_documents

    documents = {"prose": wikipedia_documents(), "code": python_source_documents(),
                 "names": mtg_documents(load_offline_mtg())}
    limits = {"train": QUICK_TRAIN_BYTES if quick else TRAIN_BYTES, "val": EVAL_BYTES, "test": EVAL_BYTES}
    corpus = DomainCorpus.from_documents(documents, limits)
    corpus.save(out)
    return corpus


def run(args: argparse.Namespace) -> int:
    from flash_experts.errors import UserError

    settings = race_settings(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    from flash_experts.evaluation.domain_atlas import domain_atlas
    from flash_experts.training.plots import plot_race
    from flash_experts.training.race import CONTENDERS, run_race
    from flash_experts.training.trainer import StopRequest

    started = time.perf_counter()
    print("[1/4] the corpus: Wikipedia summaries (prose), the Python standard library (code), MTG card names "
          "(names), as bytes", flush=True)
    corpus = build_corpus(out / "data", args.quick)
    sizes = ", ".join(f"{d} {len(s['train']) / 1e6:.2f}M/{len(s['val']) / 1e3:.0f}K/{len(s['test']) / 1e3:.0f}K"
                      for d, s in corpus.streams.items())
    print(f"      train/val/test bytes: {sizes}", flush=True)
    s = settings
    print(f"[2/4] the twins: d={s.width}, {s.layers} layers, {s.heads} heads, context {s.context}, batch "
          f"{s.batch_size}, {s.dtype}; dense MLP {4 * s.width} against {recipe(s)}", flush=True)

    def report(evaluation: Any) -> None:
        cells = " | ".join(f"{name} " + " ".join(f"{d} {v:.3f}" for d, v in evaluation.val[name].items())
                           for name in CONTENDERS)
        seconds = " / ".join(f"{evaluation.seconds[n]:.0f}" for n in CONTENDERS)
        print(f"      step {evaluation.step:>5}  {evaluation.tokens / 1e6:5.2f}M bytes  {cells}  (s {seconds})",
              flush=True)

    print(f"[3/4] training both from scratch, taking turns, {s.steps} steps each; validation loss in nats per byte",
          flush=True)
    with StopRequest(then="evaluating, scoring the test split and printing the result so far") as stop:
        result, models = run_race(settings, corpus, on_evaluation=report, should_stop=lambda: stop.requested)
    flops, params = result.flops_per_token, result.parameters
    print("[4/4] the result", flush=True)
    val_windows = corpus.split_windows("val", s.context, s.eval_windows)
    atlas = domain_atlas(models["moe"], val_windows, s.batch_size, s.torch_dtype)
    out.mkdir(parents=True, exist_ok=True)
    (out / "race.json").write_text(json.dumps({**result.as_dict(), "domain_atlas": atlas.as_dict()}, indent=1))
    png = plot_race(race_curves(result, corpus.domains), out / "race.png",
                    f"from scratch: dense vs iso-FLOP MoE ({recipe(s)}), {s.dtype}")
    print_summary(result, corpus.domains, flops, params)
    print("\nWhich experts took which domain (validation bytes; each expert's mix, then its load):")
    print("\n".join(atlas.lines()))
    print(f"\nrace.json, race.png and the corpus in {out} ({png.name}); {(time.perf_counter() - started) / 60:.1f} "
          f"min in all{'; ' + result.stopped if result.stopped != 'finished' else ''}")
    return 0


def race_curves(result: Any, domains: list[str]) -> dict[str, dict[str, tuple]]:
    from flash_experts.training.race import CONTENDERS

    return {name: {domain: tuple(v.tolist() for v in result.curve(name, None if domain == "mean" else domain))
                   for domain in ["mean", *domains]} for name in CONTENDERS}


def print_summary(result: Any, domains: list[str], flops: dict[str, float], params: dict[str, int]) -> None:
    last = result.evaluations[-1]
    cost = result.step_cost_ratio()
    finish, timed = result.at_equal_time()
    print(f"\nMatrix FLOPs per token: dense {flops['dense'] / 1e6:.2f}M, MoE {flops['moe'] / 1e6:.2f}M "
          f"({flops['moe'] / flops['dense']:.3f}x); parameters: dense {params['dense'] / 1e6:.2f}M, MoE "
          f"{params['moe'] / 1e6:.2f}M")
    print(f"Steps {last.step} each, {last.tokens / 1e6:.2f}M bytes each; seconds of training steps: dense "
          f"{last.seconds['dense']:.0f}, MoE {last.seconds['moe']:.0f}; a MoE step costs {cost:.3f}x a dense step "
          "(median of the step pairs)")
    header = f"{'domain':<8}{'tokens: dense':>14}{'MoE':>8}{'MoE/dense':>11}   {'at ' + format(finish, '.0f') + ' s: dense':>16}" \
             f"{'MoE':>8}{'MoE/dense':>11}   {'test: dense':>12}{'MoE':>8}{'MoE/dense':>11}"
    print("\nValidation loss, nats per byte (equal tokens: the last evaluation; equal seconds: each at the seconds the "
          "faster one spent in all; test: once, at the end)")
    print(header)
    def pick(table: dict[str, float], domain: str) -> float:
        return table[domain] if domain != "mean" else sum(table[d] for d in domains) / len(domains)

    for domain in [*domains, "mean"]:
        cells = []
        for table in (last.val, timed, result.test):
            dense, moe = pick(table["dense"], domain), pick(table["moe"], domain)
            cells.append(f"{dense:>8.4f}{moe:>8.4f}{moe / dense:>10.3f}x")
        print(f"{domain:<8}{cells[0]:>33}   {cells[1]:>35}   {cells[2]:>31}")
    ratios = {d: last.val["moe"][d] / last.val["dense"][d] for d in domains}
    met = all(r <= TARGET_RATIO for r in ratios.values())
    print(f"\nAt equal tokens: MoE / dense {', '.join(f'{d} {r:.3f}' for d, r in ratios.items())}; target <= "
          f"{TARGET_RATIO} in every domain: {'met' if met else 'not met'} (one seed: "
          "benchmarks/race_seeds.py runs several)")
    exchange = result.token_exchange_rate()
    seconds_ratio = {d: timed["moe"][d] / timed["dense"][d] for d in domains}
    ahead = all(r <= 1.0 for r in seconds_ratio.values())
    print(f"At equal seconds ({finish:.0f} s): the MoE is {'no worse than' if ahead else 'behind'} the dense model "
          f"({', '.join(f'{d} {r:.3f}' for d, r in seconds_ratio.items())})")
    if exchange is None:
        print("Exchange rate: the dense model never reached a loss the MoE had: no step-cost ratio at which the "
              "MoE's lead pays can be read off this run")
    else:
        step, rate = exchange
        verdict = "pays" if cost <= rate else "does not pay"
        print(f"Exchange rate: the MoE's loss at step {step} took the dense model {rate:.2f}x the tokens; at a step "
              f"cost of {cost:.2f}x the MoE's lead {verdict} per second there (it pays below {rate:.2f}x; the lead "
              "grows with training, so longer runs pay at higher step costs)")
