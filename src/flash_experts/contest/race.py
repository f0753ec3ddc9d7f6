"""The from-scratch race: a small dense GPT and its iso-FLOP Mixture-of-Experts twin, trained from random weights
on the same bytes, taking turns in one process (`flash-experts race`), on the contest engine (engine.py).

Upcycling cannot show what a MoE buys within minutes (docs/UPCYCLING.md): the published wins come after ~10% of
the dense model's pretraining. From scratch, at the same FLOPs per token, a MoE learns more per token even at
small sizes (Switch Transformer). The twins here differ only in their MLPs: the dense model's has hidden size
4d; the MoE's has E experts of hidden 4d/k and each byte goes to k of them, so a token's MLP arithmetic is the
same (`model.flops_per_token` says by how much the routers add: well under the budget's 1%) while the MoE holds
E/k times the MLP weights.

Both train on the same batch at every step (a batch is a function of seed and step), with the trainer's
optimizer and learning-rate schedule over the same number of steps, so every evaluation compares them at
equal tokens (equal FLOPs) exactly. Their training steps are timed as they run, turn by turn (a slow minute of
the machine slows both), so the report (report.py) also says where each stood at equal seconds, what a MoE
step costs, and whether the MoE's per-token lead pays per second.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from flash_experts.contest.engine import run_contest
from flash_experts.contest.report import Curve, Spread, at_equal_seconds, exchange_rate, pair_ratios, step_cost
from flash_experts.data.domains import VOCAB_SIZE, DomainCorpus
from flash_experts.errors import ConfigError
from flash_experts.model import GPT2MoEConfig, GPT2MoEForCausalLM
from flash_experts.model.config import validate_moe_fields
from flash_experts.model.moe import MoESettings
from flash_experts.training.config import OptimConfig
from flash_experts.training.gradient_sync import GradientSync
from flash_experts.training.model_setup import optimizer_groups
from flash_experts.training.optimizer import build_adamw, set_scheduled_lr
from flash_experts.training.processes import ProcessLayout
from flash_experts.training.steps import training_step

CONTENDERS = ("dense", "moe")
TARGET_RATIO = 0.98  # issue 28: the MoE's validation loss at most 0.98x the dense model's, every domain
TRAIN_BYTES, EVAL_BYTES = 4_000_000, 262_144  # per domain
# `flash-experts race --quick`: tiny twins, a minute
QUICK = dict(width=64, layers=2, heads=2, context=64, batch_size=12, num_experts=4, num_experts_per_tok=2, steps=60,
             eval_every=20, warmup_steps=6, eval_windows=16, test_windows=32)
QUICK_TRAIN_BYTES = 300_000


@dataclass
class RaceSettings:
    """The twins' shapes and the training both get (the defaults: the race `flash-experts race` runs). The MoE
    fields carry MoESettings' names (model/moe.py) and are validated by the same rules as every model config."""

    width: int = 256
    layers: int = 4
    heads: int = 4
    context: int = 128
    batch_size: int = 32
    num_experts: int = 8
    # each expert's hidden size is 4 * width / (num_experts_per_tok + shared_experts): finer = more, smaller experts
    num_experts_per_tok: int = 2
    shared_experts: int = 0  # experts every byte goes to, beside its routed ones (DeepSeekMoE), each of that size
    moe_layers: str = "all"  # "all" or "every_other" (layers 1, 3, ...; the others keep the dense MLP)
    router_aux_loss_coef: float = 0.01  # Switch load-balancing loss weight
    router_z_loss_coef: float = 0.001  # ST-MoE router z-loss weight
    # the top-k weights' renormalising sum differentiated (HF Mixtral's router gradient) or held constant (the
    # Switch gradient, the library's default): model/moe.py `MoESettings.renormalize_through_sum`. None: through
    # the sum for top-k >= 2, chosen on validation at three seeds (docs/FROM_SCRATCH.md: the MoE's lead over the
    # dense twin grew 0.2-3%), held for top-1 (p / p = 1 has no gradient).
    renormalize_through_sum: bool | None = None
    steps: int = 800
    lr: float = 2e-3
    # the MoE twin's own peak rate (a fair race tunes both contenders: issue 42); None: `lr`, as the dense twin's
    moe_lr: float | None = None
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    eval_every: int = 50
    eval_windows: int = 96  # validation windows per domain at each evaluation
    test_windows: int = 384  # test windows per domain, scored once at the end
    seed: int = 1337
    # the batches' order; None: the seed's. Set apart from the seed, it tells what of a seed's result comes from
    # the weights it draws and what from the data order (docs/FROM_SCRATCH.md, "What decides the sign")
    data_seed: int | None = None
    dtype: str = "bf16"  # "fp32" or "bf16" (autocast)
    # a LayerNorm on each head's queries and keys, both twins (GPT2MoEConfig.qk_norm; docs/FROM_SCRATCH.md)
    qk_norm: bool = False

    def check(self, named: dict[str, str] | None = None) -> None:
        """One ConfigError naming the first setting that cannot run; `named` maps fields to the words the caller
        gave them (the command line's options), the field's own name otherwise."""
        from flash_experts.contest.seeds import check_seeds

        def word(field: str) -> str:
            return (named or {}).get(field, field)

        check_seeds(self.seed, 1, word("seed"))
        if self.data_seed is not None:
            check_seeds(self.data_seed, 1, word("data_seed"))
        positive = ("width", "layers", "heads", "context", "batch_size", "steps", "eval_every", "eval_windows",
                    "test_windows")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{word(name)} must be a positive integer, got {getattr(self, name)!r}")
        if self.width % self.heads:
            raise ConfigError(f"width {self.width} is not divisible by heads {self.heads}")
        if not isinstance(self.shared_experts, int) or self.shared_experts < 0:
            raise ConfigError(f"shared_experts must be a non-negative integer, got {self.shared_experts!r}")
        if self.moe_layers not in ("all", "every_other") or (self.moe_layers == "every_other" and self.layers < 2):
            raise ConfigError(f"moe_layers must be 'all' or 'every_other' (with at least 2 layers), got "
                              f"{self.moe_layers!r} with {self.layers} layers")
        validate_moe_fields(self.moe_settings(unchecked=True), self.layers)
        if (4 * self.width) % (self.num_experts_per_tok + self.shared_experts):
            raise ConfigError(f"the dense hidden size 4 x width = {4 * self.width} does not split into "
                              f"num_experts_per_tok + shared_experts = {self.num_experts_per_tok + self.shared_experts}"
                              " equal experts")
        if not (math.isfinite(self.lr) and self.lr > 0) or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr} and {self.min_lr_ratio}")
        if self.moe_lr is not None and not (math.isfinite(self.moe_lr) and self.moe_lr > 0):
            raise ConfigError(f"{word('moe_lr')} must be > 0, got {self.moe_lr}")
        if self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("weight_decay and warmup_steps must not be negative")
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"dtype must be fp32 or bf16, got {self.dtype!r}")

    @property
    def expert_hidden(self) -> int:
        """Each expert's hidden size: the dense MLP's 4 x width split over the experts a byte goes through."""
        return 4 * self.width // (self.num_experts_per_tok + self.shared_experts)

    @property
    def through_sum(self) -> bool:
        """Whether the router's gradient goes through the top-k sum (`renormalize_through_sum`, None resolved)."""
        if self.renormalize_through_sum is None:
            return self.num_experts_per_tok >= 2
        return self.renormalize_through_sum

    def moe_settings(self, unchecked: bool = False) -> MoESettings:
        """The MoE twin's MoESettings (checked first, unless `unchecked`: `check` validates them itself)."""
        if not unchecked:
            self.check()
        return MoESettings(
            num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok, moe_layers=self.moe_layers,
            router_aux_loss_coef=self.router_aux_loss_coef, router_z_loss_coef=self.router_z_loss_coef,
            renormalize_through_sum=self.through_sum, moe_intermediate_size=self.expert_hidden,
            shared_expert_intermediate_size=self.shared_experts * self.expert_hidden)

    def optim(self, twin: str = "dense") -> OptimConfig:
        """The trainer's optimizer settings for one twin: AdamW, betas (0.9, 0.95), warm-up then cosine to
        min_lr_ratio x its peak rate over the race's steps (the MoE's own `moe_lr` where set)."""
        lr = self.moe_lr if twin == "moe" and self.moe_lr is not None else self.lr
        return OptimConfig(lr=lr, min_lr=lr * self.min_lr_ratio, weight_decay=self.weight_decay,
                           betas=(0.9, 0.95), warmup_steps=self.warmup_steps, max_steps=self.steps)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

    def recipe_words(self) -> str:
        """The MoE twin in words: "8 experts of 512, top-2, every layer, Mixtral router gradient"."""
        shared = f" + {self.shared_experts} shared" if self.shared_experts else ""
        where = "every layer" if self.moe_layers == "all" else "every other layer"
        gradient = "Mixtral" if self.through_sum else "Switch"  # the top-k sum differentiated, or held
        return (f"{self.num_experts} experts of {self.expert_hidden}, top-{self.num_experts_per_tok}{shared}, "
                f"{where}, {gradient} router gradient")


