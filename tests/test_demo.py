"""The main job end to end (`flash-experts demo --quick`) on the offline SmolLM2 base: slow, run with -m slow.

Reference: the pipeline's own contract — validation perplexity is measured before the first step (the
dense base, which the upcycled model equals) and must fall after fine-tuning; the names are real strings.
"""

from __future__ import annotations

import re

import pytest

from flash_experts.cli.main import main


@pytest.mark.slow
def test_demo_quick_improves_validation_perplexity(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gguf", reason="the offline SmolLM2 base needs gguf")
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert main(["demo", "--quick", "--base", "smollm2", "--out", str(tmp_path / "demo"), "--wandb", "off"]) == 0
    out = capsys.readouterr().out
    before, after = map(float, re.search(r"before ([\d.]+) -> after ([\d.]+)", out).groups())
    assert after < before
    assert len(re.findall(r"^    (new |real)  \S", out, flags=re.M)) >= 1


@pytest.mark.parametrize(("argv", "expected"), [
    (["--steps", "0"], "error: --steps must be >= 1"),
    (["--top-k", "5", "--experts", "4"], "error: --top-k (5) cannot exceed --experts (4)"),
    (["--lr", "-1"], "error: --lr must be > 0"),
    (["--base", "/nonexistent/model"], "error: model folder not found"),
])
def test_demo_bad_arguments_are_one_error_line(argv, expected, tmp_path, capsys):
    """Reference: the CLI contract (one `error:` line, exit 2) — and nothing written for bad arguments."""
    assert main(["demo", "--out", str(tmp_path / "demo"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected)
    assert not (tmp_path / "demo").exists()


def test_demo_refuses_to_overwrite_an_earlier_run(tmp_path, capsys):
    """Reference: the rule that saved work is never lost — an existing run folder is left untouched."""
    run = tmp_path / "demo" / "run"
    run.mkdir(parents=True)
    (run / "keep.txt").write_text("earlier run")
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (run / "keep.txt").read_text() == "earlier run"
