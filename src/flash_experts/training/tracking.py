"""Experiment tracking: metrics.jsonl always, W&B and TensorBoard when asked for.

    tracker = Tracker(run_dir, config_to_dict(cfg), cfg.tracking.wandb, cfg.tracking.wandb_project,
                      cfg.tracking.tensorboard, rank0=(rank == 0))
    tracker.log(step, {"train/loss": 2.31, "train/lr": 3e-4, "expert_load/layer_1": [0.12, 0.13, ...]})
    tracker.summary({"best/val_loss": 2.05})
    tracker.close()

Metric names the plots understand (flash_experts.training.plots):
    train/loss, val/loss        mean LM cross entropy (nats/token) -- not including the router aux loss
    train/ppl, val/ppl          optional; the plots use exp(loss) when absent
    train/aux_loss, train/lr, train/grad_norm, train/tokens (cumulative tokens seen), train/tokens_per_sec
    expert_load/layer_{i}       list, fraction of routed token slots each expert received (sums to 1)

`metrics.jsonl` gets one JSON object per `log` call ({"step": .., "time": .., **metrics}), flushed at once, so
a crashed run keeps everything it logged; a resumed run appends to it. W&B keeps a stable run id in
`<run_dir>/wandb_id.txt` so a resumed run continues the same W&B run. A missing wandb or tensorboard package
is a warning, never a crash; processes other than rank 0 get a tracker that does nothing.
"""

from __future__ import annotations

import json
import os
import secrets
import time
import warnings
from pathlib import Path
from typing import Any

from flash_experts.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
WANDB_ID_FILE = "wandb_id.txt"


def resolve_wandb_mode(mode: str) -> str:
    """"auto" -> "online" when WANDB_API_KEY is set, else "offline". Also honours WANDB_MODE=disabled."""
    if mode not in ("auto", "online", "offline", "off"):
        raise ConfigError(f"tracking.wandb must be one of auto, online, offline, off, got {mode!r}")
    if os.environ.get("WANDB_MODE", "").lower() in ("disabled", "off") or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1"):
        return "off"
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


class Tracker:
    def __init__(
        self,
        run_dir: str | os.PathLike,
        config_dict: dict[str, Any] | None = None,
        wandb_mode: str = "auto",
        wandb_project: str = "flash-experts",
        tensorboard: bool = True,
        rank0: bool = True,
    ):
        self.run_dir = Path(run_dir)
        self.enabled = rank0
        self._jsonl = None
        self._wandb_run = None
        self._tb_writer = None
        if not rank0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # line-buffered append: every record reaches the OS as soon as it is written
        self._jsonl = open(self.run_dir / METRICS_FILE, "a", buffering=1, encoding="utf-8")
        self.wandb_mode = resolve_wandb_mode(wandb_mode)
        if self.wandb_mode != "off":
            self._wandb_run = self._start_wandb(config_dict or {}, wandb_project)
        if tensorboard:
            self._tb_writer = self._start_tensorboard()

    # ------------------------------------------------------------------------------------------- logging

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        metrics = {str(k): _plain(v) for k, v in metrics.items()}
        record = {"step": int(step), "time": round(time.time(), 3), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._wandb_run is not None:
            self._log_wandb(int(step), metrics)
        if self._tb_writer is not None:
            for name, value in _scalars(metrics).items():
                self._tb_writer.add_scalar(name, value, int(step))
            self._tb_writer.flush()

    def summary(self, values: dict[str, Any]) -> None:
        """Final numbers of the run: merged into <run_dir>/summary.json and the W&B run summary."""
        if not self.enabled:
            return
        values = {str(k): _plain(v) for k, v in values.items()}
        path = self.run_dir / SUMMARY_FILE
        merged: dict[str, Any] = {}
        if path.is_file():
            try:
                merged = json.loads(path.read_text())
            except json.JSONDecodeError:
                warnings.warn(f"{path} was corrupt; rewriting it", stacklevel=2)
        merged.update(values)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(merged, indent=2) + "\n")
        tmp.replace(path)  # atomic: a crash never leaves half a summary
        if self._wandb_run is not None:
            self._wandb_run.summary.update(values)
        if self._tb_writer is not None:
            self._tb_writer.add_text("summary", "```\n" + json.dumps(merged, indent=2) + "\n```")
            self._tb_writer.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._wandb_run is not None:
            try:
                self._wandb_run.finish()
            except Exception as error:  # noqa: BLE001 - a failed upload must not lose the run
                warnings.warn(f"W&B finish failed: {error}", stacklevel=2)
            self._wandb_run = None
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None
        self.enabled = False

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- backends

    def _start_wandb(self, config_dict: dict[str, Any], project: str) -> Any:
        try:
            import wandb
        except ImportError:
            warnings.warn("wandb is not installed; continuing without W&B (pip install wandb)", stacklevel=3)
            return None
        run_id = self._stable_wandb_id()
        modes = [self.wandb_mode] + (["offline"] if self.wandb_mode == "online" else [])
        for mode in modes:
            try:
                return wandb.init(
                    project=project, name=self.run_dir.name, dir=str(self.run_dir), config=config_dict,
                    id=run_id, resume="allow", mode=mode,
                )
            except Exception as error:  # noqa: BLE001 - no network / bad key: fall back, then go without
                warnings.warn(f"W&B {mode} init failed ({' '.join(str(error).split())})", stacklevel=3)
        warnings.warn("continuing without W&B; metrics.jsonl still has everything", stacklevel=3)
        return None

    def _stable_wandb_id(self) -> str:
        path = self.run_dir / WANDB_ID_FILE
        if path.is_file() and path.read_text().strip():
            return path.read_text().strip()
        run_id = secrets.token_hex(4)  # W&B ids: [a-z0-9]; 8 hex characters as wandb itself uses
        path.write_text(run_id + "\n")
        return run_id

    def _log_wandb(self, step: int, metrics: dict[str, Any]) -> None:
        import wandb

        payload: dict[str, Any] = dict(_scalars(metrics))
        for name, value in metrics.items():
            if isinstance(value, list) and value and all(_is_number(v) for v in value):
                payload[name] = wandb.Histogram(value)  # the spread of load across experts
        # step= keeps W&B's x axis equal to ours; a resumed run re-logging old steps is dropped by W&B with
        # a warning, which is what we want (metrics.jsonl keeps both copies, the plots use the last one)
        self._wandb_run.log(payload, step=step)

    def _start_tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            warnings.warn("tensorboard is not installed; continuing without it (pip install tensorboard)", stacklevel=3)
            return None
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))


# ------------------------------------------------------------------------------------------------- helpers


def _plain(value: Any) -> Any:
    """Tensors / numpy values -> Python floats and lists, so json and every backend accept them."""
    if hasattr(value, "tolist"):  # torch.Tensor, numpy array or scalar
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    return float(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalar view of the metrics: lists become one scalar per entry ("expert_load/layer_1/expert_0")."""
    out: dict[str, float] = {}
    for name, value in metrics.items():
        if _is_number(value) or isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if _is_number(item):
                    out[f"{name}/expert_{i}" if name.startswith("expert_load") else f"{name}/{i}"] = float(item)
    return out
