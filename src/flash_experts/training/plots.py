"""PNG plots of a run from its metrics.jsonl (see tracking.py for the metric names).

    paths = plot_run("runs/mtg_moe")          # -> runs/mtg_moe/plots/*.png

loss.png             train/val loss and perplexity vs step (and loss_vs_tokens.png, when tokens are logged)
lr.png               learning rate vs step
expert_load.png      layers x experts heatmap: fraction of routed tokens, averaged over the run
expert_load_time.png each MoE layer's load per expert over training (stacked, sums to 1)
router.png           the routers at each evaluation: entropy / ln E, top-1 probability, least used expert's share
                     and the experts' relative distance, per MoE layer (did the routers learn?)
"""

from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from flash_experts.errors import UserError

METRICS_FILE = "metrics.jsonl"
_LOSS_KEY = re.compile(r"^(?P<split>train|val|valid|validation|eval|test)[/_](?:lm_)?loss$")
_PPL_KEY = re.compile(r"^(?P<split>train|val|valid|validation|eval|test)[/_](?:ppl|perplexity)$")
_LOAD_KEY = re.compile(r"^expert_load/layer_?(?P<layer>\d+)$")
_LR_KEYS = ("train/lr", "lr", "optim/lr")
_TOKEN_KEYS = ("train/tokens", "tokens")


# ----------------------------------------------------------------------------------------------- reading


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of <run_dir>/metrics.jsonl. Corrupt lines (a crash mid-write) are skipped with a warning."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run_dir} has no {METRICS_FILE}; is it a training run directory?")
    records, bad = [], []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(number)
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            bad.append(number)
            continue
        records.append(record)
    if not records:  # checked before warning: a file with nothing usable gets one error, not a warning too
        raise UserError(f"{path} holds no metrics records" + (" (every line is corrupt)" if bad else " (empty)"))
    if bad:
        where = "the last line (an interrupted write)" if bad == [len(lines)] else f"line(s) {', '.join(map(str, bad[:10]))}"
        warnings.warn(f"{path}: skipped {len(bad)} corrupt record(s) at {where}", stacklevel=2)
    return records


