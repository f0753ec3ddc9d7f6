"""Side-by-side comparison of two or more models: size, perplexity, speed, and generations.

Every model is measured by the same code on the same inputs:
- parameters: total (tied embeddings counted once) and *active per token*: for an MoE model only top_k of
  each MoE layer's num_experts experts run for a token, so active = non-expert + expert * top_k / E;
- perplexity: `evaluate_perplexity` on the same text and the same windows (context = the smallest model
  maximum unless given). With different tokenizers the streams differ and the report says so;
- forward speed: batch x seq tokens per forward, after one warm-up forward, averaged over timed passes;
- generation speed: new tokens / seconds over the side-by-side generations, after a short warm-up run;
- generations: the same prompts, sampling settings and seeds for every model.
Outputs: `comparison_table` (rich), and in `out_dir`: report.md, results.json, perplexity.png,
throughput.png, parameters.png.
"""

from __future__ import annotations

import json
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import torch

from flash_experts.errors import UserError
from flash_experts.evaluation.perplexity import (
    PerplexityResult,
    perplexity_with_routing,
    tokenize_text,
)
from flash_experts.evaluation.router_stats import router_stats_markdown
from flash_experts.model.properties import model_device, model_max_positions, synchronize
from flash_experts.model.quantize import quantization_of, quantized_parameter_counts
from flash_experts.model.routing import SplitRouting

# Our MoE layers keep expert weights under `mlp.experts.` (ARCHITECTURE.md); HF Mixtral uses
# `block_sparse_moe.experts.`. Both contain ".experts." (a Qwen-MoE "shared_expert." always runs and does not).
EXPERT_PARAMETER_MARKER = ".experts."


@dataclass
class ModelEntry:
    name: str
    model: torch.nn.Module
    tokenizer: Any


@dataclass
class ParameterCount:
    total: int
    active: int  # per token
    expert: int  # all experts' parameters (0 for a dense model)
    num_experts: int | None = None
    top_k: int | None = None


@dataclass
class Generation:
    prompt: str
    seed: int
    text: str  # the continuation only
    new_tokens: int


@dataclass
class ModelReport:
    name: str
    dtype: str
    device: str
    parameters: ParameterCount
    perplexity: PerplexityResult | None
    forward_tokens_per_second: float
    generation_tokens_per_second: float
    generations: list[Generation]
    routing: SplitRouting | None


@dataclass
class ComparisonResult:
    models: list[ModelReport]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------
# Parameters


def count_parameters(model: torch.nn.Module) -> ParameterCount:
    """Total and active-per-token parameter counts (shared tensors, e.g. tied embeddings, counted once)."""
    total = expert = 0
    # named_parameters() skips duplicates of shared tensors; quantized weights are buffers, counted by their
    # logical size
    counts = [(name, p.numel()) for name, p in model.named_parameters()] + list(quantized_parameter_counts(model))
    for name, count in counts:
        total += count
        if EXPERT_PARAMETER_MARKER in f".{name}":
            expert += count
    config = getattr(model, "config", None)
    num_experts = _first_int(config, "num_experts", "num_local_experts")
    # top_k is `num_experts_per_tok` in our configs and Mixtral's (transformers < 5 reserves `top_k`, default 50,
    # for generation, so that name is never read here).
    top_k = _first_int(config, "num_experts_per_tok")
    if expert == 0 or not num_experts or not top_k:
        return ParameterCount(total=total, active=total, expert=expert)
    active = total - expert + round(expert * top_k / num_experts)
    return ParameterCount(total=total, active=active, expert=expert, num_experts=num_experts, top_k=top_k)


