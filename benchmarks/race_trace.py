"""Trace the race's twins step by step, to find where a seed's run goes well or badly (issue 42).

For each seed and twin: the training loss and the gradient norm before clipping at every step; at probe steps
(every 5 steps up to 100, every 25 after) the update / weight ratio ||w_after - w_before|| / ||w_before|| per
group of matrices, the largest attention logit per layer and the embedding's RMS, the output logits' largest
magnitude, and per MoE layer the router logits' largest magnitude, the routing entropy / ln E and the least and
most loaded expert's share, all on a fixed probe batch; the race's validation loss per domain every
`eval_every` steps. The twins train exactly as in `flash-experts race` (the same twins, batches, AdamW, schedule
and clipped step: `contest/race.py`), one after the other instead of in turns (their losses do not depend on
the order; nothing here is timed). Settings are RaceSettings fields (`--set lr=1e-3 warmup_steps=100`).

    python benchmarks/race_trace.py --seeds 100 101 --out runs/race_trace [--steps 300] [--set FIELD=VALUE ...]
    python benchmarks/race_trace.py --quick --check   # the loop's validation losses equal run_race's (quick race)
    python benchmarks/race_trace.py --report runs/race_trace [--plot trace.png]   # a table (and plot) of the traces

Writes one JSON per (seed, twin) in --out: trace_<label>_<seed>_<twin>.json. Use seeds nobody chooses a verdict
on (100-107 are the tuning seeds; never 1337-1344).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flash_experts.contest.race import (  # noqa: E402
    QUICK,
    RaceSettings,
    build_corpus,
    evaluate_domains,
    race_optimizer,
    race_twins,
    run_race,
)
from flash_experts.training.optimizer import set_scheduled_lr  # noqa: E402
from flash_experts.training.steps import optimizer_step  # noqa: E402


def parameter_group(name: str) -> str:
    """A matrix's group for the update ratios: embeddings, attention in/out, MLP in/out, experts, router, norms."""
    if "wte" in name or "wpe" in name:
        return name.split(".")[-2]
    if "ln" in name or name.endswith("bias") or name.endswith(("b_up", "b_down")):
        return "norms_biases"
    for key in ("c_attn", "attn.c_proj", "c_fc", "mlp.c_proj", "w_up", "w_down", "router", "shared"):
        if key in name:
            return key
    return "other"


@torch.no_grad()
def probe(model: torch.nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> dict:
    """Attention-logit maxima per layer, embedding RMS, output-logit max, router statistics on `ids`."""
    found: dict = {"attn_logit_max": [], "router_logit_max": [], "router_entropy": [], "load_min": [],
                   "load_max": []}
    hooks = []
    for block in model.transformer.h:
        attn = block.attn

        def hook(module, inputs, _output, attn=attn):
            x = inputs[0]
            B, T, D = x.shape
            q, k, _ = attn.c_attn(x).float().split(D, dim=2)
            q = q.view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)
            k = k.view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)
            if attn.q_norm is not None:
                q, k = attn.q_norm(q), attn.k_norm(k)
            scores = (q @ k.transpose(-1, -2)) * attn.scale
            mask = torch.ones(T, T, dtype=torch.bool).tril()
            found["attn_logit_max"].append(float(scores.masked_select(mask).abs().max()))
        hooks.append(attn.register_forward_hook(hook))
    model.eval()
    with torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.bfloat16):
        out = model(input_ids=ids)
    model.train()
    for h in hooks:
        h.remove()
    for stats in out.router_stats or []:
        counts = stats.tokens_per_expert.float()
        share = counts / counts.sum()
        found["router_entropy"].append(float(stats.entropy) / math.log(len(counts)))
        found["load_min"].append(float(share.min()))
        found["load_max"].append(float(share.max()))
        found["router_logit_max"].append(math.sqrt(float(stats.z_loss)))  # rms of logsumexp: the z-loss's root
    found["embedding_rms"] = float(model.transformer.wte.weight.pow(2).mean().sqrt())
    found["logit_max"] = float(out.logits.float().abs().max())
    return found


