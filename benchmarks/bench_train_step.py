"""Full training step, tokens/s: our GPT-2 MoE vs Hugging Face's dense GPT2LMHeadModel (sdpa), fp32 and bf16.

    python benchmarks/bench_train_step.py            # GPT-2 small size, then a short training run
    python benchmarks/bench_train_step.py --quick    # tiny sizes, seconds: a check that everything runs
    python benchmarks/bench_train_step.py --device cuda --batch 16 --seq 1024 --skip-quality   # a GPU

On CUDA (the default where one is present) the same contenders run on the GPU; peak memory is then
torch.cuda.max_memory_allocated over two steps in this process.

MFU (model FLOPs utilisation): model FLOPs per step / step time / the peak of one large matmul measured in
the same run, device and precision (not the vendor's nominal figure, which this machine may not reach).
Model FLOPs per token = 6 x the parameters a token passes through (non-embedding, top-k of each MoE layer's
experts, plus the LM head) + 12 x layers x sequence x width (attention scores and values, forward and
backward; the PaLM paper's formula).

Part 1 (speed): GPT-2 small (12 layers, d=768, 12 heads, vocab 50257, random init). Ours replaces every
other MLP with --experts experts (8), top --top-k (1: the dense model's FLOPs per token, plus a router). One step = forward,
loss, backward, gradient clipping, fused AdamW update, on the same batch of real text for every contender. The contenders run
interleaved, one step each per round, and the table reports the median over rounds (peak memory:
growth of peak RSS over two steps, each contender in a fresh process): the CPU is shared,
so only ratios measured side by side mean anything. bf16 = torch.autocast(bfloat16) with fp32 weights,
as our trainer does it.

Part 2 (quality): a reduced model (--train-layers/--train-embd) of each kind trained for --train-steps
AdamW steps on the same batches, from the same initial dense weights (ours: the experts upcycled from
the dense MLPs, which is how this project makes MoE models), then the validation loss of both on the
same held-out tokens. "Within noise" = the paired difference is within 2 standard errors (over the
validation batches).

Text: WikiText-2 (wiki.test.raw from ../shared/data/wikitext-2-raw or $FLASH_EXPERTS_WIKITEXT_DIR,
90% train / 10% validation by position); without it, the offline Wikipedia summaries.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import interleaved_medians, machine_description, markdown_table, mib, peak_memory, run_worker, time_call  # noqa: E402
from flash_experts.training.steps import training_step  # noqa: E402

# ------------------------------------------------------------------------------------------------ data

def load_token_stream() -> tuple[torch.Tensor, str]:
    """All tokens of the benchmark text (GPT-2 BPE) and a description of where they came from."""
    from flash_experts.data.text import find_wikitext_dir, wikipedia_documents
    from flash_experts.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    folder = find_wikitext_dir()
    if folder is not None:
        file = sorted(folder.glob("wiki.*.raw"))[-1]  # test < train < valid: any real split will do
        text, source = file.read_text(encoding="utf-8"), f"WikiText-2 {file.name}"
    else:
        docs = wikipedia_documents(fetch=False)
        text, source = "\n".join(docs["train"][:3000]), "offline Wikipedia summaries"
    ids = tokenizer.encode(text)
    return torch.tensor(ids, dtype=torch.long), f"{source}, {len(ids):,} GPT-2 tokens"


def batches(stream: torch.Tensor, batch: int, seq: int, count: int, seed: int) -> list[torch.Tensor]:
    """`count` (batch, seq) windows at random offsets of `stream` (the same for every model)."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq - 1, (count, batch), generator=gen)
    return [torch.stack([stream[s:s + seq] for s in row.tolist()]) for row in starts]


# ------------------------------------------------------------------------------------------------ models

