"""The benchmark scripts a user runs by hand keep the command line's contract for bad input (issue 44's probes):
one `error:` line, exit 2, no traceback, before any work and with nothing written. Reference: that contract, read
off a real process's stderr."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)


def damaged_reports(root: Path) -> dict[str, Path]:
    folders = {}
    for name, content in {"not_json": "{oops", "no_models": "{}", "cards_not_a_list": '{"models": {"moe": 3}}'}.items():
        folder = root / name
        folder.mkdir()
        (folder / "cards_contest.json").write_text(content)
        folders[name] = folder
    return folders


@pytest.mark.parametrize("case", ["out under a file", "judge-again without a run", "not_json", "no_models",
                                  "cards_not_a_list"])
def test_cards_contest_bad_input_is_one_error_line(case, tmp_path):
    (tmp_path / "a_file").write_text("x")
    damaged = damaged_reports(tmp_path)
    argv, expected = {
        "out under a file": (["--out", str(tmp_path / "a_file" / "run")], "which is a file"),
        "judge-again without a run": (["--judge-again", "--out", str(tmp_path / "empty")], "holds no finished run"),
    }.get(case, (["--judge-again", "--out", str(damaged.get(case, tmp_path))], "is not a cards contest report"))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    result = run_benchmark("cards_contest", *argv, cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0] and "Traceback" not in result.stderr + result.stdout
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing lost or written
