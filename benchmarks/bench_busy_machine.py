"""A training step on a busy machine: alone, then beside a competing 2-thread process, under each thread-pool
policy the command line could set (issue 35: one other program made a 1.8 s demo step take 8-11 s).

Each configuration runs in a fresh interpreter (OpenMP reads its settings once, at start-up), on the race's
dense twin (d=256, 4 layers, bf16 where the CPU has it), N timed steps after warm-up. The competitor is another
PyTorch process multiplying matrices on 2 threads, as a second training job or a notebook would.

    python benchmarks/bench_busy_machine.py                # every policy, alone and loaded
    python benchmarks/bench_busy_machine.py --steps 10

Prints each policy's median step alone and loaded and the slowdown (loaded / alone), interleaved so that the
machine's drift hits every policy alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# The policies compared: the environment each measurement's interpreter starts with.
POLICIES = {
    "default": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=0": {"GOMP_SPINCOUNT": "0"},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=100000": {"GOMP_SPINCOUNT": "100000"},
    "one thread": {"OMP_NUM_THREADS": "1"},
}

COMPETITOR = """
import torch, time
torch.set_num_threads(2)
a = torch.randn(1024, 1024)
end = time.time() + {seconds}
while time.time() < end:
    a = (a @ a).tanh_()
"""

MEASURE = """
import json, time, statistics, torch
from flash_experts.cpu_memory import keep_cpu_memory_between_steps
keep_cpu_memory_between_steps()
from flash_experts.contest.race import RaceSettings, race_twins, race_optimizer
from flash_experts.training.steps import training_step
from flash_experts.training.config import resolve_precision
settings = RaceSettings(dtype=resolve_precision("auto", "cpu"))
model = race_twins(settings)["dense"]
model.train()
step = training_step(model, race_optimizer(model, settings), settings.torch_dtype)
ids = torch.randint(0, 256, (settings.batch_size, settings.context))
for _ in range(3):
    step(ids)
times = []
for _ in range({steps}):
    start = time.perf_counter(); step(ids); times.append(time.perf_counter() - start)
print(json.dumps({{"median": statistics.median(times), "threads": torch.get_num_threads()}}))
"""


def measure(policy: dict[str, str], steps: int) -> dict:
    env = {**os.environ, **policy}
    out = subprocess.run([sys.executable, "-c", MEASURE.format(steps=steps)], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement (default 8)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over every policy (default 2)")
    parser.add_argument("--policies", nargs="+", choices=list(POLICIES), default=list(POLICIES),
                        help="the policies to compare (default: all)")
    args = parser.parse_args()
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1")
    results: dict[str, dict[str, list[float]]] = {name: {"alone": [], "loaded": []} for name in args.policies}
    for _ in range(args.rounds):
        for name in args.policies:
            policy = POLICIES[name]
            results[name]["alone"].append(measure(policy, args.steps)["median"])
            competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR.format(seconds=600)])
            try:
                time.sleep(2)  # the competitor is up and multiplying
                results[name]["loaded"].append(measure(policy, args.steps)["median"])
            finally:
                competitor.kill()
                competitor.wait()
    print(f"{'policy':<26}{'alone (s)':>10}{'loaded (s)':>12}{'slowdown':>10}")
    for name, r in results.items():
        alone, loaded = min(r["alone"]), min(r["loaded"])  # the least disturbed of the rounds
        print(f"{name:<26}{alone:>10.3f}{loaded:>12.3f}{loaded / alone:>9.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