def hf_dense(layers: int, embd: int, heads: int, positions: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=layers, n_embd=embd, n_head=heads, n_positions=positions,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    model = GPT2LMHeadModel(config)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model


def ours_moe(dense, experts: int, top_k: int):
    """Our GPT-2 MoE upcycled from `dense` (experts = copies of the dense MLPs), every other layer."""
    from flash_experts.model import upcycle_gpt2

    return upcycle_gpt2(dense, num_experts=experts, top_k=top_k, moe_layers="every_other")


def fresh_models(layers, embd, heads, positions, experts, top_k, seed):
    """(HF dense, ours MoE), ours upcycled from a copy of the same dense initial weights."""
    import copy

    dense = hf_dense(layers, embd, heads, positions, seed)
    moe = ours_moe(copy.deepcopy(dense), experts, top_k)
    return dense, moe


def adamw(model, lr: float, weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where this torch has it (CPU too since 2.4), for both contenders.

    The default (for-loop) AdamW costs several times more per parameter on CPU; since the MoE model has
    ~2.6x the dense model's parameters, a slow optimizer would penalise it for something unrelated to MoE.
    """
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


@torch.no_grad()
def validation_losses(model, val_batches: list[torch.Tensor]) -> torch.Tensor:
    model.eval()
    losses = []
    for ids in val_batches:
        out = model(input_ids=ids, labels=ids)
        lm = getattr(out, "lm_loss", None)
        losses.append(float(lm if lm is not None else out.loss))
    model.train()
    return torch.tensor(losses)


# ------------------------------------------------------------------------------------------------ parts

OURS, HF = "ours: GPT-2 MoE, upcycled (--experts, --top-k)", "HF GPT2LMHeadModel dense (sdpa)"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}


def default_precision(device: str = "cpu") -> str:
    """What our trainer runs with run.precision=auto (bf16 on CUDA and where the CPU computes bf16 natively)."""
    from flash_experts.training.config import resolve_precision

    return resolve_precision("auto", "cuda" if device.startswith("cuda") else "cpu")


def speed_model(name: str, args):
    """The model `name` at the speed test's size (ours upcycled from the same random dense weights)."""
    dense = hf_dense(args.layers, args.embd, args.heads, args.positions, seed=0)
    return (ours_moe(dense, args.experts, args.top_k) if name == OURS else dense).train().to(args.device)


def memory_worker(name: str, precision: str, args) -> dict:
    """Growth of peak memory over two training steps (gradients, AdamW state, activations) above the model:
    peak RSS on CPU (run in a fresh process), torch.cuda.max_memory_allocated on CUDA."""
    model = speed_model(name, args)
    ids = batches(torch.randint(0, 50257, (100_000,)), args.batch, args.seq, 1, seed=1)[0].to(args.device)
    step = training_step(model, adamw(model, lr=1e-4), PRECISIONS[precision])
    with peak_memory(args.device) as peak:
        step(ids)
        step(ids)
    return {"peak_bytes": peak.peak_bytes}


def training_flops_per_token(model, seq: int) -> float:
    """6 x active non-embedding parameters (the tied LM head counted as a matmul) + 12 x layers x seq x width."""
    from flash_experts.evaluation.compare import count_parameters

    config = model.config
    position_embedding = config.n_positions * config.n_embd  # a lookup, no FLOPs; the token embedding is the head
    active = count_parameters(model).active - position_embedding
    return 6 * active + 12 * config.n_layer * seq * config.n_embd


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    """FLOP/s of one large square matmul in `dtype` on `device` (median of 5 after warm-up): the MFU's peak."""
    n = 8192 if device.startswith("cuda") else 1024  # 1024 on CPU: bf16 without native support is slow
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    return 2 * n**3 / time_call(lambda: a @ b, device=device, warmup=2, repeats=5)


def speed(args, stream) -> tuple[str, dict]:
    worker_flags = [f"--{k.replace('_', '-')}={getattr(args, k)}"
                    for k in ("layers", "embd", "heads", "batch", "seq", "device", "experts", "top_k")]
    memory = {}
    for name in (OURS, HF):
        for precision in PRECISIONS:
            if args.device.startswith("cuda"):
                result = memory_worker(name, precision, args)
                torch.cuda.empty_cache()
            else:
                result = run_worker(__file__, [name, precision, *worker_flags])
            memory[(name, precision)] = result.get("peak_bytes")
            print(f"  memory {name} {precision}: {result}", file=sys.stderr, flush=True)

    # One model and optimizer per kind, shared by both precisions (bf16 is autocast over fp32 weights),
    # so that two GPT-2-small-sized models with AdamW state fit in memory, not four.
    ids = batches(stream, args.batch, args.seq, 1, seed=1)[0].to(args.device)
    calls, params, flops = {}, {}, {}
    for name in (OURS, HF):
        model = speed_model(name, args)
        optimizer = adamw(model, lr=1e-4)
        params[name] = sum(p.numel() for p in model.parameters())
        flops[name] = training_flops_per_token(model, args.seq)
        for precision, dtype in PRECISIONS.items():
            calls[(name, precision)] = (lambda step: lambda: step(ids))(training_step(model, optimizer, dtype))
    median = interleaved_medians(calls, rounds=args.rounds, device=args.device, on_round=lambda r: print(
        f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True))
    peaks = {precision: matmul_peak(args.device, dtype) for precision, dtype in PRECISIONS.items()}
    tokens = args.batch * args.seq
    hf_fp32 = median[(HF, "fp32")]
    rows = []
    for (name, precision), seconds in median.items():
        achieved = flops[name] * tokens / seconds
        rows.append([name, precision, f"{params[name] / 1e6:.0f}M", f"{seconds * 1e3:,.0f}",
                     f"{tokens / seconds:,.0f}", mib(memory[(name, precision)]), f"{hf_fp32 / seconds:.2f}x",
                     f"{achieved / 1e12:.3f}", f"{achieved / peaks[precision]:.1%}"])
    table = markdown_table(["model", "precision", "params", "step ms (median)", "tokens/s", "peak MiB",
                            "tokens/s vs HF fp32", "model TFLOP/s", "MFU"], rows)
    peak_line = ", ".join(f"{p} {peaks[p] / 1e12:.2f} TFLOP/s" for p in PRECISIONS)
    notes = (f"Model FLOPs per token: ours {flops[OURS] / 1e6:,.0f}M, HF {flops[HF] / 1e6:,.0f}M. MFU = model "
             f"TFLOP/s / the measured peak of one large matmul here: {peak_line}.")
    same_precision = {p: median[(HF, p)] / median[(OURS, p)] for p in PRECISIONS}
    mfu = {(name, p): flops[name] * tokens / median[(name, p)] / peaks[p] for name in (OURS, HF) for p in PRECISIONS}
    return table + "\n\n" + notes, {"ratio": hf_fp32 / median[(OURS, default_precision(args.device))],
                                    "same_precision": same_precision,
                                    "mfu_ratio": {p: mfu[(OURS, p)] / mfu[(HF, p)] for p in PRECISIONS}}


def quality(args, stream) -> tuple[str, dict]:
    split = int(stream.numel() * 0.9)
    train_stream, val_stream = stream[:split], stream[split:]
    train_data = [ids.to(args.device) for ids in
                  batches(train_stream, args.train_batch, args.train_seq, args.train_steps, seed=2)]
    val_data = [ids.to(args.device) for ids in
                batches(val_stream, args.train_batch, args.train_seq, args.val_batches, seed=3)]
    dense, moe = fresh_models(args.train_layers, args.train_embd, args.train_heads, args.train_seq, 8, 2, seed=0)
    dense, moe = dense.to(args.device), moe.to(args.device)
    import copy

    # Ours in its default precision (the target) and, when that is not fp32, in fp32 too; HF in fp32.
    precision = default_precision(args.device)
    runs = [(f"{OURS}, {precision}", moe, PRECISIONS[precision])]
    if precision != "fp32":
        runs.append((f"{OURS}, fp32", copy.deepcopy(moe), torch.float32))
        # HF in the same lower precision shows what bf16 alone does to a dense model's loss
        runs.append((f"{HF}, {precision}", copy.deepcopy(dense), PRECISIONS[precision]))
    runs.append((f"{HF}, fp32", dense, torch.float32))
    results = {}
    for name, model, dtype in runs:
        model.train()
        optimizer = adamw(model, lr=args.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 20))
        step = training_step(model, optimizer, dtype)
        start = time.perf_counter()
        for index, ids in enumerate(train_data):
            train_loss = step(ids)
            schedule.step()
            if (index + 1) % max(1, args.train_steps // 4) == 0:
                print(f"  {name}: step {index + 1}/{args.train_steps}, train loss {train_loss:.3f}",
                      file=sys.stderr, flush=True)
        results[name] = (validation_losses(model, val_data), time.perf_counter() - start, train_loss)
    def paired(a: str, b: str) -> tuple[float, float]:
        """Mean and standard error of the validation-loss difference a - b over the same batches."""
        diff = results[a][0] - results[b][0]
        return float(diff.mean()), float(diff.std() / len(diff) ** 0.5) if len(diff) > 1 else float("nan")

    rows = [[name, f"{val.mean():.4f}", f"{last:.3f}", f"{seconds:.0f}"]
            for name, (val, seconds, last) in results.items()]
    table = markdown_table(["model", "validation loss", "last train loss", "train seconds"], rows)
    diff, stderr = paired(runs[0][0], runs[-1][0])
    if precision != "fp32":  # ours against HF at the same precision: what MoE changes, bf16 set aside
        same, same_stderr = paired(runs[0][0], f"{HF}, {precision}")
        table += (f"\n\nours ({precision}) - HF ({precision}) validation loss = {same:+.4f} (standard error "
                  f"{same_stderr:.4f}): {'within noise' if abs(same) <= 2 * same_stderr else 'outside 2 standard errors'}")
    return table, {"diff": diff, "stderr": stderr}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke test")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8, help="ours: experts per MoE layer (every other layer)")
    parser.add_argument("--top-k", type=int, default=1,
                        help="ours: experts per token; top-1 (the dense model's FLOPs per token) is issue 11's target")
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per contender (median reported)")
    parser.add_argument("--train-layers", type=int, default=4)
    parser.add_argument("--train-embd", type=int, default=256)
    parser.add_argument("--train-heads", type=int, default=4)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--train-seq", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=100)
    parser.add_argument("--val-batches", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--skip-quality", action="store_true", help="only the speed table")
    parser.add_argument("--skip-speed", action="store_true", help="only the short training run")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.embd, args.heads, args.batch, args.seq, args.rounds = 2, 64, 2, 2, 32, 2
        args.train_layers, args.train_embd, args.train_heads = 2, 64, 2
        args.train_batch, args.train_seq, args.train_steps, args.val_batches = 4, 32, 8, 4
    args.positions = max(1024, args.seq)
    if args.worker:
        print(json.dumps(memory_worker(*args.worker, args)))
        return
    torch.manual_seed(0)
    try:
        stream, source = load_token_stream()
    except Exception as error:  # noqa: BLE001 - e.g. a GPU machine without the offline tokenizer package
        if not args.skip_quality:
            raise
        # Step time does not depend on which tokens are fed; the quality run would, so it needs real text.
        stream = torch.randint(0, 50257, (1_000_000,), generator=torch.Generator().manual_seed(0))
        source = f"random token ids (no tokenizer or text here: {error})"[:200]

    if not args.skip_speed:
        speed_table, speed_result = speed(args, stream)
        print(f"## Training step (forward + backward + grad clip + fused AdamW), batch {args.batch} x {args.seq} "
              "tokens\n")
        print(f"- model size: {args.layers} layers, d={args.embd}, {args.heads} heads, vocab 50257, random init"
              f"{' (GPT-2 small)' if (args.layers, args.embd) == (12, 768) else ''}; ours: {args.experts} experts, top-{args.top_k}, "
              "every other layer")
        print(f"- machine: {machine_description(args.device)}")
        print(f"- data: {source}; median of {args.rounds} interleaved rounds\n")
        print(speed_table)
        print()
        for precision, ratio in speed_result["same_precision"].items():
            print(f"Target: ours >= 0.9x HF dense tokens/s in the same precision ({precision}): {ratio:.2f}x, "
                  f"{'met' if ratio >= 0.9 else 'NOT met'}")
        mfu_bf16 = speed_result["mfu_ratio"].get("bf16")
        if mfu_bf16 is not None:
            print(f"Target: our bf16 MFU >= 0.85x HF dense's bf16 MFU: {mfu_bf16:.2f}x, "
                  f"{'met' if mfu_bf16 >= 0.85 else 'NOT met'}")
        print(f"Beside it (no longer a target): ours in this {args.device}'s default precision "
              f"({default_precision(args.device)}) vs HF dense fp32: {speed_result['ratio']:.2f}x")
    if args.skip_quality:
        return

    quality_table, q = quality(args, stream)
    print(f"\n## Short training run: validation loss after {args.train_steps} steps, ours in its default "
          f"precision ({default_precision(args.device)}) vs HF fp32\n")
    print(f"- model size: {args.train_layers} layers, d={args.train_embd}, {args.train_heads} heads, vocab 50257 "
          f"(reduced so the run takes minutes); batch {args.train_batch} x {args.train_seq}; AdamW lr "
          f"{args.lr}, 20 warm-up steps, grad clip 1.0; both start from the same dense weights (ours "
          "upcycled); the same training batches")
    print(f"- validation: {args.val_batches} batches of held-out text (the last 10%)\n")
    print(quality_table)
    within = abs(q["diff"]) <= 2 * q["stderr"]
    print(f"\nours ({default_precision(args.device)}) - HF (fp32) validation loss = {q['diff']:+.4f} (standard error of the paired difference "
          f"{q['stderr']:.4f}): {'within noise' if within else 'outside 2 standard errors'}")


if __name__ == "__main__":
    main()
