"""`flash-experts race`: where a Mixture of Experts pays. A small byte-level GPT and its iso-FLOP MoE twin, trained
from scratch on prose, Python source and card names, taking turns on the same batches, set side by side.

    flash-experts race                      # the default race (~15-20 minutes on a 2-core CPU)
    flash-experts race --experts 16 --top-k 4
    flash-experts race --seeds 8            # eight paired seeds, decided by a one-sided paired t-test
    flash-experts race --quick              # a one-minute smoke run of the same pipeline
    torchrun --nproc_per_node=2 -m flash_experts.cli.main race --expert-parallel 2   # the MoE's experts split

1. the corpus, offline: Wikipedia summaries (prose), this Python's standard library (code), MTG card names
   (names), as bytes: at a vocabulary of 256 the MLPs carry the FLOPs;
2. the twins: dense MLP of hidden 4d against E experts of hidden 4d/k, k per byte, every layer (the same
   training FLOPs per token, counted by the models and printed); the same seed, the same batches, the same
   schedule;
3. training on the contest engine (flash_experts/contest), the two taking turns step by step, each step timed;
   validation loss per domain at every evaluation, so the two are compared at equal tokens exactly;
4. the result: per domain at equal tokens, at equal seconds, and on the test split (scored once); the step cost
   with its spread, the exchange rate and the answer per second; which experts took which domain; a PNG of loss
   against tokens and against seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from flash_experts.cli.common import training_dtype_word


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
    parser.add_argument("--seeds", type=int, default=1,
                        help="paired seeds to run, from --seed on (default 1); two or more are decided by a one-sided "
                             "paired t-test at p < 0.01")
    parser.add_argument("--dtype", type=training_dtype_word, default="auto", metavar="{auto,fp32,bf16}",
                        help="auto = bf16 autocast where the CPU computes bf16 natively, else fp32")
    parser.add_argument("--quick", action="store_true", help="tiny twins, 60 steps: checks the pipeline in a minute")
    parser.add_argument("--expert-parallel", type=int, default=1, metavar="N",
                        help="under torchrun: split the MoE twin's experts over groups of N processes (N divides the "
                             "experts and the processes; each process takes its share of every batch); default 1")
    parser.set_defaults(func=run)


# the command line's words -> RaceSettings' (MoESettings') names
OPTION_FIELDS = {"steps": "steps", "experts": "num_experts", "top_k": "num_experts_per_tok",
                 "shared_experts": "shared_experts", "moe_layers": "moe_layers", "width": "width", "layers": "layers",
                 "heads": "heads", "aux_loss": "router_aux_loss_coef", "z_loss": "router_z_loss_coef", "lr": "lr",
                 "eval_every": "eval_every"}


def race_settings(args: argparse.Namespace):
    """RaceSettings from the arguments (the quick shapes under --quick); raises UserError on a bad value."""
    from flash_experts.contest.race import QUICK, RaceSettings
    from flash_experts.errors import UserError
    from flash_experts.training.config import resolve_precision

    if args.dtype == "fp16":
        raise UserError("--dtype fp16 needs a CUDA device; the race runs on the CPU: use bf16 or fp32")
    from flash_experts.contest.seeds import check_seeds

    check_seeds(args.seed, args.seeds)
    given = {field: getattr(args, option) for option, field in OPTION_FIELDS.items() if getattr(args, option) is not None}
    if args.router_gradient is not None:
        given["renormalize_through_sum"] = args.router_gradient == "through-sum"
    settings = RaceSettings(**{**(QUICK if args.quick else {}), **given}, seed=args.seed,
                            dtype=resolve_precision(args.dtype, "cpu"))
    if settings.num_experts < 2:
        raise UserError(f"--experts must be >= 2 for a Mixture of Experts, got {settings.num_experts}")
    settings.check()
    return settings


def run(args: argparse.Namespace) -> int:
    import contextlib
    import os

    from flash_experts.contest.race import Processes
    from flash_experts.errors import UserError
    from flash_experts.training import distributed as dist_utils

    settings = race_settings(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    if args.expert_parallel < 1:
        raise UserError(f"--expert-parallel must be >= 1, got {args.expert_parallel}")
    if args.expert_parallel > 1 and not dist_utils.launched_by_torchrun():
        raise UserError(f"--expert-parallel {args.expert_parallel} splits the experts over processes: run the race "
                        f"under torchrun with a multiple of {args.expert_parallel} processes")
    info = dist_utils.init_distributed("cpu")
    processes = Processes(info.rank, info.world_size, args.expert_parallel)
    processes.check(settings)  # every process refuses alike, before any collective
    try:
        with contextlib.ExitStack() as quiet:
            if not info.is_main:  # one process prints and writes
                quiet.enter_context(contextlib.redirect_stdout(quiet.enter_context(open(os.devnull, "w"))))
            return run_seeds(args, settings, out, processes)
    finally:
        dist_utils.teardown()


def run_seeds(args: argparse.Namespace, settings: Any, out: Path, processes: Any) -> int:
    from flash_experts.contest.race import build_corpus

    started = time.perf_counter()
    print("[1/4] the corpus: Wikipedia summaries (prose), the Python standard library (code), MTG card names "
          "(names), as bytes", flush=True)
    corpus = build_corpus(out / "data", args.quick, save=processes.rank == 0)
    sizes = ", ".join(f"{d} {len(s['train']) / 1e6:.2f}M/{len(s['val']) / 1e3:.0f}K/{len(s['test']) / 1e3:.0f}K"
                      for d, s in corpus.streams.items())
    print(f"      train/val/test bytes: {sizes}", flush=True)
    results = []
    for seed in range(args.seed, args.seed + args.seeds):
        folder = out if args.seeds == 1 else out / f"seed-{seed}"
        if args.seeds > 1:
            print(f"=== seed {seed} ({len(results) + 1} of {args.seeds}) -> {folder}", flush=True)
        result = race_one_seed(dataclasses.replace(settings, seed=seed), corpus, folder, one_seed=args.seeds == 1,
                               processes=processes)
        results.append(result)
        if result.stopped != "finished":
            break
    if len(results) > 1:
        print_seeds(results, corpus.domains)
    print(f"\nrace.json, race.png and the corpus in {out}; {(time.perf_counter() - started) / 60:.1f} min in all"
          f"{'; ' + results[-1].stopped if results[-1].stopped != 'finished' else ''}")
    return 0


def race_one_seed(s: Any, corpus: Any, out: Path, one_seed: bool, processes: Any) -> Any:
    from flash_experts.contest.race import CONTENDERS, run_race
    from flash_experts.evaluation.domain_atlas import domain_atlas
    from flash_experts.training.plots import plot_race
    from flash_experts.training.stop import StopRequest

    print(f"[2/4] the twins: d={s.width}, {s.layers} layers, {s.heads} heads, context {s.context}, batch "
          f"{s.batch_size}, {s.dtype}, seed {s.seed}; dense MLP {4 * s.width} against {s.recipe_words()}", flush=True)

    def report(evaluation: Any) -> None:
        cells = " | ".join(f"{name} " + " ".join(f"{d} {v:.3f}" for d, v in evaluation.val[name].items())
                           for name in CONTENDERS)
        seconds = " / ".join(f"{evaluation.seconds[n]:.0f}" for n in CONTENDERS)
        print(f"      step {evaluation.step:>5}  {evaluation.tokens / 1e6:5.2f}M bytes  {cells}  (s {seconds})",
              flush=True)

    print(f"[3/4] training both from scratch, taking turns, {s.steps} steps each; validation loss in nats per byte",
          flush=True)
    with StopRequest(then="evaluating, scoring the test split and printing the result so far") as stop:
        from flash_experts.training.distributed import any_rank

        # every process stops at the same round (a collective each round; one process: the flag itself)
        result, models = run_race(s, corpus, on_evaluation=report, should_stop=lambda: any_rank(stop.requested, "cpu"),
                                  processes=processes)
    print("[4/4] the result", flush=True)
    val_windows = corpus.split_windows("val", s.context, s.eval_windows)
    atlas = domain_atlas(models["moe"], val_windows, s.batch_size, s.torch_dtype)  # every process: its exchanges
    if processes.rank != 0:
        return result
    out.mkdir(parents=True, exist_ok=True)
    (out / "race.json").write_text(json.dumps({**result.as_dict(), "domain_atlas": atlas.as_dict()}, indent=1))
    plot_race(race_curves(result, corpus.domains), out / "race.png",
              f"from scratch: dense vs iso-FLOP MoE ({s.recipe_words()}), {s.dtype}, seed {s.seed}")
    print_summary(result, corpus.domains, one_seed)
    print("\nWhich experts took which domain (validation bytes; each expert's mix, then its load):")
    print("\n".join(atlas.lines()))
    return result


def race_curves(result: Any, domains: list[str]) -> dict[str, dict[str, tuple]]:
    from flash_experts.contest.race import CONTENDERS

    def as_lists(curve: Any) -> tuple:
        return curve.tokens.tolist(), curve.seconds.tolist(), curve.loss.tolist()

    return {name: {domain: as_lists(result.curve(name, None if domain == "mean" else domain))
                   for domain in ["mean", *domains]} for name in CONTENDERS}


def print_summary(result: Any, domains: list[str], one_seed: bool) -> None:
    from flash_experts.contest.race import TARGET_RATIO
    from flash_experts.contest.report import per_second_answer
    from flash_experts.contest.seeds import one_seed_words

    flops, params = result.flops_per_token, result.parameters
    last = result.evaluations[-1]
    cost = result.step_cost()
    finish, timed = result.at_equal_time()
    print(f"\nTraining FLOPs per token: dense {flops['dense'] / 1e6:.2f}M, MoE {flops['moe'] / 1e6:.2f}M "
          f"({flops['moe'] / flops['dense']:.4f}x); parameters: dense {params['dense'] / 1e6:.2f}M, MoE "
          f"{params['moe'] / 1e6:.2f}M")
    print(f"Steps {last.step} each, {last.tokens / 1e6:.2f}M bytes each; seconds of training steps: dense "
          f"{last.seconds['dense']:.0f}, MoE {last.seconds['moe']:.0f}; a MoE step costs {cost} a dense step")
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
          f"{TARGET_RATIO} in every domain: {'met' if met else 'not met'} at this seed")
    if one_seed:
        print(f"Across seeds: {one_seed_words('race')}")
    seconds_ratio = {d: timed["moe"][d] / timed["dense"][d] for d in domains}
    ahead = all(r <= 1.0 for r in seconds_ratio.values())
    print(f"At equal seconds ({finish:.0f} s): the MoE is {'no worse than' if ahead else 'behind'} the dense model "
          f"({', '.join(f'{d} {r:.3f}' for d, r in seconds_ratio.items())})")
    exchange = result.token_exchange_rate()
    if exchange is None:
        print("Exchange rate: the dense model never reached a loss the MoE had: no step-cost ratio at which the "
              "MoE's lead pays can be read off this run")
    else:
        step, rate = exchange
        print(f"Exchange rate: the MoE's loss at step {step} took the dense model {rate:.2f}x the tokens (the lead "
              "grows with training, so longer runs pay at higher step costs)")
    print(f"Per second: {per_second_answer([exchange[1]] if exchange else None, cost)}")


def print_seeds(results: list[Any], domains: list[str]) -> None:
    """The seeds side by side and the verdict across them (validation at equal tokens, mean over domains)."""
    import numpy as np

    from flash_experts.contest.report import Spread, per_second_answer
    from flash_experts.contest.seeds import paired_test, verdict_words

    print(f"\nAcross {len(results)} paired seeds (MoE / dense validation loss at equal tokens; test: scored once):")
    print(f"  {'seed':>6} " + " ".join(f"{d:>8}" for d in domains) + f" {'mean':>8} {'test mean':>10} {'step cost':>10} "
          f"{'exchange':>9}")
    rates, pairs = [], []
    for r in results:
        last = r.evaluations[-1]
        ratios = [last.val["moe"][d] / last.val["dense"][d] for d in domains]
        test = np.mean([r.test["moe"][d] for d in domains]) / np.mean([r.test["dense"][d] for d in domains])
        cost, exchange = r.step_cost(), r.token_exchange_rate()
        rates.append(exchange[1] if exchange else None)
        pairs += [m / d for d, m in zip(r.step_seconds["dense"], r.step_seconds["moe"])]
        print(f"  {r.settings['seed']:>6} " + " ".join(f"{x:>8.3f}" for x in ratios)
              + f" {r.final_mean_loss('moe') / r.final_mean_loss('dense'):>8.3f} {test:>10.3f} "
                f"{cost.median:>9.3f}x {(f'{exchange[1]:.2f}x' if exchange else 'none'):>9}")
    test = paired_test([r.final_mean_loss("moe") for r in results], [r.final_mean_loss("dense") for r in results])
    print(f"  quality at equal tokens (mean over domains): {verdict_words(test)}")
    cost = Spread.of(pairs)
    print(f"  a MoE step costs {cost} a dense step (all seeds' step pairs)")
    print(f"  per second: {per_second_answer(rates, cost)}")