def race_twins(settings: RaceSettings) -> dict[str, GPT2MoEForCausalLM]:
    """The dense model and its iso-FLOP MoE twin, from the same seed (the same embeddings and attention at step 0;
    the MLPs differ in shape, so they start from different draws)."""
    s = settings
    common = dict(vocab_size=VOCAB_SIZE, n_positions=s.context, n_embd=s.width, n_layer=s.layers, n_head=s.heads,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                  attention_implementation="auto", qk_norm=s.qk_norm)
    torch.manual_seed(s.seed)
    dense = GPT2MoEForCausalLM(GPT2MoEConfig(n_inner=4 * s.width, num_experts=1, num_experts_per_tok=1,
                                             moe_layers=[], **common))
    torch.manual_seed(s.seed)
    moe = GPT2MoEForCausalLM(GPT2MoEConfig(n_inner=4 * s.width, **asdict(s.moe_settings()), **common))
    return {"dense": dense, "moe": moe}


def race_optimizer(model: torch.nn.Module, settings: RaceSettings, twin: str = "dense") -> torch.optim.AdamW:
    """A twin's optimizer: the trainer's AdamW (training/optimizer.py `build_adamw`) with its weight-decay
    groups (matrices only)."""
    return build_adamw(optimizer_groups(model, settings.weight_decay), settings.optim(twin))


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
    flops_per_token: dict[str, float]  # training FLOPs per token (model.flops_per_token, training=True)
    parameters: dict[str, int]
    evaluations: list[Evaluation] = field(default_factory=list)
    step_seconds: dict[str, list[float]] = field(default_factory=dict)
    test: dict[str, dict[str, float]] = field(default_factory=dict)
    stopped: str = "finished"
    atlas: Any = None  # which experts took which domain (race_report.py `race_seed`); saved beside, as domain_atlas

    def as_dict(self) -> dict[str, Any]:
        plain = asdict(replace(self, atlas=None))  # the atlas is saved on its own (race.json's domain_atlas)
        del plain["atlas"]
        return plain

    # what the verdict across seeds reads (seeds.py SeedResult)
    @property
    def seed(self) -> int:
        return self.settings["seed"]

    def compared_loss(self, contender: str) -> float:
        """The race compares validation loss at equal tokens, mean over domains, at the last evaluation."""
        return self.final_mean_loss(contender)

    def step_pairs(self) -> list[float]:
        return pair_ratios(self.step_seconds["dense"], self.step_seconds["moe"])

    def exchange(self) -> float | None:
        found = self.token_exchange_rate()
        return None if found is None else found[1]

    def curve(self, contender: str, domain: str | None = None) -> Curve:
        """Tokens, seconds and loss at every evaluation; loss of one domain, or the mean over domains."""
        losses = [e.val[contender] for e in self.evaluations]
        return Curve.of([e.tokens for e in self.evaluations], [e.seconds[contender] for e in self.evaluations],
                        [v[domain] if domain else float(np.mean(list(v.values()))) for v in losses])

    def step_cost(self) -> Spread:
        """MoE step seconds / dense step seconds over the step pairs (report.py `step_cost`)."""
        return step_cost(self.step_seconds["dense"], self.step_seconds["moe"])

    def at_equal_time(self) -> tuple[float, dict[str, dict[str, float]]]:
        """(seconds, contender -> domain -> loss) at the training seconds the faster contender spent in all
        (report.py `at_equal_seconds`, domain by domain)."""
        finish, out = 0.0, {c: {} for c in CONTENDERS}
        for domain in self.evaluations[-1].val["dense"]:
            finish, losses = at_equal_seconds({c: self.curve(c, domain) for c in CONTENDERS})
            for contender, loss in losses.items():
                out[contender][domain] = loss
        return finish, out

    def token_exchange_rate(self) -> tuple[int, float] | None:
        """(step, rate) on the mean over domains (report.py `exchange_rate`); None when the dense model never
        reached a loss the MoE had."""
        found = exchange_rate(self.curve("dense"), self.curve("moe"))
        return None if found is None else (self.evaluations[found[0]].step, found[1])

    def final_mean_loss(self, contender: str) -> float:
        """The contender's validation loss at the last evaluation, mean over domains."""
        return float(np.mean(list(self.evaluations[-1].val[contender].values())))


