"""The main job's contest (`flash-experts demo`): a dense model against its upcycle, fine-tuned on MTG card
names at equal compute, on the contest engine (engine.py).

1. the base (hub `gpt2` when the hub answers, else the offline SmolLM2-135M) and the card names, tokenised;
2. the budget: training FLOPs, the same for both (budget.py), from each model's own FLOPs per token; a top-1
   upcycle adds only its routers (well under 1%), so both train the same tokens and every evaluation compares
   them at equal tokens;
3. both fine-tuned by the library's trainer in one process, taking turns step by step on the same batches, every
   step timed: what they learn does not depend on the machine's speed (the same seed gives the same figures to
   the bit, calm or busy), what they cost does and is measured;
4. the routers (step 0 against the end) and the expert atlas of the MoE;
5. the test split scored once (bits per character) and card names sampled from both best checkpoints.

Everything is returned (`UpcyclingOutcome`); `cli/demo.py` prints it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from flash_experts.contest.budget import ComputeBudget, equal_tokens, steps_for_budget
from flash_experts.contest.defaults import DEFAULT_TOKENS, ROUTER_AUX_LOSS_COEF, ROUTER_LR_SCALE
from flash_experts.contest.engine import ContestLog, run_contest
from flash_experts.contest.report import Curve, Spread, exchange_rate, pair_ratios, step_cost
from flash_experts.contest.seeds import check_seeds
from flash_experts.errors import UserError

RUNS = ("dense", "moe")
PLAN_FILE = "plan.json"
# The routing target (issue 26): routers that left uniform, with every expert in use.
TARGET_ENTROPY_RATIO = 0.7
TARGET_MIN_LOAD = 0.05


@dataclass
class UpcyclingSettings:
    """What the main job's contest runs (the defaults: `flash-experts demo`). The MoE fields carry
    MoESettings' names."""

    base: str = "auto"  # "auto" (hub gpt2 if reachable, else smollm2), "smollm2", a hub id or a model folder
    tokens: int = DEFAULT_TOKENS  # the budget, in the dense model's training tokens
    num_experts: int = 4
    num_experts_per_tok: int = 1
    train: str = "all"  # what the MoE fine-tunes: "all" or "moe" (experts and routers only)
    batch_size: int = 8
    block_size: int = 64
    lr: float = 3e-4
    router_lr_scale: float = ROUTER_LR_SCALE
    router_aux_loss_coef: float = ROUTER_AUX_LOSS_COEF
    names: int = 200  # card names sampled from each model and counted
    seed: int = 1337
    dtype: str = "auto"
    wandb: str = "auto"

    def check(self, named: dict[str, str] | None = None) -> None:
        """One UserError naming the first setting that cannot run; `named` maps fields to the words the caller
        gave them (the command line's options), the field's own name otherwise. The one place a main-job setting
        is checked: the trainer's config built from it is valid by construction (run_config)."""
        def word(field: str) -> str:
            return (named or {}).get(field, field)

        def number(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        for name in ("tokens", "num_experts", "num_experts_per_tok", "batch_size", "block_size", "names"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{word(name)} must be >= 1, got {value!r}")
        if self.num_experts < 2:
            raise UserError(f"{word('num_experts')} must be >= 2 for a Mixture of Experts, got {self.num_experts}")
        if self.num_experts_per_tok > self.num_experts:
            raise UserError(f"{word('num_experts_per_tok')} ({self.num_experts_per_tok}) cannot exceed "
                            f"{word('num_experts')} ({self.num_experts})")
        for name, allowed in (("train", ("all", "moe")), ("dtype", ("auto", "fp32", "bf16", "fp16")),
                              ("wandb", ("auto", "online", "offline", "off"))):
            if getattr(self, name) not in allowed:
                raise UserError(f"{word(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("lr", "router_lr_scale"):
            if not (number(getattr(self, name)) and getattr(self, name) > 0):
                raise UserError(f"{word(name)} must be a number > 0, got {getattr(self, name)!r}")
        if not (number(self.router_aux_loss_coef) and self.router_aux_loss_coef >= 0):
            raise UserError(f"{word('router_aux_loss_coef')} must be a number >= 0, got {self.router_aux_loss_coef!r}")
        check_seeds(self.seed, 1, word("seed"))

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size


def prepare_mtg_names(tokenizer: Any, data_dir: Path) -> tuple[str, list[str], list[str], dict[str, Any]]:
    """Tokenise the card names (names-only format) into `data_dir`; returns it, every real name, the test
    split's documents (the card records are loaded this once) and the splits' sizes."""
    from flash_experts.data.tokens import prepare_token_splits
    from flash_experts.mtg.cards import load_mtg_records, mtg_documents

    records = load_mtg_records()
    documents = mtg_documents(records, conditioned=False)
    meta = prepare_token_splits(documents, tokenizer, data_dir, source="mtg: offline packages",
                                data_format="mtg-names", extra_meta={"unique_names": len(records)})
    return str(data_dir), [r.name for r in records], documents["test"], meta["splits"]


def run_config(settings: UpcyclingSettings, base: str, data_dir: str, run_dir: Path, *, moe: bool, steps: int) -> Any:
    """One run's config: the same data, schedule and evaluation for both; the MoE section only for the MoE.
    Evaluation covers the whole validation split, before the first step, half way and at the end. Built as the
    trainer's typed sections from settings already checked (UpcyclingSettings.check), not through a dict."""
    from flash_experts.data.tokens import load_meta
    from flash_experts.training import config as c

    s = settings
    val_tokens = load_meta(data_dir)["splits"]["val"]["tokens"]
    eval_batches = math.ceil(val_tokens / s.block_size / s.batch_size) + 1  # every window, not a sample
    # The sweep's recipe (docs/UPCYCLING.md): exact copies, top-1, routers that learn (their own rate, the Switch
    # balancing loss strong enough to keep every expert in use, their input detached so that neither pulls on
    # the pretrained model below).
    moe_section = c.MoEConfig(num_experts=s.num_experts, num_experts_per_tok=s.num_experts_per_tok,
                              moe_layers="every_other", router_aux_loss_coef=s.router_aux_loss_coef,
                              router_detach_input=True) if moe else None
    return c.TrainConfig(
        run=c.RunConfig(name=run_dir.name, out_dir=str(run_dir), seed=s.seed, precision=s.dtype, quiet=True),
        model=c.ModelConfig(base=base, attention="auto", train=s.train if moe else "all"),
        moe=moe_section,
        data=c.DataConfig(dir=data_dir, block_size=s.block_size, batch_size=s.batch_size),
        optim=c.OptimConfig(lr=s.lr, min_lr=s.lr / 10, warmup_steps=max(1, steps // 10), max_steps=steps,
                            router_lr_scale=s.router_lr_scale if moe else 1.0),
        eval=c.EvalConfig(interval=max(1, steps // 2), batches=eval_batches, keep_best=True),
        checkpoint=c.CheckpointConfig(interval=0, keep_last=1),
        tracking=c.TrackingConfig(wandb=s.wandb, tensorboard=True, log_interval=max(1, min(10, steps // 4))),
    )


def count_flops_per_token(settings: UpcyclingSettings, base: str, data_dir: str, out: Path) -> dict[str, float]:
    """Each contender's training FLOPs per token, counted by the model itself (`model.flops_per_token`), built
    as the trainer builds it and thrown away (the runs build their own from the same seed)."""
    from flash_experts.training.model_setup import build_model, seed_everything

    counts = {}
    for name in RUNS:
        seed_everything(settings.seed)
        model, _ = build_model(run_config(settings, base, data_dir, out / name, moe=name == "moe", steps=1))
        counts[name] = float(model.flops_per_token(settings.block_size, training=True))
        del model
    return counts


def plan_contest(settings: UpcyclingSettings, base: str, data_dir: str, out: Path) -> dict[str, Any]:
    """The budget and each run's steps; saved in out/plan.json, so that --resume continues the same plan
    (and a plan of another shape is refused there)."""
    path = out / PLAN_FILE
    if path.exists():
        try:
            plan = json.loads(path.read_text())
            steps = {name: int(plan["steps"][name]) for name in RUNS}
            flops = {name: float(plan["flops_per_token"][name]) for name in RUNS}
            budget = ComputeBudget(**plan["budget"])
        except (ValueError, KeyError, TypeError) as error:
            raise UserError(f"{path} is not a demo plan of this version ({error}); use another --out") from None
        return {**plan, "steps": steps, "flops_per_token": flops, "budget": budget, "resumed": True}
    flops = count_flops_per_token(settings, base, data_dir, out)
    budget = ComputeBudget.of_tokens(settings.tokens, "dense", flops)
    steps = steps_for_budget(budget, flops, settings.tokens_per_step)
    plan = {"budget": budget, "flops_per_token": flops, "steps": steps, "tokens_per_step": settings.tokens_per_step,
            "equal_tokens": equal_tokens(flops)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**plan, "budget": budget.as_dict()}, indent=1))
    return {**plan, "resumed": False}


class TrainerContender:
    """A Trainer in the contest: one optimizer step per turn (its evaluation, logging and checkpoints follow
    the step but are not timed with it)."""

    def __init__(self, trainer: Any):
        self.trainer = trainer

    @property
    def done(self) -> bool:
        return self.trainer.done

    def step(self, index: int) -> float:
        return self.trainer.advance()


def train_contest(configs: dict[str, Any], resume: bool,
                  stop_requested: Callable[[], bool] | None = None) -> tuple[dict[str, Any], ContestLog]:
    """Both runs in this process, taking turns step by step (engine.py); each run's folder locked while it
    trains. Returns each run's TrainResult and the step times. Ctrl-C finishes the round and saves every
    unfinished run; `resume` continues each from its own folder."""
    import contextlib

    from flash_experts.training import distributed as dist_utils
    from flash_experts.training.config import resolve_device
    from flash_experts.training.run_lock import RunFolderLock
    from flash_experts.training.stop import StopRequest
    from flash_experts.training.trainer import Trainer

    devices = {resolve_device(cfg.run.device) for cfg in configs.values()}
    if len(devices) != 1 or dist_utils.launched_by_torchrun():
        raise UserError("a contest trains its contenders in one process on one device")
    info = dist_utils.init_distributed(devices.pop())
    with contextlib.ExitStack() as held:
        for cfg in configs.values():
            held.enter_context(RunFolderLock(cfg.run.out_dir))
        trainers: dict[str, Any] = {}
        try:
            for name, cfg in configs.items():
                trainers[name] = Trainer(cfg, info, "auto" if resume else None)
            for trainer in trainers.values():
                trainer.begin()
            first = min(trainer.step for trainer in trainers.values())
            with StopRequest() as stop:
                log = run_contest({name: TrainerContender(t) for name, t in trainers.items()}, first_step=first,
                                  should_stop=lambda: stop.requested or bool(stop_requested and stop_requested()))
                if log.stopped != "finished":
                    for trainer in trainers.values():
                        if not trainer.done:
                            trainer.stopped = "interrupted"
            return {name: trainer.end(stop.signal_name) for name, trainer in trainers.items()}, log
        finally:
            for trainer in trainers.values():
                trainer.close()


def best_weights(result: Any) -> str:
    """The run's best checkpoint (its last one where no evaluation improved on step 0)."""
    best = Path(result.run_dir) / "best"
    return str(best if best.exists() else result.checkpoint)


def expert_atlas_of(result: Any, data_dir: str, block_size: int) -> Any:
    """The expert atlas of the MoE's best checkpoint on the validation split (evaluation/expert_atlas.py)."""
    from flash_experts.data.tokens import load_split
    from flash_experts.evaluation.expert_atlas import expert_atlas
    from flash_experts.model.loading import load_model

    model, tokenizer = load_model(best_weights(result))
    model.eval()
    tokens = load_split(data_dir, "val", model.get_input_embeddings().num_embeddings)
    return expert_atlas(model, tokenizer, tokens, context=block_size)


def score_run(result: Any, settings: UpcyclingSettings, data_dir: str, reference_names: list[str],
              test_documents: list[str]) -> dict[str, Any]:
    """Test bits per character (the test split, scored this once) and card names from the best checkpoint."""
    from flash_experts.evaluation.perplexity import split_bits_per_character
    from flash_experts.model.loading import load_model
    from flash_experts.mtg.names import choose_name_sampling, generate_card_names, name_bits_per_character

    model, tokenizer = load_model(best_weights(result))
    model.eval()
    bpc = split_bits_per_character(model, data_dir, "test", test_documents, settings.block_size)
    # the same test names, each scored from the document start the sampled names begin at
    name_bpc = name_bits_per_character(model, tokenizer, test_documents)
    # The temperature is chosen for this model on selection samples of another seed, then the reported names
    # are fresh ones (mtg/names.py choose_name_sampling says why).
    config, chosen, _ = choose_name_sampling(model, tokenizer, reference_names, count=settings.names,
                                             seed=settings.seed)
    # One round of exactly --names samples: every sample counts, duplicates and invalid ones included.
    metrics = generate_card_names(model, tokenizer, settings.names, config=config, reference_names=reference_names,
                                  seed=settings.seed, max_rounds=1, batch_size=settings.names)
    return {"test_bpc": bpc, "name_bpc": name_bpc, "metrics": metrics, "sampling": config, "chosen": chosen is not None}


def validation_curve_of(run_dir: str | Path) -> Curve:
    """A run's validation loss at each evaluation with its training tokens and seconds (from its metrics)."""
    from flash_experts.training.plots import read_metrics, series

    records = read_metrics(run_dir)
    steps, losses = series(records, "val/loss")
    tokens = dict(zip(*(a.tolist() for a in series(records, "train/tokens"))))
    seconds = dict(zip(*(a.tolist() for a in series(records, "train/seconds"))))
    return Curve.of([tokens.get(s, 0.0) for s in steps.tolist()], [seconds.get(s, 0.0) for s in steps.tolist()],
                    losses.tolist())


@dataclass
class UpcyclingOutcome:
    """Everything the main job measured (cli/demo.py prints it)."""

    settings: UpcyclingSettings
    base: str
    why_base: str
    plan: dict[str, Any]
    results: dict[str, Any]  # name -> TrainResult
    log: ContestLog
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    atlas: Any = None
    minutes: float = 0.0
    plot: Path | None = None  # val_vs_compute.png: both runs' validation against the seconds each spent

    @property
    def val_loss_ratio(self) -> float:
        """MoE / dense best validation loss (nats per token): the quality at equal compute."""
        return self.results["moe"].best_val_loss / self.results["dense"].best_val_loss

    @property
    def val_ppl_ratio(self) -> float:
        return self.results["moe"].best_val_ppl / self.results["dense"].best_val_ppl

    # what the verdict across seeds reads (seeds.py SeedResult)
    stopped = "finished"  # an interrupted main job raises instead (run_upcycling_contest): --resume continues it

    @property
    def seed(self) -> int:
        return self.settings.seed

    def compared_loss(self, contender: str) -> float:
        """The main job compares each run's best validation loss at equal compute."""
        return self.results[contender].best_val_loss

    def step_pairs(self) -> list[float]:
        return pair_ratios(self.log.step_seconds.get("dense", []), self.log.step_seconds.get("moe", []))

    def exchange(self) -> float | None:
        return self.exchange_rate()

    def step_cost(self) -> Spread | None:
        """A MoE step's seconds over a dense step's, pair by pair (None when no pair ran: a resumed finished job)."""
        dense, moe = self.log.step_seconds.get("dense", []), self.log.step_seconds.get("moe", [])
        return step_cost(dense, moe) if min(len(dense), len(moe)) else None

    def exchange_rate(self) -> float | None:
        """How many dense tokens the MoE's result was worth, per MoE token (report.py); None if never."""
        found = exchange_rate(validation_curve_of(self.results["dense"].run_dir),
                              validation_curve_of(self.results["moe"].run_dir))
        return None if found is None else found[1]

    def summary(self) -> dict[str, Any]:
        """The figures a seed contributes (saved as summary.json beside the runs)."""
        cost = self.step_cost()
        return {
            "seed": self.settings.seed, "base": self.base,
            "best_val_loss": {n: self.results[n].best_val_loss for n in RUNS},
            "best_val_ppl": {n: self.results[n].best_val_ppl for n in RUNS},
            "test_bpc": {n: self.scores[n]["test_bpc"] for n in RUNS} if self.scores else {},
            "name_bpc": {n: self.scores[n]["name_bpc"] for n in RUNS} if self.scores else {},
            "steps": {n: self.results[n].steps for n in RUNS}, "tokens": {n: self.results[n].tokens for n in RUNS},
            "train_seconds": {n: self.results[n].train_seconds for n in RUNS},
            "step_cost": asdict(cost) if cost else None, "exchange_rate": self.exchange_rate(),
            "budget": self.plan["budget"].as_dict(), "flops_per_token": self.plan["flops_per_token"],
        }


def seed_folders(out: Path, first_seed: int, seeds: int) -> dict[int, Path]:
    """Each seed's folder: `out` itself for one seed, out/seed-N for several (the seeds checked first: a count
    of 10^9 would list as many)."""
    check_seeds(first_seed, seeds)
    if seeds == 1:
        return {first_seed: out}
    return {seed: out / f"seed-{seed}" for seed in range(first_seed, first_seed + seeds)}


def check_folders(out: Path, folders: dict[int, Path], resume: bool) -> None:
    """Never overwrite an earlier run; never start fresh where `resume` was asked for (one UserError)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    for folder in folders.values():
        earlier = [folder / name for name in (*RUNS, PLAN_FILE, "run") if (folder / name).exists()]
        if earlier and not resume:
            raise UserError(f"{earlier[0]} already holds a run: pass --resume to continue it, or another --out")
    if resume and not any((folder / PLAN_FILE).exists() for folder in folders.values()):
        raise UserError(f"nothing to resume in {out}: it holds no demo plan ({PLAN_FILE})")


def run_upcycling_contest(settings: UpcyclingSettings, out: Path, resume: bool = False,
                          say: Callable[[str], None] = print, score: bool = True) -> UpcyclingOutcome:
    """The main job, stage by stage (`say` gets one line per stage); `score=False` stops after training and
    the routers (a seed sweep scores only what it compares)."""
    from flash_experts.model.loading import base_tokenizer, choose_base

    settings.check()
    started = time.perf_counter()
    base, why = choose_base(settings.base)
    say(f"[1/6] base model: {base} ({why})")
    tokenizer = base_tokenizer(base)
    say("[2/6] preparing MTG card names with the base's tokenizer")
    data_dir, reference_names, test_documents, splits = prepare_mtg_names(tokenizer, out / "data")
    say("      " + ", ".join(f"{split} {info['documents']:,d} names / {info['tokens']:,d} tokens"
                             for split, info in splits.items()))
    plan = plan_contest(settings, base, data_dir, out)
    flops, steps = plan["flops_per_token"], plan["steps"]
    budget: ComputeBudget = plan["budget"]
    say(f"[3/6] equal compute: {budget.flops:.3g} training FLOPs each ({'the plan of the earlier run, ' if plan['resumed'] else ''}"
        f"the dense model's {budget.reference_tokens:,} tokens); training FLOPs per token: dense "
        f"{flops['dense'] / 1e9:.3f}G, MoE {flops['moe'] / 1e9:.3f}G ({flops['moe'] / flops['dense']:.4f}x) -> "
        f"dense {steps['dense']} steps, MoE {steps['moe']} steps"
        + (" (equal tokens: their FLOPs per token agree within 1%)" if plan.get("equal_tokens") else ""))
    say(f"[4/6] fine-tuning the dense model and its upcycle to {settings.num_experts} experts "
        f"(top-{settings.num_experts_per_tok}, every other layer, exact copies), taking turns on the same batches")
    configs = {name: run_config(settings, base, data_dir, out / name, moe=name == "moe", steps=steps[name])
               for name in RUNS}
    results, log = train_contest(configs, resume)
    for name, result in results.items():
        if result.stopped == "interrupted":  # Ctrl-C: every unfinished run saved its checkpoint
            raise UserError(f"interrupted at dense step {results['dense'].steps}, MoE step {results['moe'].steps} "
                            "(checkpoints saved); run the same command with --resume to continue")
        if result.best_val_ppl is None:
            raise UserError(f"the {name} run stopped ({result.stopped}) before its first evaluation; run again "
                            "with --resume")
    outcome = UpcyclingOutcome(settings, base, why, plan, results, log)
    outcome.plot = plot_validation_against_seconds(out, base)
    say("[5/6] the routers on the validation split: step 0 against the end, and what each expert took")
    outcome.atlas = expert_atlas_of(results["moe"], data_dir, settings.block_size)
    save_routing(results["moe"], outcome.atlas)
    if score:
        say(f"[6/6] test split (scored once) and {settings.names} card names from each best checkpoint")
        outcome.scores = {name: score_run(results[name], settings, data_dir, reference_names, test_documents)
                          for name in RUNS}
    outcome.minutes = (time.perf_counter() - started) / 60
    (out / "summary.json").write_text(json.dumps(outcome.summary(), indent=1))
    return outcome


def plot_validation_against_seconds(out: Path, base: str) -> Path:
    """val_vs_compute.png in `out`: each run's validation perplexity against the seconds it really spent."""
    from flash_experts.contest.plots import plot_validation_vs_compute, validation_curve

    curves = {label: validation_curve(out / name) for label, name in (("dense", "dense"), ("MoE", "moe"))}
    return plot_validation_vs_compute(curves, out / "val_vs_compute.png",
                                      f"MTG card names, {Path(base).name} base, equal FLOPs")


def save_routing(moe: Any, atlas: Any) -> None:
    """The routers' figures (step 0 and the end) and the expert atlas, as JSON in the MoE's run folder (the
    studio reads the atlas)."""
    from flash_experts.evaluation.expert_atlas import ATLAS_FILE

    run_dir = Path(moe.run_dir)
    (run_dir / "routing.json").write_text(json.dumps({name: routing.as_dict() if routing else None for name, routing
                                                      in (("initial", moe.initial_routing),
                                                          ("final", moe.final_routing))}, indent=1))
    (run_dir / ATLAS_FILE).write_text(json.dumps(atlas.as_dict(), indent=1))


def routing_target_met(final_summary: dict[str, float]) -> bool:
    """Routers that left uniform (entropy <= TARGET_ENTROPY_RATIO ln E) with every expert in use (none under
    TARGET_MIN_LOAD of its layer's tokens)."""
    return final_summary["entropy_ratio"] <= TARGET_ENTROPY_RATIO and final_summary["load_min"] >= TARGET_MIN_LOAD


def routing_lines(moe: Any, atlas: Any) -> list[str]:
    """How the MoE's routers moved (validation split, means over the MoE layers, step 0 against the last
    evaluation), whether they met the target, and the expert atlas, one line per layer: what the demo and the
    example scripts print."""
    start = moe.initial_routing.summary() if moe.initial_routing else None
    end = moe.final_routing.summary() if moe.final_routing else {}
    lines = ["  the routers on the validation split, step 0 -> end (means over the MoE layers):"]
    for key, label in (("entropy_ratio", "routing entropy / ln E"), ("top1_prob", "top-1 probability"),
                       ("load_min", "least used expert's share (any layer)"),
                       ("load_max", "most used expert's share (any layer)"),
                       ("expert_distance", "experts' relative distance")):
        before = "n/a (resumed)" if start is None else f"{start[key]:.3f}"
        after = f"{end[key]:.3f}" if end else "n/a (no evaluation in this invocation)"
        lines.append(f"    {label:<38} {before} -> {after}")
    if end:
        lines.append(f"    target (entropy <= {TARGET_ENTROPY_RATIO} ln E, no expert under {TARGET_MIN_LOAD:.0%}): "
                     f"{'met' if routing_target_met(end) else 'not met'}")
    lines.append(f"  expert atlas ({atlas.tokens:,} validation tokens; each expert's share of its layer, then its two "
                 f"tokens of highest lift, routed there at least {atlas.min_count} times):")
    lines += ["    " + layer.line() for layer in atlas.layers]
    run_dir = Path(moe.run_dir)
    lines.append(f"  routing and atlas saved in {run_dir} (the studio shows the atlas: flash-experts studio "
                 f"{run_dir / 'best'} --run {run_dir})")
    return lines
