"""The contests' plots: runs side by side at equal compute (the demo's validation against seconds), the race's two
twins against tokens and seconds, and the race's recipes across seeds. A single run's plots are training/plots.py's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from flash_experts.errors import UserError
from flash_experts.training.plots import read_metrics, series


def validation_curve(run_dir: str | Path, seconds_per_step: float | None = None) -> list[tuple[float, float]]:
    """(training compute in seconds, validation loss) for each evaluation of the run, step 0 included.

    The compute is the run's own measured training-step time at that evaluation (`train/seconds`, logged by
    the trainer): what the run really spent. `seconds_per_step` instead plans it as step x that time, for
    runs whose metrics predate `train/seconds`."""
    records = read_metrics(run_dir)
    steps, losses = series(records, "val/loss")
    if seconds_per_step is not None:
        return [(float(step) * seconds_per_step, float(loss)) for step, loss in zip(steps, losses)]
    seconds_steps, seconds = series(records, "train/seconds")
    realized = dict(zip(seconds_steps.tolist(), seconds.tolist()))
    missing = [int(step) for step in steps if step not in realized]
    if missing:
        raise UserError(f"{run_dir}: no train/seconds logged at step(s) {missing[:5]}; pass the planned "
                        "seconds per step instead")
    return [(realized[step], float(loss)) for step, loss in zip(steps.tolist(), losses)]


def plot_validation_vs_compute(curves: dict[str, list[tuple[float, float]]], path: str | Path, title: str) -> Path:
    """One line per run: validation perplexity (log scale) against training compute on this machine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in curves.items():
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, [math.exp(min(y, 700.0)) for y in ys], marker="o", label=name)
    ax.set_yscale("log")
    # two lines: on one, the label is wider than the 7-inch figure and was cut at both ends (issue 44)
    ax.set_xlabel("training compute on this machine:\nseconds of training steps, as each run measured them")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_race(curves: dict[str, dict[str, tuple[list[float], list[float], list[float]]]], path: str | Path,
              title: str) -> Path:
    """The from-scratch race: validation loss (nats per byte) against training tokens (left) and against the
    seconds of training steps each contender measured (right). curves[contender][domain] = (tokens, seconds,
    loss); a domain named "mean" is drawn thick, the others thin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colors = dict(zip(curves, ("tab:blue", "tab:red", "tab:green", "tab:purple")))
    styles = ("--", ":", "-.", (0, (1, 3)))
    for name, domains in curves.items():
        thin = iter(styles)
        for domain, (tokens, seconds, loss) in domains.items():
            mean = domain == "mean"
            style = dict(color=colors[name], linewidth=2.2 if mean else 1.0, alpha=1.0 if mean else 0.75,
                         linestyle="-" if mean else next(thin), label=f"{name}: {domain}")
            axes[0].plot(np.asarray(tokens) / 1e6, loss, **style)
            axes[1].plot(seconds, loss, **style)
    # The first evaluations (an untrained model, ln 256 nats per byte) would squash the part where the two differ.
    later = [value for domains in curves.values() for _, _, loss in domains.values() for value in loss[2:]]
    if later:
        axes[0].set_ylim(min(later) - 0.05, max(later) + 0.05)
    axes[0].set_xlabel("training tokens (millions of bytes): equal for both at every point")
    axes[1].set_xlabel("seconds of training steps, as each contender measured them")
    axes[0].set_ylabel("validation loss (nats per byte)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_race_recipes(ratios: dict[str, tuple[list[float], list[list[float]]]], path: str | Path, title: str) -> Path:
    """The race's recipes: the MoE's validation loss over the dense twin's (mean over domains) against training
    tokens, one line per recipe (the mean over seeds), its band the lowest and highest seed.
    ratios[recipe] = (tokens, [ratio at each evaluation, one list per seed])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for name, (tokens, per_seed) in ratios.items():
        values = np.asarray(per_seed)
        millions = np.asarray(tokens) / 1e6
        line, = ax.plot(millions, values.mean(0), linewidth=1.8, label=f"{name} ({len(per_seed)} seeds)")
        ax.fill_between(millions, values.min(0), values.max(0), color=line.get_color(), alpha=0.15)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(0.98, color="black", linewidth=0.8, linestyle=":", label="issue 28's target (0.98)")
    ax.set_xlabel("training tokens (millions of bytes)")
    ax.set_ylabel("MoE / dense validation loss (mean over domains)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
