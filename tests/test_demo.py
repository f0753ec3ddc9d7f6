"""The main job (`flash-experts demo`): the dense model and its upcycled MoE at equal compute, side by side.

References: the upcycling contract (exact copies: at step 0 the MoE's validation perplexity is the dense
model's, measured on the dense model), the equal-compute plan (steps = budget / the measured step time of
each model), the CLI contract (one `error:` line, exit 2, nothing written for bad arguments) and the rule
that saved work is never lost. The end-to-end run uses a tiny random GPT-2 with the real GPT-2 tokenizer
(offline BPE files) on the real MTG names; the real SmolLM2 base runs behind -m slow.
"""

from __future__ import annotations

import json
import re

import pytest

from flash_experts.cli.main import main


def summary_row(out: str, label: str) -> list[str]:
    line = next(line for line in out.splitlines() if line.strip().startswith(label))
    return re.split(r"\s{2,}", line.strip())[1:]


def test_demo_trains_both_at_equal_compute_and_sets_them_side_by_side(tiny_base, tmp_path, capsys):
    out_dir = tmp_path / "demo"
    # fp32: exactness at step 0 is an fp32 statement (under bf16 autocast the dense MLP's one product and the
    # experts' per-expert products round differently); `auto` would pick bf16 on CPUs with native bf16.
    argv = ["demo", "--base", str(tiny_base), "--out", str(out_dir), "--budget", "1", "--names", "20",
            "--block-size", "32", "--wandb", "off", "--dtype", "fp32"]
    assert main(argv) == 0
    out = capsys.readouterr().out

    plan = json.loads((out_dir / "plan.json").read_text())
    for name in ("dense", "moe"):
        assert plan["steps"][name] == max(1, int(1 / plan["seconds_per_step"][name]))
    dense_steps, moe_steps = (int(cell.split()[0]) for cell in summary_row(out, "steps (cost of a step, timed)"))
    assert (dense_steps, moe_steps) == (plan["steps"]["dense"], plan["steps"]["moe"])
    # The steps' own time is part of each run's wall time (which adds evaluations, checkpoints, start-up).
    step_time = [float(cell.removesuffix(" s")) for cell in summary_row(out, "time in training steps")]
    wall_time = [float(cell.removesuffix(" min")) * 60 for cell in summary_row(out, "wall time, evaluations")]
    assert all(0 < steps <= wall + 3 for steps, wall in zip(step_time, wall_time))  # wall is rounded to 0.1 min

    # Exact copies: the upcycled model at step 0 is the dense model (each measured on its own model).
    dense0, moe0 = map(float, summary_row(out, "val perplexity, step 0"))
    assert moe0 == pytest.approx(dense0, rel=1e-4)
    for cell in summary_row(out, "test bits per character"):
        assert 0 < float(cell) < 20
    assert [cell.endswith("of 20") for cell in summary_row(out, "names valid/unique/novel")] == [True, True]
    # Each model's sampling: a temperature of the demo's grid chosen on selection samples, or the library's
    # default where none reached the targets (a random tiny model's names do not).
    from flash_experts.cli.demo import NAME_TEMPERATURES
    from flash_experts.mtg.cleaning import NAME_TEMPERATURE
    for cell in summary_row(out, "names' temperature, top-p"):
        temperature = float(cell.split(",")[0])
        assert (temperature in NAME_TEMPERATURES if "chosen on selection" in cell else
                temperature == NAME_TEMPERATURE and "no setting reached the targets" in cell)
    assert re.search(r"MoE / dense validation perplexity \d+\.\d{3}", out)
    assert (out_dir / "val_vs_compute.png").read_bytes()[:4] == b"\x89PNG"
    assert (out_dir / "dense" / "best").is_dir() and (out_dir / "moe" / "best").is_dir()

    # --resume keeps the plan it was started with (the steps are not measured again).
    assert main([*argv, "--resume"]) == 0
    again = capsys.readouterr().out
    assert "the plan of the earlier run" in again
    assert summary_row(again, "steps (cost of a step, timed)")[0].split()[0] == str(dense_steps)


