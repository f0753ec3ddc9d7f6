"""Plots from metrics.jsonl, checked against hand-computed numpy values and the PNG file format (struct)."""

from __future__ import annotations

import json
import math
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from flash_experts.cli.main import main as cli_main
from flash_experts.errors import UserError
from flash_experts.training.plots import expert_load_matrix, plot_run, read_metrics, series

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _synthetic_records() -> list[dict]:
    """40 training steps, eval every 10, expert load for MoE layers 1 and 3 (4 experts) every 5 steps."""
    rng = np.random.default_rng(0)
    records = []
    for step in range(1, 41):
        record = {"step": step, "train/loss": 5.0 * math.exp(-step / 20) + 1.0, "train/lr": 3e-4 * min(1.0, step / 5),
                  "train/tokens": step * 1024}
        if step % 5 == 0:
            for layer in (1, 3):
                load = rng.random(4) + 0.1
                record[f"expert_load/layer_{layer}"] = (load / load.sum()).tolist()
        records.append(record)
        if step % 10 == 0:
            evaluation = {"step": step, "val/loss": 5.0 * math.exp(-step / 25) + 1.2}
            for layer in (1, 3):  # the routers leave uniform as the trainer logs it at each evaluation
                evaluation.update({f"router/entropy_ratio/layer_{layer}": 1.0 - step / 100,
                                   f"router/top1_prob/layer_{layer}": 0.25 + step / 100,
                                   f"router/load_min/layer_{layer}": 0.2, f"router/expert_distance/layer_{layer}": step / 1e3})
            records.append(evaluation)
    return records


def _write_run(run_dir: Path, records: list[dict], tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return run_dir


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, read with struct (independent of matplotlib/PIL)."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_run_writes_valid_pngs(tmp_path: Path):
    """Reference: the PNG signature and IHDR header, parsed by hand."""
    run_dir = _write_run(tmp_path / "run", _synthetic_records())
    paths = plot_run(run_dir)
    assert {p.name for p in paths} == {"loss.png", "loss_vs_tokens.png", "lr.png", "expert_load.png", "expert_load_time.png",
                                       "router.png"}
    for path in paths:
        assert path.parent == run_dir / "plots" and path.stat().st_size > 0
        width, height = _png_size(path)
        assert width > 100 and height > 100


def test_plot_run_out_dir_and_partial_metrics(tmp_path: Path):
    """Reference: a dense run logs no expert load, no routing and no tokens, so only loss and lr plots can exist."""
    records = [{k: v for k, v in r.items() if not k.startswith(("expert_load", "router/")) and k != "train/tokens"}
               for r in _synthetic_records()]
    paths = plot_run(_write_run(tmp_path / "run", records), tmp_path / "elsewhere")
    assert sorted(p.name for p in paths) == ["loss.png", "lr.png"]
    assert all(p.parent == tmp_path / "elsewhere" for p in paths)


def test_expert_load_matrix_is_the_mean_of_normalised_loads():
    """Reference: numpy mean over hand-normalised lists; raw counts are normalised to fractions."""
    records = [
        {"step": 1, "expert_load/layer_0": [1, 1, 2], "expert_load/layer_2": [0.5, 0.25, 0.25]},
        {"step": 2, "expert_load/layer_0": [0, 3, 1], "expert_load/layer_2": [0.1, 0.1, 0.8]},
    ]
    layers, matrix = expert_load_matrix(records)
    assert layers == [0, 2]
    expected = np.array([
        (np.array([0.25, 0.25, 0.5]) + np.array([0.0, 0.75, 0.25])) / 2,
        (np.array([0.5, 0.25, 0.25]) + np.array([0.1, 0.1, 0.8])) / 2,
    ])
    np.testing.assert_allclose(matrix, expected)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0)


