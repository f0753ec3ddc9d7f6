"""Expert parallelism on this machine: what the exchange costs, and tokens per second at N=1 and N=2.

    python benchmarks/bench_expert_parallel.py [--steps 30] [--batch 8] [--rounds 2] [--quick]

Three parts, each process on one thread (gloo, CPU):
1. Training throughput through the trainer itself (training/trainer.py `train`, its own step timing): one
   process; two processes with run.parallel=ddp (every expert on both); two with run.expert_parallel=2. Each
   process trains `--batch` windows of 128 tokens per step (two processes: twice the global batch). The three
   run in turns, `--rounds` times; the table gives each one's median.
2. The exchange, counted: two processes, the same model with its experts split, forward and backward on their
   own batches; the bytes each sends per step, from the dispatchers' ledgers, against the formula written from
   the routing (2 x (rows out + rows in) x d x bytes per element, per MoE layer, plus the counts), and the
   seconds spent inside the row exchanges.
3. all_to_all_single on gloo between two processes at sizes from 4 KiB to 16 MiB per process: the latency and
   bandwidth terms of the scaling model in BENCHMARKS.md, fitted by least squares (t = alpha + bytes / beta).

The model is the race's MoE twin (GPT-2 blocks, d=256, 4 layers, 8 experts of 512, top-2), fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from common import machine_description, markdown_table  # noqa: E402

WIDTH, LAYERS, HEADS, EXPERTS, TOP_K, CONTEXT, VOCAB = 256, 4, 4, 8, 2, 128, 256


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    parser.add_argument("--batch", type=int, default=8, help="windows of 128 tokens per process and step")
    parser.add_argument("--rounds", type=int, default=2, help="turns of the three training runs (default 2)")
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run: 4 steps, 1 round")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.quick:
        args.steps, args.rounds = 4, 1
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)


def leave_group() -> None:
    """Every process done before any leaves: gloo aborts a process whose peer closed the connection early."""
    dist.barrier()
    dist.destroy_process_group()


def make_data(folder: Path) -> Path:
    """Random bytes: throughput does not depend on what the tokens say."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    sizes = {"train": 400_000, "val": 20_000}
    for split, size in sizes.items():
        rng.integers(0, VOCAB, size=size, dtype=np.uint16).tofile(folder / f"{split}.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": VOCAB, "eos_token_id": 0, "dtype": "uint16",
                                                  "splits": {k: {"tokens": v} for k, v in sizes.items()}}))
    return folder


def config(data: Path, out: Path, steps: int, batch: int, extra: dict[str, object]):
    from flash_experts.training.config import load_config

    settings = {
        "run.name": out.name, "run.out_dir": str(out), "run.device": "cpu", "run.precision": "fp32",
        "run.quiet": True, "model.base": "scratch", "model.n_layer": LAYERS, "model.n_embd": WIDTH,
        "model.n_head": HEADS, "model.n_positions": CONTEXT, "moe.num_experts": EXPERTS,
        "moe.num_experts_per_tok": TOP_K, "moe.moe_layers": "all", "data.dir": str(data),
        "data.block_size": CONTEXT, "data.batch_size": batch, "optim.max_steps": steps, "optim.warmup_steps": 1,
        "eval.interval": 10_000, "eval.batches": 1, "checkpoint.interval": 0, "checkpoint.keep_last": 1,
        "eval.keep_best": False, "tracking.wandb": "'off'", "tracking.tensorboard": False,
        "tracking.log_interval": 10_000, **extra,
    }
    return load_config(None, [f"{key}={value}" for key, value in settings.items()])


def train_worker(rank: int, world: int, port: int, cfg, results: dict) -> None:
    import warnings

    from flash_experts.training.trainer import train

    join_group(rank, world, port)
    warnings.filterwarnings("ignore")
    result = train(cfg)
    if rank == 0:  # the trainer's own timing of its steps (no start-up, evaluation or checkpoint)
        results["tokens_per_second"] = result.tokens / result.step_seconds


def training_throughput(args: argparse.Namespace, root: Path) -> dict[str, list[float]]:
    data = make_data(root / "data")
    runs = {"1 process": (1, {}), "2 processes, DDP": (2, {"run.parallel": "ddp"}),
            "2 processes, expert_parallel=2": (2, {"run.expert_parallel": 2})}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    manager = mp.Manager()
    for turn in range(args.rounds):
        for name, (world, extra) in runs.items():
            out = root / f"run-{turn}-{len(rates[name])}-{world}-{'ep' if extra.get('run.expert_parallel') else 'dp'}"
            results = manager.dict()
            cfg = config(data, out, args.steps, args.batch, extra)
            mp.start_processes(train_worker, args=(world, free_port(), cfg, results), nprocs=world,
                               start_method="spawn")
            rates[name].append(results["tokens_per_second"])
            print(f"  round {turn + 1}: {name}: {results['tokens_per_second']:,.0f} tokens/s", flush=True)
    return rates


