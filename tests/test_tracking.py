"""Tracker: metrics.jsonl, offline W&B and TensorBoard, checked by reading the files back with independent
readers (json, tensorboard's EventAccumulator, the raw .wandb bytes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from flash_experts.training.tracking import Tracker, resolve_wandb_mode


@pytest.fixture
def wandb_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline, silent W&B whose every directory lives in tmp_path."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))
    return tmp_path


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_jsonl_is_written_flushed_and_appended(tmp_path: Path):
    """Reference: json.loads of each line equals what was logged; a second tracker appends (resume)."""
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, {"x": 1}, wandb_mode="off", tensorboard=False)
    tracker.log(1, {"train/loss": torch.tensor(2.5), "expert_load/layer_1": torch.tensor([0.25, 0.75])})
    # not closed yet: a crash now must still leave the record on disk
    first = _read_jsonl(run_dir / "metrics.jsonl")
    assert [{k: v for k, v in r.items() if k != "time"} for r in first] == [
        {"step": 1, "train/loss": 2.5, "expert_load/layer_1": [0.25, 0.75]}
    ]
    tracker.log(2, {"val/loss": 2.25})
    tracker.close()
    resumed = Tracker(run_dir, {"x": 1}, wandb_mode="off", tensorboard=False)
    resumed.log(3, {"train/loss": 2.0})
    resumed.close()
    records = _read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["val/loss"] == 2.25 and records[2]["train/loss"] == 2.0
    assert all(isinstance(r["time"], float) for r in records)


def test_summary_merges_into_summary_json(tmp_path: Path):
    """Reference: a dict merge written by hand."""
    with Tracker(tmp_path, None, wandb_mode="off", tensorboard=False) as tracker:
        tracker.summary({"best/val_loss": 2.0, "steps": 10})
        tracker.summary({"best/val_loss": 1.5})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"best/val_loss": 1.5, "steps": 10}


def test_non_rank0_tracker_does_nothing(tmp_path: Path):
    """Reference: an empty directory listing."""
    tracker = Tracker(tmp_path / "run", {"x": 1}, wandb_mode="offline", tensorboard=True, rank0=False)
    tracker.log(1, {"train/loss": 1.0})
    tracker.summary({"a": 1})
    tracker.close()
    assert not (tmp_path / "run").exists()


def test_tensorboard_scalars_read_back(tmp_path: Path):
    """Reference: tensorboard's own EventAccumulator reading the event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with Tracker(tmp_path, None, wandb_mode="off", tensorboard=True) as tracker:
        tracker.log(5, {"train/loss": 3.25, "expert_load/layer_1": [0.125, 0.875]})
        tracker.log(10, {"train/loss": 2.75})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(5, pytest.approx(3.25)), (10, pytest.approx(2.75))]
    assert [(e.step, e.value) for e in events.Scalars("expert_load/layer_1/expert_1")] == [(5, pytest.approx(0.875))]


def test_offline_wandb_run_and_resume_keep_one_id(wandb_env: Path):
    """Reference: the offline-run-* folders W&B writes, and the raw bytes of its .wandb log."""
    run_dir = wandb_env / "run"
    tracker = Tracker(run_dir, {"optim": {"lr": 1e-4}}, wandb_mode="auto", wandb_project="tests", tensorboard=False)
    assert tracker.wandb_mode == "offline"  # auto without WANDB_API_KEY
    tracker.log(1, {"train/loss": 1.234567, "expert_load/layer_0": [0.5, 0.5]})
    tracker.summary({"best/val_loss": 7.654321})
    tracker.close()
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(run_id)
    expected = (b"train/loss", b"1.234567", b"7.654321")
    log_bytes = _wait_for_bytes(next(runs[0].glob("*.wandb")), expected)
    assert all(token in log_bytes for token in expected)

    resumed = Tracker(run_dir, {"optim": {"lr": 1e-4}}, wandb_mode="offline", wandb_project="tests", tensorboard=False)
    resumed.log(2, {"train/loss": 1.0})
    resumed.close()
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) >= 1 and all(r.name.endswith(run_id) for r in runs)
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id


def _wait_for_bytes(path: Path, tokens: tuple[bytes, ...], timeout_s: float = 60.0) -> bytes:
    """wandb-core may still be writing the offline log after finish() returns (seen on a loaded machine)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        data = path.read_bytes()
        if all(token in data for token in tokens) or time.monotonic() > deadline:
            return data
        time.sleep(0.2)


def test_off_mode_imports_neither_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Reference: every import statement executed, recorded through builtins.__import__."""
    import builtins

    requested: list[str] = []
    real_import = builtins.__import__

    def recording_import(name, *args, **kwargs):
        requested.append(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", recording_import)
    tracker = Tracker(tmp_path, {}, wandb_mode="off", tensorboard=False)
    tracker.log(1, {"a": 1.0, "expert_load/layer_0": [0.5, 0.5]})
    tracker.summary({"b": 2.0})
    tracker.close()
    monkeypatch.undo()
    assert not [n for n in requested if n.startswith(("wandb", "torch.utils.tensorboard", "tensorboard"))]
    assert (tmp_path / "metrics.jsonl").is_file()


def test_missing_packages_warn_and_continue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Reference: Python's import machinery (a None entry in sys.modules makes `import` fail)."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.warns(UserWarning) as caught:
        tracker = Tracker(tmp_path, {}, wandb_mode="offline", tensorboard=True)
    messages = " ".join(str(w.message) for w in caught)
    assert "wandb is not installed" in messages and "tensorboard is not installed" in messages
    tracker.log(1, {"train/loss": 1.0})
    tracker.close()
    assert _read_jsonl(tmp_path / "metrics.jsonl")[0]["train/loss"] == 1.0


def test_resolve_wandb_mode(monkeypatch: pytest.MonkeyPatch):
    """Reference: the documented rule (auto = online with a key, else offline; WANDB_MODE=disabled wins)."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DISABLED", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("online") == "off"
    with pytest.raises(ValueError, match="tracking.wandb"):
        resolve_wandb_mode("sometimes")