def test_series_sorts_and_keeps_the_last_record_of_a_repeated_step():
    """Reference: a resumed run re-logs steps 2-3; the hand-written expectation keeps the later values."""
    records = [{"step": 1, "train/loss": 3.0}, {"step": 2, "train/loss": 2.0}, {"step": 3, "train/loss": 1.5},
               {"step": 2, "train/loss": 2.1}, {"step": 3, "train/loss": 1.6}, {"step": 4, "val/loss": 9.0}]
    steps, values = series(records, "train/loss")
    assert steps.tolist() == [1, 2, 3] and values.tolist() == [3.0, 2.1, 1.6]


def test_corrupt_trailing_line_is_skipped_with_a_warning(tmp_path: Path):
    """Reference: the records written before the half-written last line."""
    records = _synthetic_records()
    run_dir = _write_run(tmp_path / "run", records, tail='{"step": 41, "train/lo')
    with pytest.warns(UserWarning, match="last line"):
        assert read_metrics(run_dir) == records
    with pytest.warns(UserWarning):
        assert (run_dir / "plots" / "loss.png") in plot_run(run_dir)


@pytest.mark.parametrize("content, message", [("", "empty"), ("\n\n", "empty"), ("not json\n{also not\n", "corrupt")])
def test_empty_or_corrupt_metrics_are_user_errors(tmp_path: Path, content: str, message: str):
    """Reference: hand-written broken files; a file with nothing usable is one error, with no warning before it."""
    (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(UserError, match=message), warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning would surface as an exception other than the UserError
        read_metrics(tmp_path)


def test_run_dir_without_metrics_is_a_user_error(tmp_path: Path):
    """Reference: an empty directory."""
    with pytest.raises(UserError, match="no metrics.jsonl"):
        read_metrics(tmp_path)


def test_cli_plot_missing_run_dir_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture):
    """Reference: the CLI contract -- `error: <message>` on stderr and exit code 2."""
    missing = tmp_path / "no_such_run"
    assert cli_main(["plot", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run directory not found") and str(missing) in err and err.count("\n") == 1


def test_cli_plot_writes_and_lists_pngs(tmp_path: Path, capsys: pytest.CaptureFixture):
    """Reference: the files on disk must be exactly the paths the command printed."""
    run_dir = _write_run(tmp_path / "run", _synthetic_records())
    assert cli_main(["plot", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(p) for p in (tmp_path / "out").glob("*.png")) and len(printed) == 6


def test_validation_vs_compute_plot_keeps_every_text_inside_the_figure(tmp_path: Path, monkeypatch):
    """Reference: matplotlib's own layout. At save time everything drawn (title, axis labels, ticks, legend) lies
    within the figure; the one-line x label of before did not (issue 44: cut off at both ends)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from flash_experts.contest.plots import plot_validation_vs_compute

    outside = []
    save = Figure.savefig

    def checked_save(fig, *args, **kwargs):
        fig.canvas.draw()
        drawn = fig.get_tightbbox(fig.canvas.get_renderer())  # inches: every artist as drawn
        whole = fig.bbox_inches
        if drawn.x0 < whole.x0 - 0.01 or drawn.x1 > whole.x1 + 0.01 or drawn.y0 < whole.y0 - 0.01 \
                or drawn.y1 > whole.y1 + 0.01:
            outside.append((tuple(drawn.extents), tuple(whole.extents)))
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", checked_save)
    curves = {"dense": [(0.0, 3.0), (120.0, 2.0)], "moe": [(0.0, 3.0), (140.0, 1.9)]}
    plot_validation_vs_compute(curves, tmp_path / "v.png", "validation perplexity against compute, seed 1337")
    assert outside == []
    outside.clear()
    # the check itself sees the plot of before: the same function, its x label on one line again
    from matplotlib.axes import Axes

    set_xlabel = Axes.set_xlabel
    monkeypatch.setattr(Axes, "set_xlabel", lambda ax, label, **kw: set_xlabel(ax, label.replace(":\n", ": "), **kw))
    plot_validation_vs_compute(curves, tmp_path / "w.png", "validation perplexity against compute, seed 1337")
    assert outside