def test_realized_step_cost_is_the_ratio_of_mean_step_times():
    """Reference: the arithmetic (mean MoE step / mean dense step); None after a resume (initial_val_ppl None),
    when the invocation timed only part of a run."""
    from types import SimpleNamespace

    from flash_experts.cli.demo import realized_step_cost

    dense = SimpleNamespace(steps=10, step_seconds=20.0, initial_val_ppl=700.0)
    moe = SimpleNamespace(steps=8, step_seconds=24.0, initial_val_ppl=700.0)
    assert realized_step_cost(dense, moe) == pytest.approx(1.5)
    assert realized_step_cost(dense, SimpleNamespace(steps=8, step_seconds=24.0, initial_val_ppl=None)) is None


@pytest.mark.slow
def test_demo_quick_on_smollm2(tmp_path, capsys, monkeypatch):
    """The real offline base: both runs improve on the base's validation perplexity."""
    pytest.importorskip("gguf", reason="the offline SmolLM2 base needs gguf")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["demo", "--quick", "--base", "smollm2", "--out", str(tmp_path / "demo"), "--wandb", "off"]) == 0
    out = capsys.readouterr().out
    start = [float(c) for c in summary_row(out, "val perplexity, step 0")]
    best = [float(c.split()[0]) for c in summary_row(out, "val perplexity, best")]
    assert best[0] < start[0] and best[1] < start[1]
    assert len(re.findall(r"^    (new |real)  \S", out, flags=re.M)) >= 1


@pytest.mark.parametrize(("argv", "expected"), [
    (["--budget", "0"], "error: --budget must be a number of seconds > 0"),
    (["--budget", "nan"], "error: --budget must be a number of seconds > 0"),
    (["--experts", "1", "--top-k", "1"], "error: --experts must be >= 2"),
    (["--top-k", "5", "--experts", "4"], "error: --top-k (5) cannot exceed --experts (4)"),
    (["--lr", "-1"], "error: --lr must be > 0"),
    (["--names", "0"], "error: --names must be >= 1"),
    (["--base", "/nonexistent/model"], "error: model folder not found"),
])
def test_demo_bad_arguments_are_one_error_line(argv, expected, tmp_path, capsys):
    """Reference: the CLI contract (one `error:` line, exit 2) — and nothing written for bad arguments."""
    assert main(["demo", "--out", str(tmp_path / "demo"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected)
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("earlier", ["dense", "moe", "run"])
def test_demo_refuses_to_overwrite_an_earlier_run(earlier, tmp_path, capsys):
    """Reference: the rule that saved work is never lost — an existing run folder (this layout's, or the
    single `run` folder of the demo before the dense baseline) is left untouched."""
    run = tmp_path / "demo" / earlier
    run.mkdir(parents=True)
    (run / "keep.txt").write_text("earlier run")
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "keep.txt").read_text() == "earlier run"


def test_demo_refuses_a_corrupt_plan_on_resume(tmp_path, tiny_base, capsys):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "plan.json").write_text("{not json")
    assert main(["demo", "--base", str(tiny_base), "--out", str(tmp_path / "demo"), "--resume", "--wandb", "off"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a demo plan" in err[0]


def test_demo_interrupted_run_stops_the_job_and_says_how_to_resume(tmp_path, tiny_base, capsys, monkeypatch):
    """Reference: the trainer's Ctrl-C contract (it saves and returns "interrupted"): the demo must not go on
    to the MoE run, and says how to continue."""
    from flash_experts.training import trainer

    real_train = trainer.train

    def interrupted(cfg, resume=None):
        result = real_train(cfg, resume=resume)
        result.stopped = "interrupted"
        return result

    monkeypatch.setattr(trainer, "train", interrupted)
    out_dir = tmp_path / "demo"
    assert main(["demo", "--base", str(tiny_base), "--out", str(out_dir), "--budget", "0.5", "--names", "5",
                 "--block-size", "32", "--wandb", "off"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "dense run was interrupted" in errors[0] and "--resume" in errors[0]
    assert "Traceback" not in err
    assert (out_dir / "dense").is_dir() and not (out_dir / "moe").exists()