def trace_twin(name: str, model: torch.nn.Module, settings: RaceSettings, corpus, probe_ids: torch.Tensor,
               val_windows: dict, path: Path) -> dict:
    """Train one twin as the race does, recording as it goes; the record is written to `path` at every
    evaluation (a long trace can be read while it runs)."""
    optim = settings.optim(name)
    optimizer = race_optimizer(model, settings, name)
    params = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}
    dtype = settings.torch_dtype
    autocast = functools.partial(torch.autocast, "cpu", dtype=dtype, enabled=dtype == torch.bfloat16)
    data_seed = settings.seed if settings.data_seed is None else settings.data_seed
    record: dict = {"twin": name, "settings": dataclasses.asdict(settings), "loss": [], "aux": [], "grad_norm": [],
                    "probes": [], "val": []}
    model.train()

    def evaluate(step: int) -> None:
        val = evaluate_domains(model, val_windows, dtype, settings.batch_size)
        record["val"].append({"step": step, "val": val, "mean": sum(val.values()) / len(val)})
        print(f"  {name} step {step}: val {record['val'][-1]['mean']:.4f}", flush=True)
        path.write_text(json.dumps(record))

    evaluate(0)
    for step in range(settings.steps):
        probing = step % 5 == 0 if step <= 100 else step % 25 == 0
        before = {id(p): p.detach().clone() for p in params} if probing else None
        set_scheduled_lr(optimizer, step, optim)
        ids = corpus.train_batch(step, settings.batch_size, settings.context, data_seed)
        # the race's own step (training/steps.py optimizer_step, as TwinContender takes it)
        numbers = optimizer_step(model, [ids], optimizer, params, autocast=autocast)
        record["loss"].append(numbers.lm_loss)
        record["aux"].append(numbers.aux_loss)
        record["grad_norm"].append(numbers.grad_norm)
        if probing:
            sums: dict[str, list[float]] = {}
            for p in params:
                group = parameter_group(names[id(p)])
                delta = (p.detach() - before[id(p)]).pow(2).sum().item()
                weight = before[id(p)].pow(2).sum().item()
                acc = sums.setdefault(group, [0.0, 0.0])
                acc[0] += delta
                acc[1] += weight
            found = probe(model, probe_ids, dtype)
            found["step"] = step
            found["update_ratio"] = {g: math.sqrt(d / w) if w > 0 else 0.0 for g, (d, w) in sums.items()}
            found["lr"] = optimizer.param_groups[0]["lr"]
            record["probes"].append(found)
        if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
            evaluate(step + 1)
    return record


REPORT_STEPS = (50, 100, 200, 400, 800)


