"""The from-scratch race: a small dense GPT and its iso-FLOP Mixture-of-Experts twin, trained from random weights
on the same bytes, taking turns in one process (`flash-experts race`).

Upcycling cannot show what a MoE buys within minutes (docs/UPCYCLING.md): the published wins come after ~10% of
the dense model's pretraining. From scratch, at the same FLOPs per token, a MoE learns more per token even at
small sizes (Switch Transformer). The twins here differ only in their MLPs: the dense model's has hidden size
4d; the MoE's has E experts of hidden 4d/k and each byte goes to k of them, so a token's MLP arithmetic is the
same (`matmul_flops_per_token` says by how much the router adds) while the MoE holds E/k times the MLP weights.

Both train on the same batch at every step (a batch is a function of seed and step), with the same learning
rate schedule over the same number of steps, so every evaluation compares them at equal tokens exactly. Their
training steps are timed as they run, turn by turn (a slow minute of the machine slows both), so the curves
also say where each stood at equal seconds, and what step-cost ratio the MoE's per-token lead would pay for.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from flash_experts.data.domains import VOCAB_SIZE, DomainCorpus
from flash_experts.errors import ConfigError
from flash_experts.model import GPT2MoEConfig, GPT2MoEForCausalLM
from flash_experts.training.equal_compute import training_step
from flash_experts.training.schedule import lr_at
from flash_experts.training.trainer import optimizer_groups

CONTENDERS = ("dense", "moe")


@dataclass
class RaceSettings:
    """The twins' shapes and the training both get (the defaults: the race `flash-experts race` runs)."""

    width: int = 256
    layers: int = 4
    heads: int = 4
    context: int = 128
    batch_size: int = 32
    experts: int = 8
    top_k: int = 2  # each expert's hidden size is 4 * width / (top_k + shared_experts): finer = more, smaller experts
    shared_experts: int = 0  # experts every byte goes to, beside its top_k routed ones (DeepSeekMoE)
    moe_layers: str = "all"  # "all" or "every_other" (layers 1, 3, ...; the others keep the dense MLP)
    aux_loss: float = 0.01  # Switch load-balancing loss weight
    z_loss: float = 0.001  # ST-MoE router z-loss weight
    # the top-k weights' renormalising sum differentiated (HF Mixtral's router gradient) or held constant (the
    # Switch gradient, the library's default): model/moe.py `MoESettings.renormalize_through_sum`. None: through
    # the sum for top-k >= 2, chosen on validation at three seeds (docs/FROM_SCRATCH.md: the MoE's lead over the
    # dense twin grew 0.2-3%), held for top-1 (p / p = 1 has no gradient).
    renormalize_through_sum: bool | None = None
    steps: int = 800
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    eval_every: int = 50
    eval_windows: int = 96  # validation windows per domain at each evaluation
    test_windows: int = 384  # test windows per domain, scored once at the end
    seed: int = 1337
    dtype: str = "bf16"  # "fp32" or "bf16" (autocast)

    def check(self) -> None:
        """One ConfigError naming the first setting that cannot run."""
        positive = ("width", "layers", "heads", "context", "batch_size", "experts", "top_k", "steps", "eval_every",
                    "eval_windows", "test_windows")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.width % self.heads:
            raise ConfigError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.top_k > self.experts:
            raise ConfigError(f"top_k {self.top_k} exceeds experts {self.experts}")
        if not isinstance(self.shared_experts, int) or self.shared_experts < 0:
            raise ConfigError(f"shared_experts must be a non-negative integer, got {self.shared_experts!r}")
        if (4 * self.width) % (self.top_k + self.shared_experts):
            raise ConfigError(f"the dense hidden size 4 x width = {4 * self.width} does not split into top_k + "
                              f"shared_experts = {self.top_k + self.shared_experts} equal experts")
        if self.moe_layers not in ("all", "every_other") or (self.moe_layers == "every_other" and self.layers < 2):
            raise ConfigError(f"moe_layers must be 'all' or 'every_other' (with at least 2 layers), got "
                              f"{self.moe_layers!r} with {self.layers} layers")
        if not (math.isfinite(self.lr) and self.lr > 0) or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr} and {self.min_lr_ratio}")
        if self.aux_loss < 0 or self.z_loss < 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("aux_loss, z_loss, weight_decay and warmup_steps must not be negative")
        if self.renormalize_through_sum is True and self.top_k < 2:
            raise ConfigError("renormalizing through the sum needs top_k >= 2 (top-1's weight would be p / p = 1, "
                              "no gradient for the router): use the held sum")
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"dtype must be fp32 or bf16, got {self.dtype!r}")

    @property
    def expert_hidden(self) -> int:
        """Each expert's hidden size: the dense MLP's 4 x width split over the experts a byte goes through."""
        return 4 * self.width // (self.top_k + self.shared_experts)

    @property
    def through_sum(self) -> bool:
        """Whether the router's gradient goes through the top-k sum (`renormalize_through_sum`, None resolved)."""
        return self.top_k >= 2 if self.renormalize_through_sum is None else self.renormalize_through_sum

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32


