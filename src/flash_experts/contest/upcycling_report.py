"""What the main job prints (`flash-experts demo`; the contest is upcycling.py's): one seed's table of the two
runs side by side, with the answer per second and the names, and the table of seeds the verdict stands beside
(seeds.py `contest`). Lines only: the command line prints them.
"""

from __future__ import annotations

from pathlib import Path

from flash_experts.contest.upcycling import UpcyclingOutcome, routing_lines


def summary_lines(outcome: UpcyclingOutcome, folder: Path) -> list[str]:
    """One seed: the table (perplexities, test bits per character, names, steps, FLOPs, seconds), the quality
    ratio against the measured band, the step cost and answer per second, up to 20 names of each model, then
    the routers and the expert atlas."""
    from flash_experts.contest.report import per_second_answer
    from flash_experts.contest.seeds import one_seed_words

    s, results, scores = outcome.settings, outcome.results, outcome.scores
    dense, moe = results["dense"], results["moe"]

    def ppl(value: float | None) -> str:
        return "n/a (resumed)" if value is None else f"{value:.2f}"

    def names(name: str) -> str:
        m = scores[name]["metrics"]
        return f"{m.validity:.1%} / {m.uniqueness:.1%} / {m.novelty:.1%} of {m.total}"

    def sampling(name: str) -> str:
        config, chosen = scores[name]["sampling"], scores[name]["chosen"]
        how = "chosen on selection samples" if chosen else "default: no setting reached the targets"
        return f"{config.temperature:g}, {config.top_p:g} ({how})"

    flops = outcome.plan["flops_per_token"]
    rows = [
        ("", "dense", f"MoE ({s.num_experts} experts, top-{s.num_experts_per_tok})"),
        ("val perplexity, step 0", ppl(dense.initial_val_ppl), ppl(moe.initial_val_ppl)),
        ("val perplexity, best", f"{dense.best_val_ppl:.2f} (step {dense.best_step})",
         f"{moe.best_val_ppl:.2f} (step {moe.best_step})"),
        ("test bits per character", f"{scores['dense']['test_bpc']:.4f}", f"{scores['moe']['test_bpc']:.4f}"),
        ("test names from the start, bits/char", f"{scores['dense']['name_bpc']:.4f}",
         f"{scores['moe']['name_bpc']:.4f}"),
        ("names valid/unique/novel", names("dense"), names("moe")),
        ("names' temperature, top-p", sampling("dense"), sampling("moe")),
        ("steps, tokens", f"{dense.steps}, {dense.tokens:,}", f"{moe.steps}, {moe.tokens:,}"),
        ("training FLOPs", f"{dense.tokens * flops['dense']:.4g}", f"{moe.tokens * flops['moe']:.4g}"),
        ("seconds of training steps", f"{dense.train_seconds:.1f} s", f"{moe.train_seconds:.1f} s"),
        ("wall time, evaluations included", f"{dense.seconds / 60:.1f} min", f"{moe.seconds / 60:.1f} min"),
    ]
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"  base {outcome.base}; equal compute: {outcome.plan['budget'].flops:.4g} training FLOPs each, trained "
             f"in turns on the same batches; MoE layers: every other; MoE trained: {s.train}"]
    lines += ["  " + "  ".join(cell.ljust(width[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    lines.append(f"  quality at equal compute: MoE / dense validation perplexity {outcome.val_ppl_ratio:.3f} (loss "
                 f"{outcome.val_loss_ratio:.4f}); {one_seed_words('demo')}")
    cost = outcome.step_cost()
    if cost is None:
        lines.append("  a MoE step's cost: no step pairs ran in this invocation (resumed after the end)")
    else:
        rate = outcome.exchange_rate()
        lines.append(f"  a MoE step costs {cost} a dense step; exchange rate: "
                     + (f"the MoE's result was worth {rate:.2f}x the dense tokens" if rate else "none (the dense "
                        "model never fell to a loss the MoE had reached)"))
        lines.append(f"  per second: {per_second_answer([rate] if rate else None, cost)}")
    lines.append(f"  total time {outcome.minutes:.1f} min; runs {folder / 'dense'}, {folder / 'moe'}; validation vs "
                 f"tokens and seconds: {outcome.plot}")
    return lines + name_lines(outcome) + routing_lines(results["moe"], outcome.atlas)


def name_lines(outcome: UpcyclingOutcome, count: int = 20) -> list[str]:
    """Up to `count` distinct valid names of each model, side by side, each marked new or a real card."""
    shown = {name: [f"{'new ' if s.is_new else 'real'}  {s.name}"
                    for s in outcome.scores[name]["metrics"].unique_names()[:count]] for name in ("dense", "moe")}
    if not shown["dense"] and not shown["moe"]:
        return ["  no valid card names from either model"]
    rows = max(len(shown["dense"]), len(shown["moe"]))
    dense, moe = (shown[name] + ["-"] * (rows - len(shown[name])) for name in ("dense", "moe"))
    column = max(len(d) for d in dense)
    return [f"  {rows} of the names (dense | MoE), each new or a real card:"] + [
        f"    {d.ljust(column)}  |  {m}" for d, m in zip(dense, moe)]


def seed_rows(outcomes: list[UpcyclingOutcome]) -> list[str]:
    """The seeds side by side: best validation perplexities and their ratio, test bits per character (scored
    once), the step cost and the exchange rate."""
    lines = [f"\nAcross {len(outcomes)} paired seeds (validation: the best evaluation of each run; test: scored once):",
             f"  {'seed':>6} {'val ppl dense':>14} {'MoE':>8} {'MoE/dense':>10} {'test bpc dense':>15} {'MoE':>8} "
             f"{'step cost':>10} {'exchange':>9}"]
    for o in outcomes:
        d, m = o.results["dense"], o.results["moe"]
        cost, rate = o.step_cost(), o.exchange_rate()
        lines.append(f"  {o.seed:>6} {d.best_val_ppl:>14.2f} {m.best_val_ppl:>8.2f} {o.val_ppl_ratio:>10.3f} "
                     f"{o.scores['dense']['test_bpc']:>15.4f} {o.scores['moe']['test_bpc']:>8.4f} "
                     f"{(f'{cost.median:.3f}x' if cost else 'n/a'):>10} {(f'{rate:.2f}x' if rate else 'none'):>9}")
    return lines