def evaluate_domains(model: torch.nn.Module, windows: dict[str, torch.Tensor], dtype: torch.dtype,
                     batch_size: int) -> dict[str, float]:
    """Mean next-byte loss (nats per byte) of `model` on each domain's windows (the first byte of a window is
    context only, as in training)."""
    from flash_experts.training.evaluation import mean_next_token_loss

    autocast = functools.partial(torch.autocast, "cpu", dtype=dtype, enabled=dtype == torch.bfloat16)
    return {domain: mean_next_token_loss(model, (ids[start:start + batch_size] for start in range(0, len(ids),
                                                                                                  batch_size)), autocast)
            for domain, ids in windows.items()}


class TwinContender:
    """One twin in the contest: its optimizer and the race's schedule, a training step on the race's batch of
    the step, timed alone."""

    def __init__(self, name: str, model: torch.nn.Module, settings: RaceSettings,
                 batch: Callable[[int], torch.Tensor], sync: GradientSync | None = None):
        self.name, self.model, self.settings, self.batch = name, model, settings, batch
        self.optim = settings.optim(name)
        model.train()
        self.optimizer = race_optimizer(model, settings, name)
        self.train_step = training_step(model, self.optimizer, settings.torch_dtype, sync)
        self.steps_done = 0
        self.seconds = 0.0

    @property
    def done(self) -> bool:
        return self.steps_done >= self.settings.steps

    def step(self, index: int) -> float:
        set_scheduled_lr(self.optimizer, index, self.optim)
        ids = self.batch(index)
        start = time.perf_counter()
        loss = self.train_step(ids)
        seconds = time.perf_counter() - start
        if not math.isfinite(loss):
            raise FloatingPointError(f"the {self.name} model's loss is {loss} at step {index}")
        self.steps_done += 1
        self.seconds += seconds
        return seconds