def exchange_worker(rank: int, world: int, port: int, batch: int, repeats: int, results: dict) -> None:
    from flash_experts.model import GPT2MoEConfig, GPT2MoEForCausalLM
    from flash_experts.model.expert_parallel import shard_experts

    join_group(rank, world, port)
    torch.manual_seed(0)  # the same whole weights on both processes
    model = GPT2MoEForCausalLM(GPT2MoEConfig(
        vocab_size=VOCAB, n_positions=CONTEXT, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, num_experts=EXPERTS,
        num_experts_per_tok=TOP_K, moe_layers="all", attention_implementation="sdpa", bos_token_id=0,
        eos_token_id=0))
    shard_experts(model)
    dispatches = [m.expert_dispatch for m in model.modules() if hasattr(m, "expert_dispatch")]
    generator = torch.Generator().manual_seed(100 + rank)  # each process its own batch
    counted, formula, exchange_seconds, step_seconds = [], [], [], []
    for repeat in range(repeats + 1):
        ids = torch.randint(0, VOCAB, (batch, CONTEXT), generator=generator)
        for dispatch in dispatches:
            dispatch.ledger.reset()
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        expected = 0
        for stats, dispatch in zip(out.router_stats, dispatches):
            counts = stats.tokens_per_expert.to(torch.int64)
            every = [torch.empty_like(counts) for _ in range(world)]
            dist.all_gather(every, counts, group=dispatch.group)
            mine = slice(dispatch.first_expert, dispatch.first_expert + dispatch.local_experts)
            rows_out = int(counts.sum() - counts[mine].sum())
            rows_in = sum(int(c[mine].sum()) for s, c in enumerate(every) if s != rank)
            expected += 2 * (rows_out + rows_in) * WIDTH * 4 + (world - 1) * dispatch.local_experts * 8
        if repeat == 0:
            continue  # warm-up
        counted.append(sum(d.ledger.bytes_sent for d in dispatches))
        formula.append(expected)
        exchange_seconds.append(sum(d.ledger.seconds for d in dispatches))
        step_seconds.append(elapsed)
    if rank == 0:
        results.update(counted=counted, formula=formula, exchange_seconds=exchange_seconds,
                       step_seconds=step_seconds, tokens=batch * CONTEXT)
    leave_group()


def all_to_all_worker(rank: int, world: int, port: int, sizes: list[int], results: dict) -> None:
    join_group(rank, world, port)
    times = {}
    for size in sizes:
        x = torch.zeros(size // 4, dtype=torch.float32)
        out = torch.empty_like(x)
        for _ in range(3):
            dist.all_to_all_single(out, x)
        samples = []
        for _ in range(15):
            dist.barrier()
            start = time.perf_counter()
            dist.all_to_all_single(out, x)
            samples.append(time.perf_counter() - start)
        times[size] = statistics.median(samples)
    if rank == 0:
        results.update(times)
    leave_group()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not dist.is_gloo_available():
        print("error: torch.distributed's gloo backend is not available here", file=sys.stderr)
        return 2
    print(f"# Expert parallelism, {machine_description()}; one thread per process, fp32, gloo\n", flush=True)
    manager = mp.Manager()
    with tempfile.TemporaryDirectory() as folder:
        print(f"1. training throughput, {args.batch} x {CONTEXT} tokens per process and step, {args.steps} steps, "
              f"{args.rounds} round(s):", flush=True)
        rates = training_throughput(args, Path(folder))
    single = statistics.median(rates["1 process"])
    rows = [[name, f"{statistics.median(values):,.0f}", f"{statistics.median(values) / single:.2f}x",
             ", ".join(f"{v:,.0f}" for v in values)] for name, values in rates.items()]
    print(markdown_table(["run", "tokens/s (median)", "vs 1 process", "each round"], rows), flush=True)

    results = manager.dict()
    repeats = 2 if args.quick else 10
    mp.start_processes(exchange_worker, args=(2, free_port(), args.batch, repeats, results), nprocs=2,
                       start_method="spawn")
    counted, formula = results["counted"], results["formula"]
    exchange, step = statistics.median(results["exchange_seconds"]), statistics.median(results["step_seconds"])
    print(f"\n2. the exchange, process 0 of 2, {results['tokens']} tokens each, {repeats} forward+backward:")
    print(markdown_table(["bytes sent per step (counted)", "formula from the routing", "equal",
                          "row exchanges (s)", "forward+backward (s)", "share"],
                         [[f"{statistics.median(counted):,.0f}", f"{statistics.median(formula):,.0f}",
                           str(counted == formula), f"{exchange:.4f}", f"{step:.4f}", f"{exchange / step:.1%}"]]))

    sizes = [4 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20]
    if args.quick:
        sizes = sizes[:3]
    times = manager.dict()
    mp.start_processes(all_to_all_worker, args=(2, free_port(), sizes, times), nprocs=2, start_method="spawn")
    # each process sends half of its buffer to the other: bytes moved per process = size / 2
    moved = np.array([size / 2 for size in sizes])
    seconds = np.array([times[size] for size in sizes])
    slope, alpha = np.polyfit(moved, seconds, 1)
    print("\n3. all_to_all_single between 2 processes (gloo): median of 15")
    print(markdown_table(["buffer per process", "bytes to the other", "seconds", "GB/s"],
                         [[f"{size >> 10} KiB", f"{int(m):,}", f"{t:.6f}", f"{m / t / 1e9:.2f}"]
                          for size, m, t in zip(sizes, moved, seconds)]))
    print(f"\nfit t = alpha + bytes / beta: alpha = {alpha * 1e6:.0f} us, beta = {1 / slope / 1e9:.2f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
