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

    # Equal compute, realized: each run trained until its own measured step time reached the 1-second budget
    # as nearly as whole steps allow (the stop rule: the spent time plus half a mean step reaches the budget);
    # the summary's figure is the runs' own (their metrics' train/seconds, as the reference).
    compute = [float(cell.removesuffix(" s")) for cell in summary_row(out, "training compute (realized)")]
    for name, realized in zip(("dense", "moe"), compute):
        seconds = [r["train/seconds"] for r in map(json.loads, (out_dir / name / "metrics.jsonl").read_text()
                                                   .splitlines()) if "train/seconds" in r]
        assert realized == pytest.approx(max(seconds), abs=0.05)
        steps = int(summary_row(out, "steps (cost of a step)")[0 if name == "dense" else 1].split()[0])
        mean_step = realized / steps
        assert realized + mean_step / 2 >= 1 - 0.05  # 0.05: the summary's rounding to 0.1 s
    assert re.search(r"at (un)?equal compute \(MoE / dense realized compute \d\.\d{3}", out)

    # Exact copies: the upcycled model at step 0 is the dense model (each measured on its own model).
    dense0, moe0 = map(float, summary_row(out, "val perplexity, step 0"))
    assert moe0 == pytest.approx(dense0, rel=1e-4)
    for cell in summary_row(out, "test bits per character"):
        assert 0 < float(cell) < 20
    assert [cell.endswith("of 20") for cell in summary_row(out, "names valid/unique/novel")] == [True, True]
    # Each model's sampling: a temperature of the demo's grid chosen on selection samples, or the library's
    # default where none reached the targets (a random tiny model's names do not).
    from flash_experts.mtg.cleaning import NAME_TEMPERATURE
    from flash_experts.mtg.names import NAME_TEMPERATURES
    for cell in summary_row(out, "names' temperature, top-p"):
        temperature = float(cell.split(",")[0])
        assert (temperature in NAME_TEMPERATURES if "chosen on selection" in cell else
                temperature == NAME_TEMPERATURE and "no setting reached the targets" in cell)
    assert re.search(r"MoE / dense validation perplexity \d+\.\d{3}; a tie band of \+-2\.2%", out)
    # The routers: step 0 against the end, and the atlas (one line per MoE layer of the tiny base: layer 1).
    assert re.search(r"routing entropy / ln E\s+\d\.\d{3} -> \d\.\d{3}", out)
    assert re.search(r"^    layer 1: e0 \d+%", out, flags=re.M)
    atlas = json.loads((out_dir / "moe" / "expert_atlas.json").read_text())
    assert [layer["layer"] for layer in atlas["layers"]] == [1]
    routing = json.loads((out_dir / "moe" / "routing.json").read_text())
    assert routing["initial"]["summary"]["expert_distance"] == 0.0  # exact copies at step 0
    assert routing["final"]["summary"]["expert_distance"] > 0
    assert (out_dir / "val_vs_compute.png").read_bytes()[:4] == b"\x89PNG"
    assert (out_dir / "dense" / "best").is_dir() and (out_dir / "moe" / "best").is_dir()

    # --resume keeps the plan it was started with (nothing measured again) and, both budgets spent, no step.
    assert main([*argv, "--resume"]) == 0
    again = capsys.readouterr().out
    assert "the plan of the earlier run" in again
    assert summary_row(again, "training compute (realized)") == summary_row(out, "training compute (realized)")


def test_realized_step_cost_is_the_ratio_of_mean_step_times():
    """Reference: the arithmetic (mean MoE step / mean dense step over each whole run)."""
    from types import SimpleNamespace

    from flash_experts.cli.demo import realized_step_cost

    dense = SimpleNamespace(steps=10, train_seconds=20.0)
    moe = SimpleNamespace(steps=8, train_seconds=24.0)
    assert realized_step_cost(dense, moe) == pytest.approx(1.5)
    assert realized_step_cost(SimpleNamespace(steps=0, train_seconds=0.0), moe) is None


@pytest.mark.parametrize(("ratio", "compute", "words"), [
    (0.985, 1.0, "at equal compute (MoE / dense realized compute 1.000) the MoE is better"),
    (0.995, 1.02, "at equal compute (MoE / dense realized compute 1.020) a tie"),
    (1.005, 0.97, "a tie"),
    (1.02, 1.0, "the dense model is better"),
    (0.9, 1.2, "at unequal compute (MoE / dense realized compute 1.200, more than 5% apart) the MoE is better"),
])
def test_verdict_says_better_only_outside_the_band_and_equal_only_within_5_percent(ratio, compute, words):
    """Reference: the rule written out: a tie inside [1 - band, 1 + band] (band 1%), "equal compute" only
    when the realized compute of the two runs is within 5%."""
    from flash_experts.cli.demo import verdict

    assert words in verdict(ratio, compute, band=0.01)


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
    (["--router-lr-scale", "0"], "error: --router-lr-scale must be a number > 0"),
    (["--router-lr-scale", "inf"], "error: --router-lr-scale must be a number > 0"),
    (["--aux-loss", "-0.1"], "error: --aux-loss must be a number >= 0"),
    (["--resume"], "error: nothing to resume in"),
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
    """Reference: the interleaved trainer's Ctrl-C contract (every unfinished run saves and returns
    "interrupted"): the demo stops before scoring anything and says how to continue."""
    from flash_experts.training import equal_compute

    real = equal_compute.train_interleaved

    def interrupted(configs, resume=None):
        results = real(configs, resume=resume)
        results["moe"].stopped = "interrupted"
        return results

    monkeypatch.setattr(equal_compute, "train_interleaved", interrupted)
    out_dir = tmp_path / "demo"
    assert main(["demo", "--base", str(tiny_base), "--out", str(out_dir), "--budget", "0.5", "--names", "5",
                 "--block-size", "32", "--wandb", "off"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "interrupted at dense step" in errors[0] and "--resume" in errors[0]
    assert "Traceback" not in err
    assert (out_dir / "dense").is_dir() and (out_dir / "moe").is_dir()
    assert not (out_dir / "val_vs_compute.png").exists()