def run_race(settings: RaceSettings, corpus: DomainCorpus,
             on_evaluation: Callable[[Evaluation], None] | None = None,
             should_stop: Callable[[], bool] | None = None, contenders: tuple[str, ...] = CONTENDERS,
             score_test: bool = True, processes: ProcessLayout = ProcessLayout()) -> tuple[RaceResult, dict[str, GPT2MoEForCausalLM]]:
    """Train both twins `settings.steps` steps on the same batches, taking turns (engine.py: which one steps
    first alternates), each step timed; evaluate both per domain every `eval_every` steps and at the end; score
    the test split once. Returns the result and the trained models.

    `contenders` ("dense", "moe" or both) trains only those (a recipe sweep trains each seed's dense twin once;
    RaceResult's comparisons need both); `score_test=False` leaves the test split unread (a sweep scores it for
    the recipe chosen on validation only). `processes`: several processes running this race together (each
    evaluates every window, so that the MoE's exchanges pair up); the figures are the one-process race's."""
    settings.check()
    processes.check(settings.num_experts, settings.batch_size)
    corpus.check(settings.context)
    if not contenders or set(contenders) - set(CONTENDERS):
        raise ConfigError(f"contenders must be some of {CONTENDERS}, got {contenders!r}")
    models = {name: model for name, model in race_twins(settings).items() if name in contenders}
    result = RaceResult(  # counted on whole models, before any process keeps only some experts
        settings=asdict(settings),
        flops_per_token={n: m.flops_per_token(settings.context, training=True) for n, m in models.items()},
        parameters={n: sum(p.numel() for p in m.parameters()) for n, m in models.items()},
    )
    # one batch per step, the same tensor for both twins (this process's share of it)
    batch = functools.lru_cache(maxsize=1)(
        lambda step: processes.share(corpus.train_batch(step, settings.batch_size, settings.context,
                                                        settings.seed if settings.data_seed is None
                                                        else settings.data_seed)))
    # what averages each twin's gradients over the processes (nothing in one; the MoE's experts split over
    # groups of processes.expert_parallel, the rest averaged by hand)
    twins = {name: TwinContender(name, model, settings, batch, processes.gradient_sync(
                 model, experts=processes.split_experts(model) if name == "moe" else None))
             for name, model in models.items()}
    val_windows = corpus.split_windows("val", settings.context, settings.eval_windows)

    def evaluate(step: int) -> None:
        val = {n: evaluate_domains(m, val_windows, settings.torch_dtype, settings.batch_size)
               for n, m in models.items()}
        evaluation = Evaluation(step, step * settings.batch_size * settings.context,
                                {n: t.seconds for n, t in twins.items()}, val)
        result.evaluations.append(evaluation)
        if on_evaluation is not None:
            on_evaluation(evaluation)

    def after_round(done: int) -> None:
        if done % settings.eval_every == 0 or done == settings.steps:
            evaluate(done)

    evaluate(0)
    log = run_contest(twins, after_round=after_round, should_stop=should_stop)
    result.step_seconds, result.stopped = log.step_seconds, log.stopped
    done = min(t.steps_done for t in twins.values())
    if result.evaluations[-1].step != done:  # interrupted between evaluations: one where it stopped
        evaluate(done)
    if score_test:
        result.test = score_on_test(models, settings, corpus)
    return result, models


