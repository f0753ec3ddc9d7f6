"""Contests: models trained side by side at equal compute, and what the measurements say.

- engine.py: the loop (contenders in turns, on the same batches, every step timed);
- budget.py: a budget of training FLOPs turned into each contender's steps;
- report.py: the step cost with its spread, equal seconds, the exchange rate, the answer per second;
- seeds.py: `contest`, N paired seeds and the verdict across them (a one-sided paired t-test), the bands so far;
- upcycling.py: the main job's contest, a dense model against its upcycle (`flash-experts demo`), and
  upcycling_report.py, the lines it prints;
- race.py: the from-scratch race, a dense GPT against its iso-FLOP MoE twin (`flash-experts race`), and
  race_report.py, one seed of it with its outputs and lines;
- plots.py: the contests' PNGs;
- defaults.py: the main job's recipe and budget, read by the command line at start-up.

Nothing here is imported by `import flash_experts.contest`: each module is imported by name.
"""
