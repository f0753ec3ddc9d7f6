"""Training with expert parallelism (run.expert_parallel=N under torchrun, gloo on CPU) against one process.

References: the single-process run of the same global batch (grad_accum=2 in one process = 2 processes x 1
micro-batch, as tests/test_distributed.py shows for plain data parallelism): its per-step losses, gradient
norms and validation losses, and its best checkpoint's logits; transformers' `from_pretrained` for the saved
layout. A checkpoint written at N=2 resumes at N=1 and at N=4 on the uninterrupted curve.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from flash_experts.errors import ConfigError
from flash_experts.training.config import save_config
from flash_experts.training.expert_parallel import check_expert_parallel_run
from flash_experts.training.processes import ProcessLayout
from test_trainer import make_data, metrics, subprocess_env, tiny_config

pytestmark = [pytest.mark.filterwarnings("ignore:no tokenizer found:UserWarning"),
              pytest.mark.filterwarnings("ignore:resuming with a different seed or global batch:UserWarning")]

STEPS = {"optim.max_steps": 20, "eval.interval": 10, "checkpoint.interval": 10}
TOLERANCE = 1e-5  # fp32, relative: measured 1.5e-7 (the reductions' order differs)


def torchrun(config_file: Path, processes: int, *extra: str, wait: bool = True, verb: str = "pretrain",
             log_dir: Path | None = None):
    """`log_dir`: each process's stderr in a file of its own (torchrun --redirects), not interleaved."""
    logs = ["--log-dir", str(log_dir), "--redirects", "2"] if log_dir is not None else []
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *logs,
               "-m", "flash_experts.cli.main", verb, "--config", str(config_file), *extra]
    env = dict(subprocess_env(), OMP_NUM_THREADS="1")
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(autouse=True)
def _gloo() -> None:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available here")


def assert_same_curve(run_dir: Path, reference_dir: Path, steps: list[int]) -> None:
    for key in ("train/total_loss", "train/grad_norm", "train/aux_loss"):
        ours, theirs = metrics(run_dir, key), metrics(reference_dir, key)
        assert sorted(ours) == steps, key
        for step in steps:
            assert ours[step] == pytest.approx(theirs[step], rel=TOLERANCE), (key, step)