def score_on_test(models: dict[str, GPT2MoEForCausalLM], settings: RaceSettings,
                  corpus: DomainCorpus) -> dict[str, dict[str, float]]:
    """Each model's loss per domain on the test split (read once, at the end)."""
    test_windows = corpus.split_windows("test", settings.context, settings.test_windows)
    return {n: evaluate_domains(m, test_windows, settings.torch_dtype, settings.batch_size) for n, m in models.items()}


def build_corpus(out: Path, quick: bool, save: bool = True) -> DomainCorpus:
    """prose, code, names: the offline sources, as byte streams saved under out/ (rebuilt each run: a minute;
    `save=False`: not written, for every process of a race but the first)."""
    from flash_experts.data.domains import python_source_documents
    from flash_experts.data.text import wikipedia_documents
    from flash_experts.mtg.cards import load_offline_mtg, mtg_documents

    documents = {"prose": wikipedia_documents(), "code": python_source_documents(),
                 "names": mtg_documents(load_offline_mtg())}
    limits = {"train": QUICK_TRAIN_BYTES if quick else TRAIN_BYTES, "val": EVAL_BYTES, "test": EVAL_BYTES}
    corpus = DomainCorpus.from_documents(documents, limits)
    if save:
        corpus.save(out)
    return corpus