def race_twins(settings: RaceSettings) -> dict[str, GPT2MoEForCausalLM]:
    """The dense model and its iso-FLOP MoE twin, from the same seed (the same embeddings and attention at step 0;
    the MLPs differ in shape, so they start from different draws)."""
    s = settings
    common = dict(vocab_size=VOCAB_SIZE, n_positions=s.context, n_embd=s.width, n_layer=s.layers, n_head=s.heads,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                  attention_implementation="auto")
    torch.manual_seed(s.seed)
    dense = GPT2MoEForCausalLM(GPT2MoEConfig(n_inner=4 * s.width, num_experts=1, num_experts_per_tok=1,
                                             moe_layers=[], **common))
    torch.manual_seed(s.seed)
    moe = GPT2MoEForCausalLM(GPT2MoEConfig(
        n_inner=4 * s.width, moe_intermediate_size=s.expert_hidden, num_experts=s.experts,
        num_experts_per_tok=s.top_k, shared_expert_intermediate_size=s.shared_experts * s.expert_hidden,
        moe_layers=s.moe_layers, router_aux_loss_coef=s.aux_loss, router_z_loss_coef=s.z_loss,
        renormalize_through_sum=s.through_sum, **common))
    return {"dense": dense, "moe": moe}


def matmul_flops_per_token(model: GPT2MoEForCausalLM, context: int) -> float:
    """Forward FLOPs per token of the matrix products: attention projections, attention scores and weighted
    values (causal: on average half the context is visible), each layer's MLP (for a MoE layer: its top-k
    experts and the router), the LM head. Elementwise work (norms, activations, softmax) is left out, as in
    Kaplan et al.'s 2N + attention count."""
    c = model.config
    d = c.n_embd
    total = 0.0
    for block in model.transformer.h:
        total += 2 * d * 3 * d + 2 * d * d  # qkv and output projections
        total += 2 * 2 * d * (context / 2)  # scores and weighted values over the visible keys
        mlp = block.mlp
        experts = getattr(mlp, "experts", None)
        if experts is None:
            total += 2 * 2 * d * mlp.c_fc.nf
        else:  # up and down products of the top-k experts (and the shared one), the router's scores
            total += mlp.top_k * 2 * 2 * d * experts.w_up.shape[-1] + 2 * d * mlp.num_experts
            if mlp.shared_expert is not None:
                total += 2 * 2 * d * mlp.shared_expert.w_up.shape[-1]
    return total + 2 * d * c.vocab_size


@dataclass
class Evaluation:
    """Both contenders' validation loss (nats per byte) per domain at one step (equal tokens)."""

    step: int
    tokens: int
    seconds: dict[str, float]  # each contender's training-step seconds so far
    val: dict[str, dict[str, float]]  # contender -> domain -> loss


