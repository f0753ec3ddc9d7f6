#!/usr/bin/env bash
# The GPU checks of issue 5 in one command, for a machine with CUDA (run from the repository root):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# 1. the Triton kernel's GPU tests (realistic shapes against a float64 reference, fp32 exactness);
# 2. attention fwd+bwd, seq 128..8192: ours (PyTorch and Triton) vs SDPA (flash backend and default), with
#    the target line "Triton >= 0.8x SDPA flash";
# 3. a GPT-2-small-sized training step on the GPU (ours MoE vs HF dense, fp32 and bf16) with MFU;
# 4. the MoE layer in bf16 on the GPU (ours: torch._grouped_mm on Hopper) vs HF Mixtral blocks and a dense MLP.
# About 5 minutes on an H200 (estimated: it has not run on a GPU yet). Runs from source (PYTHONPATH=src), so the machine's own torch/triton/transformers are used. Each part's
# output is also written to OUT_DIR (default gpu-results/).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-results}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python3 -m pytest -m gpu -p no:cacheprovider tests/test_flash_triton.py 2>&1 | tee "$out/gpu_tests.txt"
python3 benchmarks/bench_attention.py --device cuda --min-seconds 0.5 2>&1 | tee "$out/attention.md"
python3 benchmarks/bench_train_step.py --device cuda --batch 16 --seq 1024 --skip-quality 2>&1 | tee "$out/train_step.md"
python3 benchmarks/bench_moe.py --device cuda --dtype bf16 2>&1 | tee "$out/moe_bf16.md"
