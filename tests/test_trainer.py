"""The training loop: learning, exact resume (in-process and after a real SIGTERM), NaN handling, freezing, CLI.

Tiny models (2 layers, width 32) on a synthetic data folder; each test takes seconds. The helpers at the top
are shared with test_checkpoint.py and test_distributed.py.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flash_experts.training.config import load_config, save_config

pytestmark = pytest.mark.filterwarnings("ignore:no tokenizer found:UserWarning")

VOCAB = 64


def make_data(folder: Path, *, train_repeats: int = 60, val_repeats: int = 6, seed: int = 0) -> Path:
    """A prepared data folder (train.bin/val.bin/meta.json): one random permutation of the 64 token ids, repeated.

    Each token then determines the next one, so the stream has zero entropy and is quick to memorise.
    """
    folder.mkdir(parents=True, exist_ok=True)
    pattern = np.random.default_rng(seed).permutation(VOCAB).astype(np.uint16)
    splits = {"train": np.tile(pattern, train_repeats), "val": np.tile(pattern, val_repeats)}
    for name, tokens in splits.items():
        tokens.tofile(folder / f"{name}.bin")
    meta = {"vocab_size": VOCAB, "eos_token_id": 0, "dtype": "uint16",
            "splits": {name: {"tokens": len(tokens)} for name, tokens in splits.items()}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def tiny_overrides(data_dir: Path, out_dir: Path, **extra: object) -> list[str]:
    """Overrides for a tiny from-scratch MoE run on `data_dir`; `extra` = {"section.key": value}."""
    settings: dict[str, object] = {
        "run.name": out_dir.name, "run.out_dir": str(out_dir), "run.device": "cpu", "run.quiet": True,
        "run.precision": "fp32", "run.seed": 7,
        "model.base": "scratch", "model.n_layer": 2, "model.n_embd": 32, "model.n_head": 4, "model.n_positions": 64,
        "moe.num_experts": 4, "moe.num_experts_per_tok": 2, "moe.moe_layers": "all",
        "data.dir": str(data_dir), "data.block_size": 16, "data.batch_size": 4, "data.grad_accum": 1,
        "optim.lr": 3e-3, "optim.min_lr": 3e-4, "optim.warmup_steps": 2, "optim.max_steps": 6,
        "eval.interval": 3, "eval.batches": 2, "checkpoint.interval": 3, "checkpoint.keep_last": 5,
        "tracking.wandb": "'off'", "tracking.tensorboard": False, "tracking.log_interval": 1,
    }
    settings.update(extra)
    return [f"{key}={value}" for key, value in settings.items()]


def tiny_config(data_dir: Path, out_dir: Path, **extra: object):
    return load_config(None, tiny_overrides(data_dir, out_dir, **extra))


def metrics(run_dir: Path, key: str) -> dict[int, float]:
    """step -> value of `key` from metrics.jsonl (the last record wins, as after a resume)."""
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            out[record["step"]] = record[key]
    return out


def subprocess_env() -> dict[str, str]:
    """Same thread count as this process (float sums depend on it), the source tree importable."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED="1")
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return make_data(tmp_path / "data")


# ------------------------------------------------------------------------------------------------- learning


def test_overfits_repeated_pattern_reference_entropy_zero(data_dir, tmp_path):
    """Reference: a deterministic 64-token cycle has zero entropy, so a working loop must drive loss toward 0.

    Starts at ~ln(64) = 4.16 nats (uniform); must end below 0.5 on both train and validation.
    """
    from flash_experts.training.trainer import train

    cfg = tiny_config(data_dir, tmp_path / "overfit", **{
        "optim.lr": 3e-2, "optim.min_lr": 3e-3, "optim.warmup_steps": 3, "optim.max_steps": 30,
        "data.batch_size": 8, "data.block_size": 32, "eval.interval": 30, "checkpoint.interval": 0,
        "tracking.log_interval": 5,
    })
    result = train(cfg)
    assert result.steps == 30 and result.tokens == 30 * 8 * 32
    assert result.losses[1] > 3.5  # it really started from scratch
    assert result.losses[30] < 0.5 and result.final_val_loss < 0.5, (result.losses[30], result.final_val_loss)
    assert result.final_val_ppl == pytest.approx(math.exp(result.final_val_loss))
    assert metrics(result.run_dir, "val/loss")[30] == result.final_val_loss
    load = metrics(result.run_dir, "expert_load/layer_0")[30]
    assert len(load) == 4 and sum(load) == pytest.approx(1.0)


