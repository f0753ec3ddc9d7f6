"""The main job (`flash-experts demo`): the dense model and its upcycled MoE at equal compute, side by side.

References: the upcycling contract (exact copies: at step 0 the MoE's validation perplexity is the dense
model's, measured on the dense model), the equal-compute plan (steps = the FLOP budget over each model's own
count), the same seed's first run (a second run on a busy machine gives the same figures), the CLI contract (one `error:` line, exit 2, nothing written for bad arguments) and the rule
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


def busy_processes(count: int = 2) -> list:
    """Processes that keep the CPU busy (each spins until killed): a laptop running something else."""
    import subprocess
    import sys

    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def test_demo_trains_both_at_equal_flops_and_gives_the_same_figures_on_a_busy_machine(tiny_base, tmp_path, capsys):
    """References: the models' own FLOP counts (the plan's steps are the budget over them, by hand); exact copies
    (at step 0 the MoE's validation perplexity is the dense model's); the first run itself (a second run of the
    same seed beside two busy processes prints the same quality, test, names and routing figures, to the bit)."""
    from flash_experts.model.loading import load_model

    # fp32: exactness at step 0 is an fp32 statement (under bf16 autocast the dense MLP's one product and the
    # experts' per-expert products round differently); `auto` would pick bf16 on CPUs with native bf16.
    common = ["--base", str(tiny_base), "--tokens", "1024", "--names", "20", "--block-size", "32", "--wandb", "off",
              "--dtype", "fp32"]
    out_dir = tmp_path / "demo"
    assert main(["demo", "--out", str(out_dir), *common]) == 0
    out = capsys.readouterr().out

    # The budget: 1,024 of the dense model's tokens at 8 x 32 tokens a step = 4 steps; the top-1 MoE's FLOPs per
    # token (its routers added) are within 1% of the dense model's, so it trains the same tokens.
    plan = json.loads((out_dir / "plan.json").read_text())
    assert plan["steps"] == {"dense": 4, "moe": 4} and plan["equal_tokens"] is True
    for name in ("dense", "moe"):
        model, _ = load_model(str(out_dir / name / "best"))
        assert plan["flops_per_token"][name] == pytest.approx(model.flops_per_token(32, training=True))
    assert plan["budget"]["flops"] == 1024 * plan["flops_per_token"]["dense"]
    assert summary_row(out, "steps, tokens") == ["4, 1,024", "4, 1,024"]
    assert re.search(r"a MoE step costs \d\.\d{3}x \(interquartile \d\.\d{3}-\d\.\d{3}, 4 pairs\)", out)
    assert re.search(r"per second: (pays|does not pay|even)", out)
    assert re.search(r"quality at equal compute: MoE / dense validation perplexity \d+\.\d{3}", out)
    assert "one seed decides nothing" in out

    # Exact copies: the upcycled model at step 0 is the dense model (each measured on its own model).
    dense0, moe0 = map(float, summary_row(out, "val perplexity, step 0"))
    assert moe0 == pytest.approx(dense0, rel=1e-4)
    for cell in summary_row(out, "test bits per character") + summary_row(out, "test names from the start"):
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

    # The same seed again, beside two busy processes: every figure that is not a time is the same.
    busy = busy_processes(2)
    try:
        assert main(["demo", "--out", str(tmp_path / "again"), *common]) == 0
    finally:
        for process in busy:
            process.kill()
            process.wait()
    again = capsys.readouterr().out
    first, second = (json.loads((folder / "summary.json").read_text()) for folder in (out_dir, tmp_path / "again"))
    for key in ("best_val_loss", "best_val_ppl", "test_bpc", "name_bpc", "steps", "tokens", "budget",
                "flops_per_token"):
        assert first[key] == second[key], key
    assert json.loads((tmp_path / "again" / "moe" / "routing.json").read_text()) == routing
    assert json.loads((tmp_path / "again" / "moe" / "expert_atlas.json").read_text()) == atlas
    for label in ("val perplexity, step 0", "val perplexity, best", "test bits per character",
                  "test names from the start", "names valid/unique/novel", "names' temperature, top-p", "steps, tokens", "training FLOPs"):
        assert summary_row(again, label) == summary_row(out, label), label
    names = [line for line in out.splitlines() if line.startswith("    new ") or line.startswith("    real")]
    assert names == [line for line in again.splitlines() if line.startswith("    new ") or line.startswith("    real")]

    # --resume keeps the plan it was started with and, both runs done, takes no step.
    assert main(["demo", "--out", str(out_dir), *common, "--resume"]) == 0
    resumed = capsys.readouterr().out
    assert "the plan of the earlier run" in resumed
    assert summary_row(resumed, "steps, tokens") == summary_row(out, "steps, tokens")
    assert "no step pairs ran in this invocation" in resumed


def test_demo_with_several_seeds_decides_with_the_paired_test(tiny_base, tmp_path, capsys):
    """Reference: contest/seeds.py's paired test (tested against scipy) on the seeds' own summaries."""
    from flash_experts.contest.seeds import paired_test, verdict_words

    out_dir = tmp_path / "seeds"
    assert main(["demo", "--base", str(tiny_base), "--out", str(out_dir), "--tokens", "512", "--names", "5",
                 "--block-size", "32", "--wandb", "off", "--dtype", "fp32", "--seeds", "2", "--seed", "7"]) == 0
    out = capsys.readouterr().out
    summaries = [json.loads((out_dir / f"seed-{seed}" / "summary.json").read_text()) for seed in (7, 8)]
    assert [s["seed"] for s in summaries] == [7, 8]
    test = paired_test([s["best_val_loss"]["moe"] for s in summaries], [s["best_val_loss"]["dense"] for s in summaries])
    assert f"quality at equal compute: {verdict_words(test)}" in out
    assert "Across 2 paired seeds" in out


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
    (["--budget", "180"], "error: flash-experts demo: --budget is now --tokens"),
    (["--tokens", "0"], "error: --tokens must be >= 1"),
    (["--tokens", "nan"], "error: flash-experts demo: argument --tokens: invalid int value"),
    (["--seeds", "0"], "error: --seeds must be an integer from 1 to 1000"),
    (["--seeds", "1000000000"], "error: --seeds must be an integer from 1 to 1000"),  # hung silently (issue 44)
    (["--seed", "-1"], "error: --seed must be an integer from 0 to 2^63 - 1"),
    (["--experts", "1", "--top-k", "1"], "error: --experts must be >= 2"),
    (["--top-k", "5", "--experts", "4"], "error: --top-k (5) cannot exceed --experts (4)"),
    (["--lr", "-1"], "error: --lr must be a number > 0"),
    (["--lr", "nan"], "error: --lr must be a number > 0"),
    (["--names", "0"], "error: --names must be >= 1"),
    (["--router-lr-scale", "0"], "error: --router-lr-scale must be a number > 0"),
    (["--router-lr-scale", "inf"], "error: --router-lr-scale must be a number > 0"),
    (["--aux-loss", "-0.1"], "error: --aux-loss must be a number >= 0"),
    (["--resume"], "error: nothing to resume in"),
    (["--base", "/nonexistent/model"], "error: model folder not found"),
])
def test_demo_bad_arguments_are_one_error_line(argv, expected, tmp_path, capsys):
    """Reference: the CLI contract (one `error:` line, exit 2) — and nothing written for bad arguments."""
    try:
        code = main(["demo", "--out", str(tmp_path / "demo"), *argv])
    except SystemExit as stop:  # argparse's own refusals exit from the parser
        code = stop.code
    assert code == 2
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
    """Reference: the contest's Ctrl-C contract (every unfinished run saves and returns "interrupted"): the demo
    stops before scoring anything and says how to continue."""
    from flash_experts.contest import upcycling

    real = upcycling.train_contest

    def interrupted(configs, resume, stop_requested=None):
        return real(configs, resume, stop_requested=lambda: True)

    monkeypatch.setattr(upcycling, "train_contest", interrupted)
    out_dir = tmp_path / "demo"
    assert main(["demo", "--base", str(tiny_base), "--out", str(out_dir), "--tokens", "1024", "--names", "5",
                 "--block-size", "32", "--wandb", "off"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "interrupted at dense step 1" in errors[0] and "--resume" in errors[0]
    assert "Traceback" not in err
    assert (out_dir / "dense").is_dir() and (out_dir / "moe").is_dir()
    assert not (out_dir / "val_vs_compute.png").exists()
    # the same command with --resume finishes the plan, exactly as a run that was never interrupted
    monkeypatch.undo()
    common = ["--base", str(tiny_base), "--tokens", "1024", "--names", "5", "--block-size", "32", "--wandb", "off"]
    assert main(["demo", "--out", str(out_dir), *common, "--resume"]) == 0
    assert main(["demo", "--out", str(tmp_path / "whole"), *common]) == 0
    resumed, whole = (json.loads((folder / "summary.json").read_text()) for folder in (out_dir, tmp_path / "whole"))
    for key in ("best_val_loss", "test_bpc", "steps", "tokens"):
        assert resumed[key] == whole[key], key