def _first_int(config: Any, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


# ---------------------------------------------------------------------------------------------------
# Speed


@torch.inference_mode()
def forward_tokens_per_second(model: torch.nn.Module, input_ids_BT: torch.Tensor, iterations: int = 3) -> float:
    """Tokens per second of plain forwards (no labels, no cache), after one untimed warm-up forward."""
    device = model_device(model)
    input_ids_BT = input_ids_BT.to(device)
    was_training = model.training
    model.eval()
    try:
        model(input_ids=input_ids_BT, use_cache=False)  # warm-up: allocator, kernels, autotuning
        synchronize(device)
        start = time.perf_counter()
        for _ in range(iterations):
            model(input_ids=input_ids_BT, use_cache=False)
        synchronize(device)
        seconds = time.perf_counter() - start
    finally:
        model.train(was_training)
    return input_ids_BT.numel() * iterations / seconds


def _speed_batch(stream: torch.Tensor | None, vocab_size: int, batch_size: int, seq_len: int) -> torch.Tensor:
    """(B, T) ids for the speed test: real evaluation tokens when there are any (routing on real text), else
    fixed pseudo-random ids."""
    needed = batch_size * seq_len
    if stream is None or stream.numel() == 0:
        generator = torch.Generator().manual_seed(0)
        return torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    repeats = -(-needed // stream.numel())
    return stream.repeat(repeats)[:needed].view(batch_size, seq_len)


# ---------------------------------------------------------------------------------------------------
# Generation


def _generate(model, tokenizer, prompts: Sequence[str], sampling: Any, max_new_tokens: int, seed: int) -> list[tuple[str, int]]:
    """[(continuation text, new token count)] per prompt, all prompts in one batch."""
    from flash_experts.generation.generate import generate

    result = generate(model, tokenizer, list(prompts), sampling, max_new_tokens, seed=seed)
    return list(zip(result.texts, result.num_new_tokens))


def _timed_generations(entry: ModelEntry, prompts, seeds, sampling, max_new_tokens) -> tuple[list[Generation], float]:
    device = model_device(entry.model)
    _generate(entry.model, entry.tokenizer, prompts[:1], sampling, min(4, max_new_tokens), seeds[0])  # warm-up
    generations, new_tokens, seconds = [], 0, 0.0
    for seed in seeds:
        synchronize(device)
        start = time.perf_counter()
        outputs = _generate(entry.model, entry.tokenizer, prompts, sampling, max_new_tokens, seed)
        synchronize(device)
        seconds += time.perf_counter() - start
        for prompt, (text, count) in zip(prompts, outputs):
            generations.append(Generation(prompt=prompt, seed=seed, text=text, new_tokens=count))
            new_tokens += count
    return generations, (new_tokens / seconds if seconds > 0 and new_tokens else 0.0)


# ---------------------------------------------------------------------------------------------------
# The comparison


def compare_models(
    entries: Sequence[ModelEntry],
    *,
    prompts: Sequence[str] = (),
    seeds: Sequence[int] = (0,),
    sampling: Any = None,
    max_new_tokens: int = 40,
    eval_text: str | None = None,
    eval_tokens: torch.Tensor | None = None,
    eval_source: str = "",
    context: int | None = None,
    stride: int | None = None,
    max_eval_tokens: int | None = None,
    eval_batch_size: int = 4,
    speed_batch_size: int = 4,
    speed_seq_len: int = 128,
    speed_iterations: int = 3,
    out_dir: str | Path | None = None,
    quiet: bool = False,
) -> ComparisonResult:
    """Measure every model in `entries` the same way; write the report files when `out_dir` is given.

    eval_text is tokenised by each model's own tokenizer; eval_tokens (one stream) is used as is for all.
    sampling: a `SamplingConfig` (default: temperature 0.8, top-k 50).
    """
    if len(entries) < 2:
        raise UserError(f"a comparison needs at least 2 models, got {len(entries)}")
    names = [entry.name for entry in entries]
    if len(set(names)) != len(names):
        raise UserError(f"model names must differ to tell them apart in the report, got {names}")
    if not seeds:
        raise UserError("give at least one seed")
    for label, value, minimum in (("max_new_tokens", max_new_tokens, 1), ("eval_batch_size", eval_batch_size, 1),
                                  ("speed_batch_size", speed_batch_size, 1), ("speed_seq_len", speed_seq_len, 1),
                                  ("speed_iterations", speed_iterations, 1),
                                  ("max_eval_tokens", 2 if max_eval_tokens is None else max_eval_tokens, 2)):
        if value < minimum:
            raise UserError(f"{label} must be at least {minimum}, got {value}")
    if sampling is None and prompts:
        from flash_experts.generation.sampling import SamplingConfig

        sampling = SamplingConfig(temperature=0.8, top_k=50)

    max_positions = [model_max_positions(entry.model) for entry in entries]
    known = [m for m in max_positions if m is not None]
    if context is None:
        if not known:
            raise UserError("no model config names its maximum length: pass a context")
        context = min(known)  # the same windows for every model
    speed_seq_len = min(speed_seq_len, context)

    notes: list[str] = []
    streams = _evaluation_streams(entries, eval_text, eval_tokens, max_eval_tokens, notes)
    reports = []
    for entry, stream in zip(entries, streams):
        if not quiet:
            print(f"measuring {entry.name} ...", flush=True)
        model = entry.model
        perplexity = routing = None
        if stream is not None:
            perplexity, routing = perplexity_with_routing(model, stream, context=context, stride=stride,
                                                          batch_size=eval_batch_size, quiet=quiet)
        vocab_size = getattr(getattr(model, "config", None), "vocab_size", None) or 256
        forward_speed = forward_tokens_per_second(model, _speed_batch(stream, vocab_size, speed_batch_size, speed_seq_len),
                                                  speed_iterations)
        generations, generation_speed = ([], 0.0)
        if prompts:
            generations, generation_speed = _timed_generations(entry, list(prompts), list(seeds), sampling, max_new_tokens)
        parameter = next(model.parameters())
        dtype = str(parameter.dtype).removeprefix("torch.")
        if (scheme := quantization_of(model)) is not None:
            dtype = f"{scheme} weights, {dtype}"
        reports.append(ModelReport(
            name=entry.name, dtype=dtype, device=str(parameter.device),
            parameters=count_parameters(model), perplexity=perplexity, forward_tokens_per_second=forward_speed,
            generation_tokens_per_second=generation_speed, generations=generations, routing=routing,
        ))

    settings = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "eval_source": eval_source or ("given token stream" if eval_tokens is not None else "given text" if eval_text else "none"),
        "context": context,
        "stride": stride if stride is not None else context,
        "max_eval_tokens": max_eval_tokens,
        "speed_batch_size": speed_batch_size,
        "speed_seq_len": speed_seq_len,
        "speed_iterations": speed_iterations,
        "prompts": list(prompts),
        "seeds": list(seeds),
        "max_new_tokens": max_new_tokens,
        "sampling": _non_default_fields(sampling),
    }
    result = ComparisonResult(models=reports, settings=settings, notes=notes)
    if out_dir is not None:
        write_report(result, out_dir)
    return result


def _non_default_fields(config: Any) -> dict[str, Any] | None:
    """The settings of a dataclass config that differ from its defaults (what the reader needs to know)."""
    if config is None or not is_dataclass(config):
        return None if config is None else {"repr": repr(config)}
    changed = {}
    for f in fields(config):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        value = getattr(config, f.name)
        if value != default:
            changed[f.name] = list(value) if isinstance(value, tuple) else value
    return changed


def _evaluation_streams(entries, eval_text, eval_tokens, max_eval_tokens, notes) -> list[torch.Tensor | None]:
    if eval_text is not None and eval_tokens is not None:
        raise UserError("give the evaluation data as text or as tokens, not both")
    if eval_tokens is not None:
        stream = eval_tokens.reshape(-1).long()[:max_eval_tokens]
        return [stream] * len(entries)
    if eval_text is None:
        notes.append("No evaluation text was given: perplexity was not measured.")
        return [None] * len(entries)
    if max_eval_tokens is not None:
        eval_text = eval_text[: max(64, max_eval_tokens * 16)]  # ~4 chars per token; generous margin
    streams = [tokenize_text(eval_text, entry.tokenizer)[:max_eval_tokens] for entry in entries]
    if any(s.numel() != streams[0].numel() or not torch.equal(s, streams[0]) for s in streams[1:]):
        notes.append("The models' tokenizers split the evaluation text differently: each perplexity is per token of "
                     "that model's own tokenizer, so the numbers are not directly comparable.")
    return streams


# ---------------------------------------------------------------------------------------------------
# Presentation


def _ppl(report: ModelReport) -> str:
    return f"{report.perplexity.perplexity:.3f}" if report.perplexity else "-"


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def comparison_table(result: ComparisonResult) -> Any:
    """A rich Table with one row per model."""
    from rich.table import Table

    columns = ("model", "params", "active / token", "perplexity", "tokens scored", "forward tok/s", "generate tok/s")
    rows = [
        (r.name, _millions(r.parameters.total), _millions(r.parameters.active), _ppl(r),
         f"{r.perplexity.tokens_scored:,}" if r.perplexity else "-",
         f"{r.forward_tokens_per_second:,.0f}", f"{r.generation_tokens_per_second:,.1f}" if r.generations else "-")
        for r in result.models
    ]
    table = Table(title="Model comparison")
    # Never "…": on a narrow terminal numbers keep their full width (headers wrap instead) and model paths
    # fold onto more lines, so two rows always stay distinguishable.
    for index, column in enumerate(columns):
        if index == 0:
            table.add_column(column, overflow="fold", min_width=8)
        else:
            table.add_column(column, justify="right", overflow="fold", min_width=max(len(row[index]) for row in rows))
    for row in rows:
        table.add_row(*row)
    return table


def write_report(result: ComparisonResult, out_dir: str | Path) -> list[Path]:
    """report.md, results.json and the three PNG charts in `out_dir`."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path exists and is not a folder: {out}")
    out.mkdir(parents=True, exist_ok=True)
    charts = write_charts(result, out)
    (out / "results.json").write_text(json.dumps(result.as_dict(), indent=2, default=str) + "\n")
    (out / "report.md").write_text(report_markdown(result, [c.name for c in charts]))
    files = [out / "report.md", out / "results.json", *charts]
    result.files = [str(f) for f in files]
    return files


def report_markdown(result: ComparisonResult, chart_names: Sequence[str] = ()) -> str:
    s = result.settings
    lines = [
        "# Model comparison",
        "",
        f"Made by `flash-experts compare` on {s['date']}.",
        "",
        "| model | dtype | device | parameters | active per token | perplexity | NLL (nats) | tokens scored | forward tokens/s | generation tokens/s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result.models:
        p = r.perplexity
        lines.append(
            f"| {r.name} | {r.dtype} | {r.device} | {r.parameters.total:,} | {r.parameters.active:,} | {_ppl(r)} | "
            f"{f'{p.nll:.4f}' if p else '-'} | {f'{p.tokens_scored:,}' if p else '-'} | "
            f"{r.forward_tokens_per_second:,.0f} | {f'{r.generation_tokens_per_second:,.1f}' if r.generations else '-'} |"
        )
    lines += [
        "",
        "## How these were measured",
        "",
        f"- Perplexity: {s['eval_source']}; windows of {s['context']} tokens moved by {s['stride']} "
        "(only tokens not scored by the previous window count; the stream's first token is never scored); "
        "NLL from the logits with a float32 log-softmax, router auxiliary losses excluded.",
        "- Parameters: total counts shared (tied) tensors once; active per token counts top_k / num_experts of "
        "each MoE layer's expert parameters (dense models: active = total).",
        f"- Forward speed: batches of {s['speed_batch_size']} x {s['speed_seq_len']} tokens, one warm-up forward, "
        f"then the mean over {s['speed_iterations']} timed forwards.",
        f"- Generation speed: new tokens / wall time over all prompts and seeds below "
        f"(up to {s['max_new_tokens']} new tokens each), after a short warm-up generation.",
    ]
    if any(r.routing is not None and not r.routing.is_empty for r in result.models):
        lines.append(f"- Routing: every evaluation token routed once, in non-overlapping windows of {s['context']} "
                     "tokens; load = share of token-to-expert assignments, entropy = mean routing entropy per token.")
    lines += [f"- Note: {note}" for note in result.notes]
    for r in result.models:
        if r.routing is not None and not r.routing.is_empty:
            lines += ["", f"## Routing: {r.name}", "", router_stats_markdown(r.routing).rstrip()]
    if chart_names:
        lines += ["", "## Charts", ""] + [f"![{Path(name).stem}]({name})" for name in chart_names]
    if any(r.generations for r in result.models):
        sampling = ", ".join(f"{k}={v!r}" for k, v in (s["sampling"] or {}).items()) or "plain sampling (all defaults)"
        lines += ["", "## Generations", "", f"Sampling: {sampling}; up to {s['max_new_tokens']} new tokens."]
        for prompt in s["prompts"]:
            for seed in s["seeds"]:
                lines += ["", f"### {prompt!r} (seed {seed})"]
                for r in result.models:
                    for g in r.generations:
                        if g.prompt == prompt and g.seed == seed:
                            body = (prompt + g.text).replace("```", "'''")
                            lines.append("")
                            lines += [f"**{r.name}** ({g.new_tokens} new tokens):", "", "```text", body, "```"]
    return "\n".join(lines).rstrip() + "\n"


def write_charts(result: ComparisonResult, out: Path) -> list[Path]:
    """Bar charts as PNG, drawn without pyplot (no global backend state; works headless)."""
    from matplotlib.figure import Figure

    names = [r.name for r in result.models]
    x = list(range(len(names)))
    paths = []

    def save(fig: Figure, filename: str) -> None:
        for ax in fig.axes:
            ax.margins(y=0.12)  # room for the bar labels above the tallest bar
        fig.tight_layout()
        fig.savefig(out / filename, dpi=120)
        paths.append(out / filename)

    if any(r.perplexity for r in result.models):
        fig = Figure(figsize=(1.6 * len(names) + 2, 3.5))
        ax = fig.add_subplot()
        values = [r.perplexity.perplexity if r.perplexity else 0.0 for r in result.models]
        bars = ax.bar(x, values, color="tab:blue")
        ax.bar_label(bars, fmt="%.2f")
        ax.set_xticks(x, names, rotation=15)
        ax.set_ylabel("perplexity (lower is better)")
        ax.set_title(f"Perplexity: {result.settings['eval_source']}", fontsize=9)
        save(fig, "perplexity.png")

    fig = Figure(figsize=(2.2 * len(names) + 2, 3.5))
    ax_forward, ax_generate = fig.subplots(1, 2)
    for ax, values, label in (
        (ax_forward, [r.forward_tokens_per_second for r in result.models], "forward tokens/s"),
        (ax_generate, [r.generation_tokens_per_second for r in result.models], "generation tokens/s"),
    ):
        bars = ax.bar(x, values, color="tab:green")
        ax.bar_label(bars, fmt="%.0f")
        ax.set_xticks(x, names, rotation=15)
        ax.set_title(label + " (higher is better)", fontsize=9)
    save(fig, "throughput.png")

    fig = Figure(figsize=(1.6 * len(names) + 2, 3.5))
    ax = fig.add_subplot()
    width = 0.38
    totals = [r.parameters.total / 1e6 for r in result.models]
    actives = [r.parameters.active / 1e6 for r in result.models]
    ax.bar_label(ax.bar([i - width / 2 for i in x], totals, width, label="total"), fmt="%.2f")
    ax.bar_label(ax.bar([i + width / 2 for i in x], actives, width, label="active per token"), fmt="%.2f")
    ax.set_xticks(x, names, rotation=15)
    ax.set_ylabel("parameters (millions)")
    ax.legend()
    save(fig, "parameters.png")
    return paths