def test_finetune_upcycled_local_gpt2_starts_at_the_dense_models_validation_loss(data_dir, tmp_path, tiny_gpt2_dir):
    """Reference: Hugging Face GPT2LMHeadModel's own loss on the same 8 validation windows. Upcycling (no expert
    noise) is exact at step 0, so the trainer's step-0 validation loss must equal the dense model's."""
    from transformers import GPT2LMHeadModel

    from flash_experts.model.loading import load_model
    from flash_experts.training.trainer import train

    cfg = tiny_config(data_dir, tmp_path / "ft", **{
        "model.base": str(tiny_gpt2_dir), "moe.moe_layers": "every_other", "moe.expert_noise": 0.0,
        "model.attention": "sdpa", "optim.max_steps": 2, "eval.interval": 2, "optim.lr": 1e-4, "optim.min_lr": 1e-5,
    })
    result = train(cfg)
    dense = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    val = torch.from_numpy(np.fromfile(data_dir / "val.bin", dtype=np.uint16)[: 8 * 16].astype(np.int64)).view(8, 16)
    with torch.no_grad():
        reference = dense(input_ids=val, labels=val).loss.item()
    assert metrics(result.run_dir, "val/loss")[0] == pytest.approx(reference, abs=1e-5)
    model, _ = load_model(result.checkpoint)
    assert type(model).__name__ == "GPT2MoEForCausalLM" and model.config.num_experts == 4
    assert model.config.moe_layer_indices() == [1, 3]


def test_schedule_matches_hand_computed_values():
    """Reference: the warmup/cosine formulas evaluated by hand."""
    from flash_experts.training.schedule import lr_at

    kw = dict(lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14)
    assert [lr_at(s, **kw) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, **kw) == pytest.approx(1.0)
    assert lr_at(9, **kw) == pytest.approx(0.1 + 0.5 * 0.9)  # half way: cos(pi/2) = 0
    assert lr_at(14, **kw) == pytest.approx(0.1) and lr_at(100, **kw) == pytest.approx(0.1)
    assert lr_at(10, **kw, schedule="constant") == 1.0 and lr_at(1, **kw, schedule="constant") == 0.5
    with pytest.raises(ValueError, match="schedule"):
        lr_at(0, **kw, schedule="linear")