@dataclass
class RaceResult:
    settings: dict[str, Any]
    flops_per_token: dict[str, float]
    parameters: dict[str, int]
    evaluations: list[Evaluation] = field(default_factory=list)
    step_seconds: dict[str, list[float]] = field(default_factory=dict)
    test: dict[str, dict[str, float]] = field(default_factory=dict)
    stopped: str = "finished"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def curve(self, contender: str, domain: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, seconds, loss) at every evaluation; loss of one domain, or the mean over domains."""
        tokens = np.array([e.tokens for e in self.evaluations], dtype=float)
        seconds = np.array([e.seconds[contender] for e in self.evaluations], dtype=float)
        losses = [e.val[contender] for e in self.evaluations]
        loss = np.array([v[domain] if domain else float(np.mean(list(v.values()))) for v in losses], dtype=float)
        return tokens, seconds, loss

    def step_cost_ratio(self) -> float:
        """MoE step seconds / dense step seconds: the median of the per-step ratios (each step pair ran
        back to back, so drift cancels), warm-up steps (the first 5) left out."""
        dense, moe = (np.array(self.step_seconds[c][5:] or self.step_seconds[c]) for c in CONTENDERS)
        return float(np.median(moe / dense))

    def at_equal_time(self) -> tuple[float, dict[str, dict[str, float]]]:
        """(seconds, contender -> domain -> loss) at the training seconds the faster contender spent in all:
        its last evaluation, and the slower one's validation loss interpolated between its evaluations at that
        time (before its schedule ended: a conservative reading for the slower one)."""
        finish = min(self.evaluations[-1].seconds[c] for c in CONTENDERS)
        domains = list(self.evaluations[-1].val["dense"])
        out = {}
        for contender in CONTENDERS:
            out[contender] = {}
            for domain in domains:
                _, seconds, loss = self.curve(contender, domain)
                out[contender][domain] = float(np.interp(finish, seconds, loss))
        return finish, out

    def token_exchange_rate(self) -> tuple[int, float] | None:
        """(step, ratio): at the last evaluation whose MoE loss (mean over domains) the dense model reached
        later in this run, the dense tokens needed for that loss over the MoE's. A MoE step costing less than
        `ratio` dense steps is ahead at equal seconds there. None when the dense model never reached a MoE
        loss (the MoE not ahead at all, or only from the last evaluations on)."""
        tokens, _, dense = self.curve("dense")
        _, _, moe = self.curve("moe")
        best = None
        for i in range(1, len(tokens)):
            later = np.nonzero(dense[i:] <= moe[i])[0]
            if len(later) == 0 or moe[i] >= dense[i]:
                continue
            j = i + int(later[0])  # dense crosses the MoE's loss between evaluations j - 1 and j
            fraction = (dense[j - 1] - moe[i]) / (dense[j - 1] - dense[j]) if dense[j - 1] != dense[j] else 1.0
            crossing = tokens[j - 1] + fraction * (tokens[j] - tokens[j - 1])
            best = (self.evaluations[i].step, float(crossing / tokens[i]))
        return best


def evaluate_domains(model: torch.nn.Module, windows: dict[str, torch.Tensor], dtype: torch.dtype,
                     batch_size: int) -> dict[str, float]:
    """Mean next-byte loss (nats per byte) of `model` on each domain's windows (the first byte of a window is
    context only, as in training)."""
    was_training = model.training
    model.eval()
    losses = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype == torch.bfloat16):
        for domain, ids in windows.items():
            total, count = 0.0, 0
            for start in range(0, len(ids), batch_size):
                chunk = ids[start:start + batch_size]
                out = model(input_ids=chunk, labels=chunk)
                lm = getattr(out, "lm_loss", None)
                total += float(lm if lm is not None else out.loss) * chunk.numel()
                count += chunk.numel()
            losses[domain] = total / count
    model.train(was_training)
    return losses


def race_optimizer(model: torch.nn.Module, settings: RaceSettings) -> torch.optim.AdamW:
    """The race's optimizer for one twin: fused AdamW, betas (0.9, 0.95), weight decay on the matrices only
    (the trainer's `optimizer_groups`); `set_race_lr` sets its rate at each step."""
    return torch.optim.AdamW(optimizer_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.95),
                             fused=True)


