"""benchmarks/race_trace.py trains the race's twins with its own loop (to record every step); reference: the race
itself (`run_race`). Its --check runs both on the quick race and stops with an error line if any validation loss
differs; here it must find them equal, to the bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_traced_twins_are_the_races_twins(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "race_trace.py"), "--quick", "--check",
                             "--seeds", "3", "--steps", "20", "--out", str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("largest difference from run_race 0.00e+00") == 2
    record = json.loads((tmp_path / "trace_base_3_moe.json").read_text())
    assert len(record["loss"]) == len(record["grad_norm"]) == 20 and record["probes"][0]["router_entropy"]