def test_optimizer_groups_exclude_biases_norms_embeddings_by_name():
    """Reference: the HF GPT-2 parameter names; decay exactly on the weight matrices and expert matrices."""
    from flash_experts.model import GPT2MoEConfig, GPT2MoEForCausalLM
    from flash_experts.training.model_setup import optimizer_groups

    model = GPT2MoEForCausalLM(GPT2MoEConfig(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                             num_experts=4, top_k=2, moe_layers=[1]))
    decay, no_decay = optimizer_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decayed == {
        "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight", "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_proj.weight", "transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_proj.weight",
        "transformer.h.1.mlp.router.weight", "transformer.h.1.mlp.experts.w_up", "transformer.h.1.mlp.experts.w_down",
    }
    assert "transformer.wte.weight" in {names[id(p)] for p in no_decay["params"]}
    assert "transformer.h.1.mlp.experts.b_up" in {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_train_moe_only_changes_experts_and_routers(data_dir, tmp_path):
    """Reference: the initial weights; with model.train=moe everything but experts/routers must stay bit-identical."""
    from flash_experts.training.checkpoint import load_model_weights
    from flash_experts.training.model_setup import build_model, is_moe_parameter, seed_everything
    from flash_experts.training.trainer import train

    cfg = tiny_config(data_dir, tmp_path / "moe_only", **{
        "model.train": "moe", "optim.max_steps": 3, "checkpoint.interval": 0, "eval.interval": 100,
        "moe.moe_layers": "[1]",
    })
    seed_everything(cfg.run.seed)  # the trainer seeds the same way before building: same initial weights
    initial, _ = build_model(cfg)
    result = train(cfg)
    trained, _ = build_model(cfg)
    load_model_weights(trained, result.checkpoint)
    before, after = dict(initial.named_parameters()), dict(trained.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(is_moe_parameter(name) for name in changed)
    assert {"transformer.h.1.mlp.router.weight", "transformer.h.1.mlp.experts.w_up"} <= changed


def test_bf16_autocast_on_cpu_keeps_fp32_parameters(data_dir, tmp_path):
    """Reference: torch dtypes; bf16 is an autocast dtype only, the saved master weights stay float32."""
    from safetensors.torch import load_file

    from flash_experts.training.trainer import train

    cfg = tiny_config(data_dir, tmp_path / "bf16", **{"run.precision": "bf16", "optim.max_steps": 2})
    result = train(cfg)
    assert all(math.isfinite(v) for v in result.losses.values())
    weights = load_file(str(Path(result.checkpoint) / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}


# ------------------------------------------------------------------------------------------------- resume


def test_resume_from_checkpoint_equals_uninterrupted_run_exactly(data_dir, tmp_path):
    """Reference: the same run without interruption. Stop at step 3, resume in a fresh trainer, steps 4-6 and
    the final weights must be bit-identical (dropout and router jitter on, so the RNG states matter too)."""
    from safetensors.torch import load_file

    from flash_experts.training.trainer import train

    noisy = {"model.dropout": 0.1, "moe.router_jitter": 0.1, "data.grad_accum": 2}
    full = train(tiny_config(data_dir, tmp_path / "full", **noisy))
    step3 = tmp_path / "full" / "checkpoints" / "step_00000003"
    assert step3.is_dir()
    resumed = train(tiny_config(data_dir, tmp_path / "resumed", **noisy), resume=str(step3))
    assert sorted(resumed.losses) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed.losses[step] == full.losses[step], step
    assert resumed.final_val_loss == full.final_val_loss
    assert resumed.best_val_loss == full.best_val_loss and resumed.tokens == full.tokens
    a = load_file(str(Path(full.checkpoint) / "model.safetensors"))
    b = load_file(str(Path(resumed.checkpoint) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_auto_without_checkpoint_starts_fresh_and_completed_run_is_a_no_op(data_dir, tmp_path):
    """Reference: a fresh run's losses; `--resume auto` on an empty run folder must train exactly like it."""
    from flash_experts.training.trainer import train

    fresh = train(tiny_config(data_dir, tmp_path / "a", **{"optim.max_steps": 2}))
    auto = train(tiny_config(data_dir, tmp_path / "b", **{"optim.max_steps": 2}), resume="auto")
    assert auto.losses == fresh.losses
    again = train(tiny_config(data_dir, tmp_path / "b", **{"optim.max_steps": 2}), resume="auto")
    assert again.losses == {} and again.steps == 2


def test_sigterm_saves_checkpoint_and_resume_continues_the_same_curve(data_dir, tmp_path):
    """Reference: an uninterrupted in-process run. A real `flash-experts pretrain` subprocess gets SIGTERM
    mid-run, must exit 0 with a resume hint and a checkpoint; resuming must reproduce the reference losses."""
    from flash_experts.training.trainer import train

    common = {"optim.schedule": "constant", "optim.warmup_steps": 0, "eval.interval": 1000, "checkpoint.interval": 0}
    config_file = tmp_path / "long.yaml"
    save_config(tiny_config(data_dir, tmp_path / "killed", **common, **{"optim.max_steps": 100000}), config_file)
    process = subprocess.Popen(
        [sys.executable, "-m", "flash_experts.cli.main", "pretrain", "--config", str(config_file)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env(),
    )
    metrics_file = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics_file.is_file() and '"step": 2,' in metrics_file.read_text():
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 0, output
    assert "SIGTERM" in output and "--resume" in output
    stopped_at = int(Path(tmp_path / "killed" / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 2 <= stopped_at < 100
    killed_losses = metrics(tmp_path / "killed", "train/total_loss")

    total = stopped_at + 2
    reference = train(tiny_config(data_dir, tmp_path / "reference", **common, **{"optim.max_steps": total}))
    resumed = train(tiny_config(data_dir, tmp_path / "killed", **common, **{"optim.max_steps": total}), resume="auto")
    assert sorted(resumed.losses) == [stopped_at + 1, stopped_at + 2]
    for step in range(1, stopped_at + 1):  # before the signal (another process: allow float noise)
        assert killed_losses[step] == pytest.approx(reference.losses[step], abs=1e-6)
    for step in resumed.losses:
        assert resumed.losses[step] == pytest.approx(reference.losses[step], abs=1e-6)


def test_sigint_mid_step_finishes_the_step_saves_and_resume_matches_uninterrupted_run(data_dir, tmp_path, monkeypatch):
    """Reference: an uninterrupted in-process run of the same config. A real SIGINT (Ctrl-C) delivered to this
    process during step 2's forward must let step 2 finish, save step_00000002 and return "interrupted";
    resuming must reproduce the reference losses of steps 3-4 exactly."""
    from flash_experts.training import trainer as trainer_module
    from flash_experts.training.checkpoint import find_latest, load_trainer_state

    overrides = {"optim.max_steps": 4, "checkpoint.interval": 0, "eval.interval": 1000}
    reference = trainer_module.train(tiny_config(data_dir, tmp_path / "reference", **overrides))

    real_build = trainer_module.build_model
    forwards = {"train": 0}

    def build_with_ctrl_c(cfg):
        model, tokenizer = real_build(cfg)

        def press_ctrl_c(module, args, output):
            if module.training:
                forwards["train"] += 1
                if forwards["train"] == 2:
                    os.kill(os.getpid(), signal.SIGINT)
            return output

        model.register_forward_hook(press_ctrl_c)
        return model, tokenizer

    monkeypatch.setattr(trainer_module, "build_model", build_with_ctrl_c)
    # Python's default_int_handler, or SIG_IGN when this process was started in the background by a shell
    handler_before = signal.getsignal(signal.SIGINT)
    stopped = trainer_module.train(tiny_config(data_dir, tmp_path / "ctrl_c", **overrides))
    assert (stopped.stopped, stopped.steps, sorted(stopped.losses)) == ("interrupted", 2, [1, 2])
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handler was put back
    latest = find_latest(tmp_path / "ctrl_c")
    assert latest.name == "step_00000002" and load_trainer_state(latest)["step"] == 2

    monkeypatch.setattr(trainer_module, "build_model", real_build)
    resumed = trainer_module.train(tiny_config(data_dir, tmp_path / "ctrl_c", **overrides), resume="auto")
    assert (resumed.stopped, sorted(resumed.losses)) == ("completed", [3, 4])
    assert {**stopped.losses, **resumed.losses} == reference.losses


# ------------------------------------------------------------------------------------------------- failures


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    """Reference: a loss forced to NaN at training step 5; checkpoints every 2 steps -> step 4 must survive."""
    from flash_experts.training import trainer as trainer_module
    from flash_experts.training.checkpoint import find_latest, load_model_weights, load_trainer_state

    real_build = trainer_module.build_model
    calls = {"train": 0}

    def poisoned_build(cfg):
        model, tokenizer = real_build(cfg)

        def poison(module, args, kwargs, output):
            if module.training:
                calls["train"] += 1
                if calls["train"] == 5:
                    output.loss = output.loss * float("nan")
            return output

        model.register_forward_hook(poison, with_kwargs=True)
        return model, tokenizer

    monkeypatch.setattr(trainer_module, "build_model", poisoned_build)
    cfg = tiny_config(data_dir, tmp_path / "nan", **{"optim.max_steps": 8, "checkpoint.interval": 2})
    with pytest.raises(trainer_module.TrainingDiverged, match=r"at step 5: the loss is nan.*step_00000004"):
        trainer_module.train(cfg)
    latest = find_latest(tmp_path / "nan")
    assert latest.name == "step_00000004"
    assert not (tmp_path / "nan" / "checkpoints" / "step_00000005").exists()
    assert load_trainer_state(latest)["step"] == 4
    model, _ = real_build(cfg)
    load_model_weights(model, latest)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_early_stopping_and_best_checkpoint_follow_scripted_validation_losses(data_dir, tmp_path, monkeypatch):
    """Reference: a scripted sequence of validation losses (step 0 is the baseline and never "best").

    Evaluating every step with patience 2: best at step 2 (2.0), no improvement at steps 3 and 4 -> stop at 4.
    """
    from flash_experts.training import trainer as trainer_module
    from flash_experts.training.checkpoint import find_latest, load_trainer_state

    scripted = iter([9.0, 3.0, 2.0, 2.5, 2.0, 1.0, 1.0])
    monkeypatch.setattr(trainer_module.Trainer, "evaluate", lambda self: next(scripted))
    cfg = tiny_config(data_dir, tmp_path / "early", **{
        "optim.max_steps": 6, "eval.interval": 1, "eval.early_stopping_patience": 2, "checkpoint.interval": 0,
    })
    result = trainer_module.train(cfg)
    assert (result.stopped, result.steps, result.best_step, result.best_val_loss) == ("early_stopping", 4, 2, 2.0)
    assert result.final_val_loss == 2.0 and sorted(result.losses) == [1, 2, 3, 4]
    assert load_trainer_state(tmp_path / "early" / "best")["step"] == 2
    assert load_trainer_state(find_latest(tmp_path / "early"))["step"] == 4  # a resumable checkpoint at the stop
    assert metrics(tmp_path / "early", "val/loss") == {0: 9.0, 1: 3.0, 2: 2.0, 3: 2.5, 4: 2.0}


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_pretrain_runs_and_refuses_a_pretrained_base(data_dir, tmp_path, capsys):
    """Reference: the CLI contract (exit 0 + summary; exit 2 + one-line error for a non-scratch base)."""
    from flash_experts.cli.main import main

    config_file = tmp_path / "tiny.yaml"
    save_config(tiny_config(data_dir, tmp_path / "cli", **{"optim.max_steps": 2}), config_file)
    assert main(["pretrain", "--config", str(config_file), "optim.lr=1e-3"]) == 0
    out = capsys.readouterr().out
    assert "completed: 2 steps" in out and "run folder" in out
    assert (tmp_path / "cli" / "checkpoints" / "step_00000002" / "trainer_state.pt").is_file()
    assert main(["pretrain", "--config", str(config_file), "model.base=gpt2"]) == 2
    assert "from scratch" in capsys.readouterr().err
    # `--resume` followed by an override: the override is not mistaken for a checkpoint path
    assert main(["pretrain", "--config", str(config_file), "--resume", "optim.max_steps=3"]) == 0
    assert "completed: 3 steps" in capsys.readouterr().out


def test_a_second_run_into_a_folder_in_use_is_refused_and_the_first_is_untouched(data_dir, tmp_path, capsys):
    """Reference: the rule that saved work is never lost. A real `flash-experts pretrain` subprocess is
    writing the run folder; a second run started into it (resume or not) gets one error line at start and
    writes nothing (before: both appended to metrics.jsonl and the second died on a missing temporary file).
    Once the first has ended, its lock is gone and the folder resumes as usual."""
    from flash_experts.cli.main import main
    from flash_experts.errors import UserError
    from flash_experts.training.trainer import train

    common = {"optim.schedule": "constant", "optim.warmup_steps": 0, "eval.interval": 1000, "checkpoint.interval": 0}
    config_file = tmp_path / "long.yaml"
    run = tmp_path / "busy"
    save_config(tiny_config(data_dir, run, **common, **{"optim.max_steps": 100000}), config_file)
    first = subprocess.Popen([sys.executable, "-m", "flash_experts.cli.main", "pretrain", "--config", str(config_file)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())
    metrics_file = run / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if metrics_file.is_file() and '"step": 2,' in metrics_file.read_text():
                break
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended before the test could start the second"
        for extra in ([], ["--resume"]):
            assert main(["pretrain", "--config", str(config_file), "optim.max_steps=3", *extra]) == 2
            err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
            assert len(err) == 1 and f"{run} is in use by another run (process {first.pid})" in err[0], err
        with pytest.raises(UserError, match="in use by another run"):
            train(tiny_config(data_dir, run, **common))
        lines = metrics_file.read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == sorted(json.loads(line)["step"] for line in lines)
    finally:
        first.send_signal(signal.SIGTERM)
        output, _ = first.communicate(timeout=120)
    assert first.returncode == 0 and "--resume" in output, output  # the first run saved and ended cleanly
    steps = [json.loads(line)["step"] for line in metrics_file.read_text().splitlines()]
    assert steps == sorted(steps), "metrics.jsonl holds one run's records, in order"
    stopped_at = int((run / "checkpoints" / "latest").read_text().strip().split("_")[1])
    resumed = train(tiny_config(data_dir, run, **common, **{"optim.max_steps": stopped_at + 1}), resume="auto")
    assert resumed.steps == stopped_at + 1


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path):
    """Reference: the demo's and the examples' "already holds a run" check — a failed start (here: no data)
    must not leave a folder that looks like saved work."""
    from flash_experts.errors import UserError
    from flash_experts.training.trainer import train

    with pytest.raises(UserError):
        train(tiny_config(tmp_path / "no-data", tmp_path / "never"))
    assert not (tmp_path / "never").exists()