def series(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one scalar metric, sorted by step. When a resumed run logged a step twice, the
    later record wins (it is the run that continued)."""
    by_step: dict[float, float] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            by_step[record["step"]] = float(value)
    steps = np.array(sorted(by_step), dtype=np.float64)
    return steps, np.array([by_step[s] for s in steps], dtype=np.float64)


def expert_load_matrix(records: list[dict[str, Any]]) -> tuple[list[int], np.ndarray]:
    """(layer indices, (layers, experts) mean load fraction over the run). Each record's list is normalised
    to sum to 1 first, so raw token counts work too. Empty when nothing was logged."""
    per_layer = _load_histories(records)
    layers = sorted(per_layer)
    if not layers:
        return [], np.zeros((0, 0))
    width = max(loads.shape[1] for _, loads in per_layer.values())
    matrix = np.full((len(layers), width), np.nan)
    for row, layer in enumerate(layers):
        loads = per_layer[layer][1]
        matrix[row, : loads.shape[1]] = loads.mean(axis=0)
    return layers, matrix


def _load_histories(records: list[dict[str, Any]]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """layer -> (steps (N,), loads (N, experts) as fractions), the last record per step."""
    raw: dict[int, dict[float, list[float]]] = {}
    for record in records:
        for key, value in record.items():
            match = _LOAD_KEY.match(key)
            if match and isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
                raw.setdefault(int(match["layer"]), {})[record["step"]] = [float(v) for v in value]
    out = {}
    for layer, by_step in raw.items():
        width = max(len(v) for v in by_step.values())
        steps = sorted(s for s, v in by_step.items() if len(v) == width)  # a layout change mid-run: keep the final one
        loads = np.array([by_step[s] for s in steps], dtype=np.float64)
        totals = loads.sum(axis=1, keepdims=True)
        loads = np.divide(loads, totals, out=np.full_like(loads, np.nan), where=totals > 0)
        out[layer] = (np.array(steps, dtype=np.float64), loads)
    return out


# ---------------------------------------------------------------------------------------------- plotting


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write every plot the run's metrics allow; returns the PNG paths written."""
    records = read_metrics(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)

    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    written: list[Path] = []
    for writer in (_plot_loss, _plot_loss_vs_tokens, _plot_lr, _plot_expert_load, _plot_expert_load_time,
                   _plot_router):
        figure = writer(records, plt)
        if figure is None:
            continue
        path = out / f"{writer.__name__.removeprefix('_plot_')}.png"
        figure.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    if not written:
        warnings.warn(f"{run_dir}: no plottable metrics (no */loss, lr or expert_load/* keys)", stacklevel=2)
    return written


def _loss_series(records: list[dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    keys = sorted({k for r in records for k in r if _LOSS_KEY.match(k)}, key=lambda k: (not k.startswith("train"), k))
    return {k: s for k in keys if len((s := series(records, k))[0])}


def _plot_loss(records: list[dict[str, Any]], plt: Any) -> Any:
    losses = _loss_series(records)
    if not losses:
        return None
    figure, (loss_ax, ppl_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    logged_ppl = {_PPL_KEY.match(k)["split"]: k for r in records for k in r if _PPL_KEY.match(k)}
    for key, (steps, values) in losses.items():
        style = dict(marker="o", markersize=3) if len(steps) < 50 else {}
        loss_ax.plot(steps, values, label=key, **style)
        split = _LOSS_KEY.match(key)["split"]
        if split in logged_ppl:
            ppl_steps, ppl = series(records, logged_ppl[split])
            label = logged_ppl[split]
        else:  # perplexity is exp(mean cross entropy in nats)
            ppl_steps, ppl = steps, np.exp(np.minimum(values, 50.0))
            label = f"exp({key})"
        ppl_ax.plot(ppl_steps, ppl, label=label, **style)
    loss_ax.set(title="loss", xlabel="step", ylabel="cross entropy (nats/token)")
    ppl_ax.set(title="perplexity", xlabel="step", ylabel="perplexity")
    if np.nanmax([np.nanmax(v) for _, v in losses.values()]) < 50:
        ppl_ax.set_yscale("log")
    for ax in (loss_ax, ppl_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    return figure


def _plot_loss_vs_tokens(records: list[dict[str, Any]], plt: Any) -> Any:
    token_key = next((k for k in _TOKEN_KEYS if any(k in r for r in records)), None)
    losses = _loss_series(records)
    if token_key is None or not losses:
        return None
    token_steps, tokens = series(records, token_key)
    if len(token_steps) < 2:
        return None
    figure, ax = plt.subplots(figsize=(7, 4.5))
    for key, (steps, values) in losses.items():
        # eval records need not carry a token count: read it off the training curve at that step
        ax.plot(np.interp(steps, token_steps, tokens), values, label=key)
    ax.set(title="loss vs tokens seen", xlabel="tokens", ylabel="cross entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return figure


def _plot_lr(records: list[dict[str, Any]], plt: Any) -> Any:
    key = next((k for k in _LR_KEYS if any(k in r for r in records)), None)
    if key is None:
        return None
    steps, values = series(records, key)
    figure, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, values)
    ax.set(title="learning rate", xlabel="step", ylabel=key)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.grid(alpha=0.3)
    return figure


def _plot_expert_load(records: list[dict[str, Any]], plt: Any) -> Any:
    layers, matrix = expert_load_matrix(records)
    if not layers:
        return None
    n_layers, n_experts = matrix.shape
    figure, ax = plt.subplots(figsize=(max(5.0, 0.7 * n_experts + 2.5), max(2.5, 0.5 * n_layers + 1.5)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0)
    uniform = 1.0 / n_experts
    for row in range(n_layers):
        for col in range(n_experts):
            if not math.isnan(matrix[row, col]) and n_experts <= 32:
                ax.text(col, row, f"{matrix[row, col]:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if matrix[row, col] < np.nanmax(matrix) * 0.6 else "black")
    ax.set_xticks(range(n_experts))
    ax.set_yticks(range(n_layers), [str(layer) for layer in layers])
    ax.set(xlabel="expert", ylabel="layer", title=f"fraction of routed tokens per expert (mean over run; uniform = {uniform:.3f})")
    figure.colorbar(image, ax=ax, label="fraction of tokens")
    return figure


def _plot_expert_load_time(records: list[dict[str, Any]], plt: Any) -> Any:
    histories = _load_histories(records)
    if not histories or all(len(steps) < 2 for steps, _ in histories.values()):
        return None
    layers = sorted(histories)
    columns = min(3, len(layers))
    rows = math.ceil(len(layers) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False, sharey=True)
    for ax, layer in zip(axes.flat, layers):
        steps, loads = histories[layer]
        ax.stackplot(steps, np.nan_to_num(loads).T, labels=[f"expert {e}" for e in range(loads.shape[1])])
        ax.set(title=f"layer {layer}", xlabel="step", ylim=(0, 1))
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    axes.flat[0].set_ylabel("fraction of tokens")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize=8)
    figure.suptitle("expert load over training")
    figure.tight_layout(rect=(0, 0, 0.9, 1))
    return figure


_ROUTER_PANELS = (("entropy_ratio", "routing entropy / ln E (1 = uniform)"),
                  ("top1_prob", "mean top-1 probability"),
                  ("load_min", "least used expert's share"),
                  ("expert_distance", "experts' relative distance"))


def _plot_router(records: list[dict[str, Any]], plt: Any) -> Any:
    """The routing numbers the trainer logs at each evaluation (router/<name>/layer_<i>), one line per layer."""
    pattern = re.compile(r"^router/(?P<name>[a-z0-9_]+)/layer_(?P<layer>\d+)$")
    keys: dict[str, list[tuple[int, str]]] = {}
    for record in records:
        for key in record:
            match = pattern.match(key)
            if match and (int(match["layer"]), key) not in keys.setdefault(match["name"], []):
                keys[match["name"]].append((int(match["layer"]), key))
    if not keys.get("entropy_ratio"):
        return None
    figure, axes = plt.subplots(2, 2, figsize=(11, 7), squeeze=False)
    depth = sorted({layer for layer, _ in keys["entropy_ratio"]})
    colours = {layer: plt.cm.viridis(i / max(1, len(depth) - 1)) for i, layer in enumerate(depth)}  # shallow -> deep
    for ax, (name, title) in zip(axes.flat, _ROUTER_PANELS):
        for layer, key in sorted(keys.get(name, [])):
            steps, values = series(records, key)
            ax.plot(steps, values, marker="o", markersize=3, label=f"layer {layer}", color=colours.get(layer))
        ax.set(title=title, xlabel="step")
        ax.grid(True, alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="center right", fontsize=7)
    figure.suptitle("the routers over training (validation split)")
    figure.tight_layout(rect=(0, 0, 0.88, 1))
    return figure
