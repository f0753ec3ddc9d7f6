"""The race, one seed at a time, and what it leaves behind (`flash-experts race`; the loop is race.py's).

`race_seed` trains the twins (race.py `run_race`, Ctrl-C finishing the round and reporting what was reached),
maps which experts took which domain (evaluation/domain_atlas.py), and writes race.json and race.png. The lines
the command line prints are made here too: one seed's summary, and the table of seeds beside the verdict
(seeds.py `contest`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from flash_experts.contest.race import CONTENDERS, TARGET_RATIO, RaceResult, RaceSettings, run_race
from flash_experts.data.domains import DomainCorpus
from flash_experts.training.processes import ProcessLayout


def race_seed(settings: RaceSettings, corpus: DomainCorpus, out: Path, say: Callable[[str], None],
              processes: ProcessLayout = ProcessLayout()) -> RaceResult:
    """One seed of the race: the twins trained (one line per evaluation), their atlas, race.json and race.png
    in `out` (by the first process only). The result carries the atlas (`result.atlas`)."""
    from flash_experts.contest.plots import plot_race
    from flash_experts.evaluation.domain_atlas import domain_atlas
    from flash_experts.training.distributed import any_rank
    from flash_experts.training.stop import StopRequest

    s = settings
    say(f"[2/4] the twins: d={s.width}, {s.layers} layers, {s.heads} heads, context {s.context}, batch "
        f"{s.batch_size}, {s.dtype}, seed {s.seed}; dense MLP {4 * s.width} against {s.recipe_words()}; peak "
        f"learning rate dense {s.optim('dense').lr:g}, MoE {s.optim('moe').lr:g}, {s.warmup_steps} warm-up steps")

    def report(evaluation: Any) -> None:
        cells = " | ".join(f"{name} " + " ".join(f"{d} {v:.3f}" for d, v in evaluation.val[name].items())
                           for name in CONTENDERS)
        seconds = " / ".join(f"{evaluation.seconds[n]:.0f}" for n in CONTENDERS)
        say(f"      step {evaluation.step:>5}  {evaluation.tokens / 1e6:5.2f}M bytes  {cells}  (s {seconds})")

    say(f"[3/4] training both from scratch, taking turns, {s.steps} steps each; validation loss in nats per byte")
    with StopRequest(then="evaluating, scoring the test split and printing the result so far") as stop:
        # every process stops at the same round (a collective each round; one process: the flag itself)
        result, models = run_race(s, corpus, on_evaluation=report, should_stop=lambda: any_rank(stop.requested, "cpu"),
                                  processes=processes)
    say("[4/4] the result")
    val_windows = corpus.split_windows("val", s.context, s.eval_windows)
    result.atlas = domain_atlas(models["moe"], val_windows, s.batch_size, s.torch_dtype)  # every process: its exchanges
    if processes.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "race.json").write_text(json.dumps({**result.as_dict(), "domain_atlas": result.atlas.as_dict()},
                                                  indent=1))
        plot_race(race_curves(result, corpus.domains), out / "race.png",
                  f"from scratch: dense vs iso-FLOP MoE ({s.recipe_words()}), {s.dtype}, seed {s.seed}")
    return result


def race_curves(result: RaceResult, domains: list[str]) -> dict[str, dict[str, tuple]]:
    """contender -> domain ("mean" too) -> (tokens, seconds, loss) at every evaluation: what plot_race draws."""

    def as_lists(curve: Any) -> tuple:
        return curve.tokens.tolist(), curve.seconds.tolist(), curve.loss.tolist()

    return {name: {domain: as_lists(result.curve(name, None if domain == "mean" else domain))
                   for domain in ["mean", *domains]} for name in CONTENDERS}


def summary_lines(result: RaceResult, domains: list[str], one_seed: bool) -> list[str]:
    """One seed's result: FLOPs and parameters, the table at equal tokens, equal seconds and on test, the
    target, the exchange rate and the answer per second, then the domain atlas."""
    from flash_experts.contest.report import per_second_answer
    from flash_experts.contest.seeds import one_seed_words

    flops, params = result.flops_per_token, result.parameters
    last = result.evaluations[-1]
    cost = result.step_cost()
    finish, timed = result.at_equal_time()
    lines = [f"\nTraining FLOPs per token: dense {flops['dense'] / 1e6:.2f}M, MoE {flops['moe'] / 1e6:.2f}M "
             f"({flops['moe'] / flops['dense']:.4f}x); parameters: dense {params['dense'] / 1e6:.2f}M, MoE "
             f"{params['moe'] / 1e6:.2f}M",
             f"Steps {last.step} each, {last.tokens / 1e6:.2f}M bytes each; seconds of training steps: dense "
             f"{last.seconds['dense']:.0f}, MoE {last.seconds['moe']:.0f}; a MoE step costs {cost} a dense step",
             "\nValidation loss, nats per byte (equal tokens: the last evaluation; equal seconds: each at the seconds "
             "the faster one spent in all; test: once, at the end)",
             f"{'domain':<8}{'tokens: dense':>14}{'MoE':>8}{'MoE/dense':>11}   "
             f"{'at ' + format(finish, '.0f') + ' s: dense':>16}{'MoE':>8}{'MoE/dense':>11}   "
             f"{'test: dense':>12}{'MoE':>8}{'MoE/dense':>11}"]

    def pick(table: dict[str, float], domain: str) -> float:
        return table[domain] if domain != "mean" else sum(table[d] for d in domains) / len(domains)

    for domain in [*domains, "mean"]:
        cells = []
        for table in (last.val, timed, result.test):
            dense, moe = pick(table["dense"], domain), pick(table["moe"], domain)
            cells.append(f"{dense:>8.4f}{moe:>8.4f}{moe / dense:>10.3f}x")
        lines.append(f"{domain:<8}{cells[0]:>33}   {cells[1]:>35}   {cells[2]:>31}")
    ratios = {d: last.val["moe"][d] / last.val["dense"][d] for d in domains}
    met = all(r <= TARGET_RATIO for r in ratios.values())
    lines.append(f"\nAt equal tokens: MoE / dense {', '.join(f'{d} {r:.3f}' for d, r in ratios.items())}; target <= "
                 f"{TARGET_RATIO} in every domain: {'met' if met else 'not met'} at this seed")
    if one_seed:
        lines.append(f"Across seeds: {one_seed_words('race')}")
    seconds_ratio = {d: timed["moe"][d] / timed["dense"][d] for d in domains}
    ahead = all(r <= 1.0 for r in seconds_ratio.values())
    lines.append(f"At equal seconds ({finish:.0f} s): the MoE is {'no worse than' if ahead else 'behind'} the dense "
                 f"model ({', '.join(f'{d} {r:.3f}' for d, r in seconds_ratio.items())})")
    exchange = result.token_exchange_rate()
    if exchange is None:
        lines.append("Exchange rate: the dense model never reached a loss the MoE had: no step-cost ratio at which "
                     "the MoE's lead pays can be read off this run")
    else:
        step, rate = exchange
        lines.append(f"Exchange rate: the MoE's loss at step {step} took the dense model {rate:.2f}x the tokens (the "
                     "lead grows with training, so longer runs pay at higher step costs)")
    lines.append(f"Per second: {per_second_answer([exchange[1]] if exchange else None, cost)}")
    lines.append("\nWhich experts took which domain (validation bytes; each expert's mix, then its load):")
    return lines + result.atlas.lines()


def seed_rows(results: list[RaceResult], domains: list[str]) -> list[str]:
    """The seeds side by side: MoE / dense validation loss at equal tokens per domain and their mean, the test
    mean (scored once), the step cost and the exchange rate."""
    import numpy as np

    lines = [f"\nAcross {len(results)} paired seeds (MoE / dense validation loss at equal tokens; test: scored once):",
             f"  {'seed':>6} " + " ".join(f"{d:>8}" for d in domains) + f" {'mean':>8} {'test mean':>10} "
             f"{'step cost':>10} {'exchange':>9}"]
    for r in results:
        last = r.evaluations[-1]
        ratios = [last.val["moe"][d] / last.val["dense"][d] for d in domains]
        test = np.mean([r.test["moe"][d] for d in domains]) / np.mean([r.test["dense"][d] for d in domains])
        rate = r.exchange()
        lines.append(f"  {r.seed:>6} " + " ".join(f"{x:>8.3f}" for x in ratios)
                     + f" {r.compared_loss('moe') / r.compared_loss('dense'):>8.3f} {test:>10.3f} "
                       f"{r.step_cost().median:>9.3f}x {(f'{rate:.2f}x' if rate else 'none'):>9}")
    return lines