def test_two_processes_train_the_one_process_model_and_their_checkpoints_load_at_any_degree(tmp_path):
    from transformers import AutoModelForCausalLM

    from flash_experts.training.checkpoint import load_trainer_state
    from flash_experts.training.trainer import train

    data = make_data(tmp_path / "data")
    single = train(tiny_config(data, tmp_path / "one", **{"data.grad_accum": 2, **STEPS}))
    config_file = tmp_path / "ep2.yaml"
    save_config(tiny_config(data, tmp_path / "ep2", **{"run.expert_parallel": 2, **STEPS}), config_file)
    run = torchrun(config_file, 2)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "2 process(es)" in run.stdout
    assert_same_curve(tmp_path / "ep2", tmp_path / "one", list(range(1, 21)))
    val_one, val_two = metrics(tmp_path / "one", "val/loss"), metrics(tmp_path / "ep2", "val/loss")
    assert sorted(val_two) == [0, 10, 20]
    for step in val_one:
        assert val_two[step] == pytest.approx(val_one[step], rel=TOLERANCE)

    # The best checkpoint holds every expert whole, and transformers loads it as one process would.
    best = AutoModelForCausalLM.from_pretrained(tmp_path / "ep2" / "best").eval()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / "best").eval()
    assert best.transformer.h[0].mlp.experts.w_up.shape[0] == 4
    ids = torch.arange(1, 17).reshape(1, 16)
    with torch.no_grad():
        torch.testing.assert_close(best(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    # ... and the optimizer's moments are in one process's layout too (4 experts, not 2)
    state = load_trainer_state(tmp_path / "ep2" / "checkpoints" / "step_00000010")
    assert state["expert_parallel"] == 2
    shapes = {tuple(s["exp_avg"].shape) for s in state["optimizer"]["state"].values()}
    assert (4, 32, 128) in shapes and (2, 32, 128) not in shapes

    # N=2 -> 1: the step-10 checkpoint resumed by one process continues the uninterrupted curve.
    checkpoint = str(tmp_path / "ep2" / "checkpoints" / "step_00000010")
    resumed = train(tiny_config(data, tmp_path / "back_to_one", **{"data.grad_accum": 2, **STEPS}), resume=checkpoint)
    assert sorted(resumed.losses) == list(range(11, 21))
    for step, loss in resumed.losses.items():
        assert loss == pytest.approx(single.losses[step], rel=TOLERANCE), step
    # N=2 -> 4: four processes of 2 windows each (the same global batch of 8), each holding one expert. The
    # balancing loss is taken per micro-batch of 2 windows now, so the reference resumes one process with those.
    train(tiny_config(data, tmp_path / "one_by_2", **{"data.batch_size": 2, "data.grad_accum": 4, **STEPS}),
          resume=checkpoint)
    config_file = tmp_path / "ep4.yaml"
    save_config(tiny_config(data, tmp_path / "ep4", **{"run.expert_parallel": 4, "data.batch_size": 2, **STEPS}),
                config_file)
    run = torchrun(config_file, 4, "--resume", checkpoint)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert_same_curve(tmp_path / "ep4", tmp_path / "one_by_2", list(range(11, 21)))


def test_finetune_of_an_upcycled_gpt2_matches_data_parallelism(tmp_path, tiny_gpt2_dir):
    """The acceptance run: `torchrun --nproc_per_node=2 ... finetune --config C run.expert_parallel=2` against
    the same command with run.parallel=ddp (every expert on both processes). Reference: the DDP run's
    validation losses (fp32, within 1e-4 relative as the issue asks; measured far closer) and its best weights."""
    from transformers import AutoModelForCausalLM

    data = make_data(tmp_path / "data")
    upcycled = {"model.base": str(tiny_gpt2_dir), "moe.expert_noise": 0.01, "moe.moe_layers": "every_other",
                "optim.max_steps": 8, "eval.interval": 4, "checkpoint.interval": 4}
    losses = {}
    for name, extra in (("ddp", {"run.parallel": "ddp"}), ("ep2", {"run.expert_parallel": 2})):
        config_file = tmp_path / f"{name}.yaml"
        save_config(tiny_config(data, tmp_path / name, **upcycled, **extra), config_file)
        run = torchrun(config_file, 2, verb="finetune")
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        losses[name] = metrics(tmp_path / name, "val/loss")
    assert sorted(losses["ep2"]) == [0, 4, 8]
    for step, loss in losses["ddp"].items():
        assert losses["ep2"][step] == pytest.approx(loss, rel=1e-4), step
    best = AutoModelForCausalLM.from_pretrained(tmp_path / "ep2" / "best").state_dict()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp" / "best").state_dict()
    assert best.keys() == reference.keys()
    # atol 1e-4: attention's key bias has a gradient of zero but for rounding (softmax ignores a shift), which
    # Adam's normalised step turns into moves of up to lr; every other weight agrees to ~1e-6.
    for key, tensor in reference.items():
        torch.testing.assert_close(best[key], tensor, rtol=1e-4, atol=1e-4)  # every expert, whole


@pytest.mark.parametrize(("overrides", "words"), [
    ({"run.expert_parallel": 4}, "number of processes divisible by 4; there are 2"),
    ({"moe": "null"}, "needs a Mixture-of-Experts model"),
])
def test_bad_settings_are_one_line_on_every_process(tmp_path, overrides, words):
    """Reference: each process's own stderr (torchrun writes one file per process: written to one pipe, the two
    lines once ran together). Both refuse before any collective: no hang, no traceback of ours."""
    data = make_data(tmp_path / "data")
    config_file = tmp_path / "bad.yaml"
    save_config(tiny_config(data, tmp_path / "bad", **{"run.expert_parallel": 2, **overrides}), config_file)
    started = time.perf_counter()
    run = torchrun(config_file, 2, log_dir=tmp_path / "logs")
    assert run.returncode != 0
    stderrs = sorted((tmp_path / "logs").rglob("stderr.log"))
    assert len(stderrs) == 2, run.stderr[-3000:]  # one file per process: their lines cannot interleave
    for stderr in stderrs:
        errors = [line for line in stderr.read_text().splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and words in errors[0], stderr.read_text()[-3000:]
        assert "Traceback" not in stderr.read_text()  # the one line, no traceback
    # no frame of ours either in torchrun's own summary of the failed processes
    assert not any(line.strip().startswith("File") and "flash_experts" in line for line in run.stderr.splitlines())
    assert time.perf_counter() - started < 120


@pytest.mark.parametrize(("overrides", "words"), [
    ({"run.expert_parallel": 3}, "run.expert_parallel must divide moe.num_experts=4"),
    ({"run.expert_parallel": 0}, "run.expert_parallel must be >= 1"),
    ({"moe.num_experts_per_tok": 5}, "num_experts_per_tok"),
])
def test_the_config_refuses_what_no_process_count_can_run(tmp_path, overrides, words):
    with pytest.raises(ConfigError, match=words):
        tiny_config(tmp_path, tmp_path / "run", **overrides)


def test_refusals_known_to_one_process():
    """check_expert_parallel_run: the checks every process makes alone, before any collective."""
    from transformers import GPT2LMHeadModel

    from conftest import tiny_gpt2_config
    from flash_experts.model import upcycle

    dense = GPT2LMHeadModel(tiny_gpt2_config())
    moe = upcycle(dense, num_experts=4, top_k=2)
    check_expert_parallel_run(moe, 1, 1, "fsdp")  # degree 1: nothing to check
    check_expert_parallel_run(moe, 2, 4, "ddp")
    with pytest.raises(ConfigError, match="composes with run.parallel=ddp"):
        check_expert_parallel_run(moe, 2, 2, "fsdp")
    with pytest.raises(ConfigError, match="divisible by 2; there are 3"):
        check_expert_parallel_run(moe, 2, 3, "ddp")
    with pytest.raises(ConfigError, match="needs a number of experts divisible by 8"):
        check_expert_parallel_run(moe, 8, 8, "ddp")
    with pytest.raises(ConfigError, match="no MoE layer"):
        check_expert_parallel_run(dense, 2, 2, "ddp")


def test_process_groups_lay_out_blocks_and_replicas():
    """Reference: torchtitan's layout written out for 8 processes at degree 4 and 2."""
    def groups(world: int, degree: int) -> tuple[list[list[int]], list[list[int]]]:
        layout = ProcessLayout(0, world, degree)
        return layout.expert_groups(), layout.replica_groups()

    assert groups(8, 4) == ([[0, 1, 2, 3], [4, 5, 6, 7]], [[0, 4], [1, 5], [2, 6], [3, 7]])
    assert groups(4, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    assert groups(2, 2) == ([[0, 1]], [[0], [1]])


@pytest.mark.skipif(sys.platform != "linux", reason="finds the workers through /proc")
def test_a_killed_process_leaves_a_loadable_checkpoint_and_the_other_exits(tmp_path):
    """SIGKILL one of two processes mid-run: the other's next exchange fails (gloo sees the closed connection),
    it exits with one error line naming the last checkpoint, and that checkpoint loads."""
    from transformers import AutoModelForCausalLM

    data = make_data(tmp_path / "data")
    config_file = tmp_path / "long.yaml"
    save_config(tiny_config(data, tmp_path / "long", **{"run.expert_parallel": 2, "optim.max_steps": 100_000,
                                                          "eval.interval": 1000, "checkpoint.interval": 20}),
                config_file)
    launcher = torchrun(config_file, 2, wait=False)
    try:
        checkpoints = tmp_path / "long" / "checkpoints"
        deadline = time.monotonic() + 120
        while not (checkpoints / "latest").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert (checkpoints / "latest").exists(), "no checkpoint within 2 minutes"
        workers = [int(p) for p in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=120)  # not forever: within the collective's failure
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    lost = [line for line in stderr.splitlines() if line.startswith("error: another process")]
    assert len(lost) <= 1 and ("checkpoint" in lost[0] if lost else True), stderr[-3000:]
    last = checkpoints / (checkpoints / "latest").read_text().strip()
    model = AutoModelForCausalLM.from_pretrained(last)
    assert model.transformer.h[0].mlp.experts.w_up.shape[0] == 4


RACE = ["race", "--quick", "--steps", "20", "--eval-every", "10", "--dtype", "fp32", "--aux-loss", "0"]


def test_the_race_with_its_experts_split_over_two_processes_is_the_one_process_race(tmp_path):
    """Reference: the one-process race (the same seed, the same batches). Two processes each take half of every
    batch and split the MoE twin's experts; the balancing loss is off (`--aux-loss 0`): it is taken per process's
    tokens, so with it on the two runs train slightly different objectives. Every validation and test figure
    and the domain atlas agree."""
    import json

    env = dict(subprocess_env(), OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "flash_experts.cli.main", *RACE, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                          "flash_experts.cli.main", *RACE, "--expert-parallel", "2", "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert two.stdout.count("[4/4] the result") == 1  # one process prints
    ours, reference = (json.loads((tmp_path / name / "race.json").read_text()) for name in ("two", "one"))
    assert [e["step"] for e in ours["evaluations"]] == [0, 10, 20]
    for mine, theirs in zip(ours["evaluations"], reference["evaluations"]):
        for twin in ("dense", "moe"):
            for domain, loss in theirs["val"][twin].items():
                assert mine["val"][twin][domain] == pytest.approx(loss, rel=1e-5), (mine["step"], twin, domain)
    for twin in ("dense", "moe"):
        for domain, loss in reference["test"][twin].items():
            assert ours["test"][twin][domain] == pytest.approx(loss, rel=1e-5)
    assert ours["parameters"] == reference["parameters"]  # counted on whole models
    assert ours["domain_atlas"]["layers"] == reference["domain_atlas"]["layers"]


def test_the_race_refuses_expert_parallelism_it_cannot_run(tmp_path):
    from flash_experts.contest.race import QUICK, RaceSettings
    from flash_experts.training.processes import ProcessLayout

    alone = subprocess.run([sys.executable, "-m", "flash_experts.cli.main", *RACE, "--expert-parallel", "2", "--out",
                            str(tmp_path / "alone")], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert alone.returncode == 2 and alone.stderr.strip().splitlines() == [
        "error: --expert-parallel 2 splits the experts over processes: run the race under torchrun with a multiple "
        "of 2 processes"]
    settings = RaceSettings(**QUICK)  # 4 experts, a batch of 12 windows
    with pytest.raises(ConfigError, match="divisible by 3"):
        ProcessLayout(0, 3, 3).check(settings.num_experts, settings.batch_size)
    with pytest.raises(ConfigError, match="number of processes divisible by 2; there are 3"):
        ProcessLayout(0, 3, 2).check(settings.num_experts, settings.batch_size)
    with pytest.raises(ConfigError, match="does not split over 5 processes"):
        ProcessLayout(0, 5, 1).check(settings.num_experts, settings.batch_size)
    ProcessLayout(1, 4, 2).check(settings.num_experts, settings.batch_size)