def report(folder: Path) -> None:
    """One Markdown row per trace in `folder` (label, seed, twin): validation loss (mean over domains) at
    REPORT_STEPS, the largest attention logit at steps 100 / 200 / 400, the steps whose gradient norm was
    clipped, and for a MoE the least-loaded expert's share at step 50."""
    rows = []
    for path in sorted(folder.glob("trace_*.json")):
        record = json.loads(path.read_text())
        label, seed = path.stem.split("_")[1:3]
        val = {v["step"]: v["mean"] for v in record["val"]}
        probes = {p["step"]: p for p in record["probes"]}
        attn = [f"{max(probes[s]['attn_logit_max']):.0f}" if s in probes else "" for s in (100, 200, 400)]
        clipped = sum(g > 1.0 for g in record["grad_norm"])
        load = f"{min(probes[50]['load_min']):.3f}" if 50 in probes and probes[50]["load_min"] else ""
        rows.append([label, seed, record["twin"], *(f"{val[s]:.4f}" if s in val else "" for s in REPORT_STEPS),
                     " / ".join(attn), f"{clipped}/{len(record['grad_norm'])}", load])
    header = ["recipe", "seed", "twin", *(f"val @{s}" for s in REPORT_STEPS), "max attention logit @100/200/400",
              "clipped steps", "least expert share @50"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def plot(folder: Path, out: Path, twin: str = "dense") -> None:
    """Validation loss, the largest attention logit and the gradient norm (mean of 25 steps) against the step for
    every trace of `twin` in `folder`: one colour per recipe, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours: dict[str, str] = {}
    for path in sorted(folder.glob(f"trace_*_{twin}.json")):
        record = json.loads(path.read_text())
        label, seed = path.stem.split("_")[1:3]
        colour = colours.setdefault(label, f"C{len(colours)}")
        name = f"{label} (seed {seed})"
        axes[0].plot([v["step"] for v in record["val"]], [v["mean"] for v in record["val"]], color=colour,
                     label=name, alpha=0.8)
        probes = record["probes"]
        axes[1].plot([p["step"] for p in probes], [max(p["attn_logit_max"]) for p in probes], color=colour, alpha=0.8)
        norms = record["grad_norm"]
        means = [sum(norms[i:i + 25]) / len(norms[i:i + 25]) for i in range(0, len(norms), 25)]
        axes[2].plot(range(0, len(norms), 25), means, color=colour, alpha=0.8)
    axes[0].set_ylim(1.7, 2.9)
    axes[0].set_ylabel("validation loss, nats per byte (mean over domains)")
    axes[1].set_ylabel("largest attention logit (probe batch)")
    axes[2].set_ylabel("gradient norm before clipping (mean of 25 steps)")
    axes[2].axhline(1.0, color="grey", linestyle=":", label="clipping threshold")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"the race's {twin} twin, traced (benchmarks/race_trace.py)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[100])
    parser.add_argument("--twins", nargs="+", default=["dense", "moe"], choices=["dense", "moe"])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="RaceSettings fields")
    parser.add_argument("--label", default="base")
    parser.add_argument("--out", type=Path, default=Path("runs/race_trace"))
    parser.add_argument("--corpus", type=Path, default=None, help="a saved race corpus (else built: a minute)")
    parser.add_argument("--quick", action="store_true", help="the quick race's shapes")
    parser.add_argument("--check", action="store_true", help="compare this loop's validation with run_race's")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--report", type=Path, default=None, help="print a table of the traces in this folder")
    parser.add_argument("--plot", type=Path, default=None, help="with --report: a PNG of the traces' curves")
    args = parser.parse_args()
    if args.report:
        report(args.report)
        if args.plot:
            for twin in ("dense", "moe"):
                plot(args.report, args.plot.with_name(f"{args.plot.stem}_{twin}{args.plot.suffix}"), twin)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    fields = {f.name: f.type for f in dataclasses.fields(RaceSettings)}
    overrides = dict(QUICK) if args.quick else {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields:
            sys.exit(f"error: {key!r} is not a RaceSettings field")
        overrides[key] = json.loads(value) if value not in ("all", "every_other", "bf16", "fp32") else value
    if args.steps:
        overrides["steps"] = args.steps
    from flash_experts.data.domains import DomainCorpus

    corpus = DomainCorpus.load(args.corpus) if args.corpus else build_corpus(args.out / "corpus", args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        settings = RaceSettings(**{**overrides, "seed": seed})
        settings.check()
        twins = race_twins(settings)
        val_windows = corpus.split_windows("val", settings.context, settings.eval_windows)
        probe_ids = corpus.split_windows("val", settings.context, 4)
        probe_ids = torch.cat(list(probe_ids.values()))
        for name in args.twins:
            start = time.perf_counter()
            path = args.out / f"trace_{args.label}_{seed}_{name}.json"
            record = trace_twin(name, twins[name], settings, corpus, probe_ids, val_windows, path)
            record["minutes"] = (time.perf_counter() - start) / 60
            path.write_text(json.dumps(record))
            print(f"seed {seed} {name}: final val {record['val'][-1]['mean']:.4f} ({record['minutes']:.1f} min) "
                  f"-> {path}", flush=True)
        if args.check:
            result, _ = run_race(settings, corpus, contenders=tuple(args.twins), score_test=False)
            for name in args.twins:
                mine = json.loads((args.out / f"trace_{args.label}_{seed}_{name}.json").read_text())["val"]
                theirs = [e.val[name] for e in result.evaluations]
                worst = max(abs(a["val"][d] - b[d]) for a, b in zip(mine, theirs) for d in b)
                print(f"check {name}: {len(theirs)} evaluations, largest difference from run_race {worst:.2e}")
                if worst > 0:
                    sys.exit(f"error: the traced {name} twin differs from run_race's by {worst}")


if __name__ == "__main__":
    main()
