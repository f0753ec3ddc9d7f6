"""Data parallelism: the global batch does not depend on the process count; torchrun (gloo, CPU) reproduces
a single-process run, and a run resumes on a different number of processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from flash_experts.training.config import save_config
from flash_experts.training.data import EvalBatches, TrainBatches
from test_trainer import make_data, metrics, subprocess_env, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:no tokenizer found:UserWarning")


def test_global_batch_is_the_same_for_one_or_two_processes():
    """Reference: windows sliced by hand (numpy) at the step's global offsets, in global-batch order."""
    tokens = np.arange(1000, dtype=np.uint16)
    one = TrainBatches(tokens, block_size=8, batch_size=3, grad_accum=2, seed=5)
    two = [TrainBatches(tokens, block_size=8, batch_size=3, grad_accum=1, seed=5, rank=r, world_size=2) for r in (0, 1)]
    for step in (0, 1, 17):
        offsets = one.global_offsets(step)
        assert len(offsets) == 6 and np.array_equal(offsets, two[1].global_offsets(step))
        by_hand = np.stack([tokens[o : o + 8] for o in offsets]).astype(np.int64)
        single = np.concatenate([one.micro_batch(step, m).numpy() for m in (0, 1)])
        sharded = np.concatenate([two[r].micro_batch(step, 0).numpy() for r in (0, 1)])
        assert np.array_equal(single, by_hand) and np.array_equal(sharded, by_hand)
    assert not np.array_equal(one.global_offsets(0), one.global_offsets(1))  # steps see different data
    assert np.array_equal(one.global_offsets(3), TrainBatches(tokens, block_size=8, batch_size=3, grad_accum=2, seed=5).global_offsets(3))


def test_eval_windows_are_fixed_and_split_across_ranks():
    """Reference: the first N non-overlapping windows of the validation stream, each seen by exactly one rank."""
    tokens = np.arange(100, dtype=np.uint16)
    whole = np.concatenate(list(EvalBatches(tokens, block_size=10, batch_size=2, max_windows=7)))
    assert np.array_equal(whole, np.arange(70).reshape(7, 10))
    shards = [np.concatenate(list(EvalBatches(tokens, block_size=10, batch_size=2, max_windows=7, rank=r, world_size=2)))
              for r in (0, 1)]
    assert sorted(map(tuple, np.concatenate(shards).tolist())) == sorted(map(tuple, whole.tolist()))
    short = list(EvalBatches(np.arange(5, dtype=np.uint16), block_size=10, batch_size=2, max_windows=3))
    assert [b.shape for b in short] == [(1, 5)]  # a tiny val split gives one shorter window


def torchrun(config_file: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "flash_experts.cli.main", "pretrain", "--config", str(config_file), *extra,
    ]
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


def _skip_if_no_gloo() -> None:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available here")


def test_torchrun_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """Reference: a single-process run with grad_accum=2; 2 torchrun processes x grad_accum=1 see the same
    8 windows per step, so per-step losses and validation losses must agree to float precision."""
    from flash_experts.training.trainer import train

    _skip_if_no_gloo()
    data = make_data(tmp_path / "data")
    single = train(tiny_config(data, tmp_path / "one", **{"data.grad_accum": 2, "optim.max_steps": 4, "eval.interval": 2}))
    config_file = tmp_path / "two.yaml"
    save_config(tiny_config(data, tmp_path / "two", **{"data.grad_accum": 1, "optim.max_steps": 4, "eval.interval": 2}),
                config_file)
    run = torchrun(config_file)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 process(es)" in run.stdout
    losses = metrics(tmp_path / "two", "train/total_loss")
    assert sorted(losses) == [1, 2, 3, 4]
    # rank 0 alone logs and saves: one record per step (not one per rank), one set of checkpoints
    records = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in records if "train/total_loss" in r) == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == [
        "latest", "step_00000003", "step_00000004"]
    assert run.stdout.count("completed: 4 steps") == 1
    for step, loss in single.losses.items():
        assert abs(losses[step] - loss) < 1e-5, (step, losses[step], loss)
    val_one, val_two = metrics(tmp_path / "one", "val/loss"), metrics(tmp_path / "two", "val/loss")
    assert sorted(val_two) == [0, 2, 4]
    for step in val_one:
        assert abs(val_one[step] - val_two[step]) < 1e-5
    assert metrics(tmp_path / "two", "train/tokens")[4] == single.tokens


def test_resume_on_two_processes_continues_a_single_process_run(tmp_path):
    """Reference: the uninterrupted single-process run; its step-3 checkpoint resumed by 2 torchrun
    processes (same global batch) must continue the same loss curve."""
    from flash_experts.training.trainer import train

    _skip_if_no_gloo()
    data = make_data(tmp_path / "data")
    single = train(tiny_config(data, tmp_path / "one", **{"data.grad_accum": 2, "optim.max_steps": 6}))
    config_file = tmp_path / "two.yaml"
    save_config(tiny_config(data, tmp_path / "two", **{"data.grad_accum": 1, "optim.max_steps": 6}), config_file)
    run = torchrun(config_file, "--resume", str(tmp_path / "one" / "checkpoints" / "step_00000003"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    losses = metrics(tmp_path / "two", "train/total_loss")
    assert sorted(losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert abs(losses[step] - single.losses[step]) < 1e-5, (step, losses[step], single.losses[step])


def test_fsdp_two_processes_follow_the_single_process_curve_and_resume_on_one(tmp_path):
    """Reference: the single-process run with grad_accum=2 (as for DDP above). FSDP2 over 2 gloo processes
    (run.parallel=fsdp, fp32) shards weights, gradients and AdamW's state, and must follow the same per-step
    losses; its step-3 checkpoint holds the whole weights plus the optimizer sharded by torch.distributed.checkpoint
    (one file per rank), and one process resuming it must continue the same curve."""
    from flash_experts.training.checkpoint import OPTIMIZER_DIR, load_trainer_state
    from flash_experts.training.trainer import train

    _skip_if_no_gloo()
    data = make_data(tmp_path / "data")
    single = train(tiny_config(data, tmp_path / "one", **{"data.grad_accum": 2, "optim.max_steps": 5}))
    config_file = tmp_path / "fsdp.yaml"
    save_config(tiny_config(data, tmp_path / "fsdp", **{"data.grad_accum": 1, "optim.max_steps": 5,
                                                        "run.parallel": "fsdp"}), config_file)
    run = torchrun(config_file)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 process(es)" in run.stdout
    losses = metrics(tmp_path / "fsdp", "train/total_loss")
    assert sorted(losses) == [1, 2, 3, 4, 5]
    for step, loss in single.losses.items():
        assert abs(losses[step] - loss) < 1e-5, (step, losses[step], loss)
    val_one, val_fsdp = metrics(tmp_path / "one", "val/loss"), metrics(tmp_path / "fsdp", "val/loss")
    for step in val_one:
        assert abs(val_one[step] - val_fsdp[step]) < 1e-5

    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step_00000003"
    assert load_trainer_state(checkpoint)["optimizer"] is None
    assert len(list((checkpoint / OPTIMIZER_DIR).glob("*.distcp"))) == 2  # one shard file per rank
    resumed = train(tiny_config(data, tmp_path / "resumed", **{"data.grad_accum": 2, "optim.max_steps": 5,
                                                               "run.parallel": "fsdp"}), resume=str(checkpoint))
    assert sorted(resumed.losses) == [4, 5]
    for step in (4, 5):
        assert abs(resumed.losses[step] - single.losses[step]) < 1e-5, (step, resumed.losses[step], single.losses[step])