def set_race_lr(optimizer: torch.optim.Optimizer, step: int, settings: RaceSettings) -> None:
    """The race's learning rate at `step` (warm-up, then cosine to min_lr_ratio x lr over settings.steps)."""
    rate = lr_at(step, lr=settings.lr, min_lr=settings.lr * settings.min_lr_ratio,
                 warmup_steps=settings.warmup_steps, max_steps=settings.steps)
    for group in optimizer.param_groups:
        group["lr"] = rate * group["lr_scale"]


def run_race(settings: RaceSettings, corpus: DomainCorpus,
             on_evaluation: Callable[[Evaluation], None] | None = None,
             should_stop: Callable[[], bool] | None = None, contenders: tuple[str, ...] = CONTENDERS,
             score_test: bool = True) -> tuple[RaceResult, dict[str, GPT2MoEForCausalLM]]:
    """Train both twins `settings.steps` steps on the same batches, taking turns (which one steps first
    alternates), each step timed; evaluate both per domain every `eval_every` steps and at the end; score the
    test split once. Returns the result and the trained models.

    `contenders` ("dense", "moe" or both) trains only those (a recipe sweep trains each seed's dense twin once;
    RaceResult's comparisons need both); `score_test=False` leaves the test split unread (a sweep scores it for
    the recipe chosen on validation only)."""
    settings.check()
    corpus.check(settings.context)
    if not contenders or set(contenders) - set(CONTENDERS):
        raise ConfigError(f"contenders must be some of {CONTENDERS}, got {contenders!r}")
    models = {name: model for name, model in race_twins(settings).items() if name in contenders}
    optimizers, steps = {}, {}
    for name, model in models.items():
        model.train()
        optimizers[name] = race_optimizer(model, settings)
        steps[name] = training_step(model, optimizers[name], settings.torch_dtype)
    result = RaceResult(
        settings=asdict(settings),
        flops_per_token={n: matmul_flops_per_token(m, settings.context) for n, m in models.items()},
        parameters={n: sum(p.numel() for p in m.parameters()) for n, m in models.items()},
        step_seconds={n: [] for n in models},
    )
    val_windows = corpus.split_windows("val", settings.context, settings.eval_windows)
    spent = {name: 0.0 for name in models}

    def evaluate(step: int) -> None:
        val = {n: evaluate_domains(m, val_windows, settings.torch_dtype, settings.batch_size)
               for n, m in models.items()}
        evaluation = Evaluation(step, step * settings.batch_size * settings.context, dict(spent), val)
        result.evaluations.append(evaluation)
        if on_evaluation is not None:
            on_evaluation(evaluation)

    evaluate(0)
    for step in range(settings.steps):
        ids = corpus.train_batch(step, settings.batch_size, settings.context, settings.seed)
        order = tuple(models) if step % 2 == 0 else tuple(models)[::-1]
        for name in order:
            set_race_lr(optimizers[name], step, settings)
            start = time.perf_counter()
            loss = steps[name](ids)
            seconds = time.perf_counter() - start
            if not math.isfinite(loss):
                raise FloatingPointError(f"the {name} model's loss is {loss} at step {step}")
            spent[name] += seconds
            result.step_seconds[name].append(seconds)
        done = step + 1
        if done % settings.eval_every == 0 or done == settings.steps:
            evaluate(done)
        if should_stop is not None and should_stop() and done < settings.steps:
            result.stopped = f"interrupted at step {done}"
            if done % settings.eval_every:
                evaluate(done)
            break
    if score_test:
        result.test = score_on_test(models, settings, corpus)
    return result, models


def score_on_test(models: dict[str, GPT2MoEForCausalLM], settings: RaceSettings,
                  corpus: DomainCorpus) -> dict[str, dict[str, float]]:
    """Each model's loss per domain on the test split (read once, at the end)."""
    test_windows = corpus.split_windows("test", settings.context, settings.test_windows)
    return {n: evaluate_domains(m, test_windows, settings.torch_dtype, settings.batch_size) for n, m in models.items()}
