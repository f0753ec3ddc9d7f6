"""The training loop: `train(cfg) -> TrainResult`.

One loop serves fine-tuning (an upcycled MoE, or a dense model), pretraining from scratch, one process or
many (torchrun + DDP). What it guarantees:

- exact resume: a run stopped at step k and resumed reproduces the uninterrupted run's losses, because the
  batches are a function of (seed, step) (see data.py), and the optimizer, scaler and RNG states are saved;
- the global batch (batch_size x grad_accum x world_size windows) defines the run, not the process count:
  2 processes x 1 micro-batch follow the same curve as 1 process x 2 micro-batches;
- a NaN/inf loss stops before the optimizer step, naming the step; nothing bad is saved;
- SIGINT/SIGTERM finish the current step, save a checkpoint and exit cleanly (a second Ctrl-C stops at once);
- parameters stay fp32; bf16/fp16 are autocast dtypes only (fp16 with a GradScaler, on CUDA).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flash_experts.data.tokens import load_split
from flash_experts.errors import UserError
from flash_experts.model.routing import SplitRouting, SplitRoutingTally, expert_distances
from flash_experts.training import checkpoint as ckpt
from flash_experts.training import distributed as dist_utils
from flash_experts.training.compile import compile_fail_safe
from flash_experts.training.config import TrainConfig, config_to_dict, resolve_device, resolve_precision, save_config
from flash_experts.training.data import EvalBatches, TrainBatches
from flash_experts.training.evaluation import next_token_loss_sums
from flash_experts.training.expert_parallel import ExpertParallelTraining, check_expert_parallel_run
from flash_experts.training.model_setup import build_model, prepare_for_training, read_meta, seed_everything
from flash_experts.training.optimizer import set_scheduled_lr
from flash_experts.training.processes import ProcessLayout
from flash_experts.training.run_lock import RunFolderLock
from flash_experts.training.steps import NonFiniteStep, optimizer_step
from flash_experts.training.stop import StopRequest


class TrainingDiverged(UserError):
    """The loss (or gradient) became NaN/inf; the run stopped without saving the bad state."""


class LostAProcess(UserError):
    """A collective failed because another process of the run died (killed, out of memory, its node gone)."""


def _lost_a_process(error: RuntimeError) -> bool:
    """Whether a collective's error says that a peer went away: torch's DistError (NCCL's, the timeouts) or
    gloo's transport error, which comes as a plain RuntimeError naming the closed connection."""
    import torch.distributed as dist

    message = str(error)
    return isinstance(error, getattr(dist, "DistError", ())) or any(
        words in message for words in ("Connection closed by peer", "Connection reset by peer", "Timed out"))


def _first_sentence(error: RuntimeError) -> str:
    message = " ".join(str(error).split())
    return message.split(". ")[0][:300]


@dataclass
class TrainResult:
    run_dir: str
    steps: int  # optimizer steps completed, counting those before a resume
    tokens: int  # training tokens seen, all ranks
    seconds: float  # wall time of this invocation
    final_val_loss: float | None
    final_val_ppl: float | None
    best_val_loss: float | None
    best_val_ppl: float | None
    best_step: int | None
    stopped: str  # "completed" | "early_stopping" | "interrupted"
    checkpoint: str | None  # the newest checkpoint written or resumed from
    initial_val_loss: float | None = None  # before the first step (the base model's), when this run started at 0
    initial_val_ppl: float | None = None
    losses: dict[int, float] = field(default_factory=dict)  # step (1-based) -> training objective, this invocation
    # the training steps' own wall time, this invocation (no evaluation, checkpoint or start-up)
    step_seconds: float = 0.0
    # the same over the whole run, resumed parts included: the realized compute that equal compute compares
    train_seconds: float = 0.0
    # routing on the validation windows (model/routing.py SplitRouting): before the first step (when this run
    # started at 0) and at the last evaluation; None for a dense model
    initial_routing: SplitRouting | None = None
    final_routing: SplitRouting | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v.as_dict() if isinstance(v, SplitRouting) else v for k, v in self.__dict__.items()
                if k != "losses"}


def routing_metrics(routing: SplitRouting | None) -> dict[str, float]:
    """The tracked numbers of one evaluation's routing: per MoE layer, and their means over the layers."""
    if routing is None or routing.is_empty:
        return {}
    metrics = {f"router/{name}": value for name, value in routing.summary().items()}
    for row in routing.layers:
        metrics.update({
            f"router/entropy_ratio/layer_{row.layer}": row.entropy_ratio,
            f"router/top1_prob/layer_{row.layer}": row.top1_prob,
            f"router/load_min/layer_{row.layer}": min(row.load),
            f"router/load_max/layer_{row.layer}": max(row.load),
            f"router/expert_distance/layer_{row.layer}": row.expert_distance,
        })
    return metrics


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else float("inf")  # exp overflows a float past ~709


# --------------------------------------------------------------------------------------------------- trainer


def train(cfg: TrainConfig, resume: str | None = None) -> TrainResult:
    """Train as `cfg` says; `resume` = a checkpoint/run folder, or "auto" (latest in cfg.run.out_dir, if any)."""
    info = dist_utils.init_distributed(resolve_device(cfg.run.device))
    try:
        with contextlib.ExitStack() as held:
            # Rank 0 writes the run folder: it holds the folder's lock before anything reads or writes it
            # (resume, recovery of interrupted saves, metrics), and every rank learns whether it got it.
            lock_error = None
            if info.is_main:
                try:
                    held.enter_context(RunFolderLock(cfg.run.out_dir))
                except UserError as error:
                    lock_error = error
            if any(dist_utils.gather_objects(lock_error is not None)):
                raise lock_error or UserError(f"{cfg.run.out_dir} is in use by another run")
            trainer = Trainer(cfg, info, resume)
            try:
                result = trainer.run()
            except RuntimeError as error:
                if info.enabled and _lost_a_process(error):
                    raise LostAProcess(
                        f"another process of this {info.world_size}-process run stopped ({_first_sentence(error)}); "
                        f"the last checkpoint is {trainer.last_checkpoint or 'not written yet'}: run the same "
                        "command with --resume auto") from None
                raise
            finally:
                trainer.close()
            del trainer  # free the DDP reducer while the process group it uses is still alive
            dist_utils.barrier()  # no rank tears down while another still talks to it
            return result
    finally:
        dist_utils.teardown()


class Trainer:
    def __init__(self, cfg: TrainConfig, info: dist_utils.DistInfo, resume: str | None) -> None:
        self.cfg, self.info = cfg, info
        self.run_dir = Path(cfg.run.out_dir)
        self.device = info.device
        self.device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        self.precision = resolve_precision(cfg.run.precision, self.device_type)
        seed_everything(cfg.run.seed + info.rank)  # rank 0 builds the weights DDP broadcasts
        self.tracker = None

        # Fail early, before loading a model, when the data folder or the checkpoint to resume is not usable.
        read_meta(cfg.data.dir)
        resume_folder = ckpt.resolve_resume(resume, self.run_dir) if resume is not None else None
        if resume == "auto" and resume_folder is None:
            self._say(f"--resume auto: no checkpoint in {self.run_dir}, starting from scratch")

        # -- model
        model, self.tokenizer = build_model(cfg)
        vocab_size = model.get_input_embeddings().num_embeddings
        positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
        if positions is not None and cfg.data.block_size > positions:
            raise UserError(f"data.block_size={cfg.data.block_size} exceeds the model's {positions} positions")

        # -- data (load_split checks every token id fits the model's vocabulary)
        self.train_batches = TrainBatches(
            load_split(cfg.data.dir, "train", vocab_size), block_size=cfg.data.block_size,
            batch_size=cfg.data.batch_size, grad_accum=cfg.data.grad_accum, seed=cfg.run.seed, rank=info.rank, world_size=info.world_size,
        )
        self.eval_batches = EvalBatches(
            load_split(cfg.data.dir, "val", vocab_size), block_size=cfg.data.block_size, batch_size=cfg.data.batch_size,
            max_windows=cfg.eval.batches * cfg.data.batch_size, rank=info.rank, world_size=info.world_size,
        )
        self.tokens_per_step = self.train_batches.global_batch * cfg.data.block_size

        if cfg.optim.time_budget and info.enabled:  # each process would time its own steps and stop on its own
            raise UserError("optim.time_budget trains in one process; with several, set optim.max_steps instead")

        # -- sharding, trainable parameters and optimizer
        self.fsdp = cfg.run.parallel == "fsdp" and info.enabled
        if cfg.run.parallel == "fsdp" and not info.enabled:
            self._say("run.parallel=fsdp with one process: nothing to shard, training the whole model here "
                      "(its checkpoints resume on any number of processes)")
        # Expert parallelism's refusals come before any collective: the same error line on every process.
        check_expert_parallel_run(model, cfg.run.expert_parallel, info.world_size, cfg.run.parallel)
        if resume_folder is not None:  # before sharding: every rank loads the whole weights, then keeps its shard
            ckpt.load_model_weights(model, resume_folder)
        param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.layout = ProcessLayout(info.rank, info.world_size, cfg.run.expert_parallel)
        self.expert_parallel: ExpertParallelTraining | None = None

        def split(m: torch.nn.Module) -> None:  # FSDP2 shards, or expert parallelism splits the experts
            if self.fsdp:
                dist_utils.shard_fsdp(m, param_dtype)
            else:
                self.expert_parallel = self.layout.split_experts(m)

        self.params, self.optimizer = prepare_for_training(model, cfg, self.device, split)
        self.raw_model = model  # the weights themselves: checkpoints, routing statistics, expert distances
        self._fresh_lr_scales = [group["lr_scale"] for group in self.optimizer.param_groups]
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.precision == "fp16")
        autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        if autocast_dtype is None:
            self.autocast = contextlib.nullcontext
        else:
            self.autocast = lambda: torch.autocast(self.device_type, dtype=autocast_dtype)

        # -- progress counters (restored on resume)
        self.step = 0
        self.tokens_seen = 0
        self.best_val_loss: float | None = None
        self.best_step: int | None = None
        self.last_val_loss: float | None = None
        self.initial_val_loss: float | None = None
        self.evals_without_improvement = 0
        self.last_checkpoint: Path | None = None
        self.train_seconds = 0.0  # measured training-step time of the whole run (optim.time_budget spends it)
        self.initial_routing: SplitRouting | None = None
        self.last_routing: SplitRouting | None = None
        self.stopped = "completed"
        if resume_folder is not None:
            self._resume(resume_folder)
        resumed_steps = dist_utils.gather_objects(self.step)  # collective; one process: [self.step]
        if len(set(resumed_steps)) > 1:  # e.g. a run folder that only the first node can see
            raise UserError(
                f"the processes resumed at different steps {resumed_steps}: run.out_dir (and --resume PATH) must be "
                "on a filesystem that every node can read"
            )

        compiled = compile_fail_safe(model) if cfg.run.compile else model
        ignore = None
        if self.expert_parallel is not None:
            prefix = "_orig_mod." if compiled is not model else ""
            ignore = [prefix + name for name in self.expert_parallel.ignored_by_data_parallel()]
        self.model = compiled if self.fsdp else dist_utils.wrap_ddp(compiled, info, ignore)  # what trains: DDP's
        self.eval_model = compiled  # what evaluates: compiled, never DDP-wrapped (its forward would sync buffers)
        self.gradient_sync = self.layout.gradient_sync(model, wrapped=self.model if info.enabled else None,
                                                       fsdp=self.fsdp, experts=self.expert_parallel)

        if info.is_main:
            from flash_experts.training.tracking import Tracker

            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            self.tracker = Tracker(
                self.run_dir, config_to_dict(cfg), cfg.tracking.wandb, cfg.tracking.wandb_project,
                cfg.tracking.tensorboard, rank0=True,
            )

    # ------------------------------------------------------------------------------------------- resume

    def _resume(self, folder: Path) -> None:
        state = ckpt.load_trainer_state(folder)  # the weights were loaded before sharding (__init__)
        try:
            if state["optimizer"] is None:  # written by an FSDP run: sharded, any number of ranks
                ckpt.load_sharded_optimizer(self.raw_model, self.optimizer, folder / ckpt.OPTIMIZER_DIR)
            elif self.fsdp:
                raise UserError(f"cannot resume {folder} with run.parallel=fsdp: it was written by a ddp run "
                                "(whole optimizer state); resume it with run.parallel=ddp")
            elif self.expert_parallel is not None:  # one process's layout: each process keeps its experts' part
                self.expert_parallel.load_whole_optimizer_state(self.optimizer, state["optimizer"])
            else:
                self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as error:
            raise UserError(
                f"cannot resume from {folder}: its optimizer state does not fit this config's trainable "
                f"parameters ({error}); was model.train or the model changed?"
            ) from None
        for group in self.optimizer.param_groups:  # the config decides these, not the checkpoint
            group["weight_decay"] = self.cfg.optim.weight_decay if group["weight_decay"] else 0.0
            group["betas"], group["eps"] = tuple(self.cfg.optim.betas), self.cfg.optim.eps
        for group, fresh in zip(self.optimizer.param_groups, self._fresh_lr_scales):
            group["lr_scale"] = fresh
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rng_states = state["rng"]
        ckpt.restore_rng_state(rng_states[min(self.info.rank, len(rng_states) - 1)])
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.best_val_loss, self.best_step = state["best_val_loss"], state["best_step"]
        self.last_val_loss = state.get("last_val_loss")
        self.evals_without_improvement = int(state["evals_without_improvement"])
        self.train_seconds = float(state.get("train_seconds", 0.0))  # absent from checkpoints of older versions
        self.last_checkpoint = folder
        sampler = state["sampler"]
        if sampler != self.train_batches.state_dict():
            warnings.warn(
                f"resuming with a different seed or global batch than {folder} was trained with "
                f"({sampler} -> {self.train_batches.state_dict()}): the data order differs from the original run",
                stacklevel=2,
            )
        self._say(f"resumed from {folder} at step {self.step} ({self.tokens_seen:,} tokens seen)")

    def _trainer_state(self) -> dict[str, Any]:
        rng = dist_utils.gather_objects(ckpt.capture_rng_state())  # collective: every rank calls this
        return {
            "format": 1,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "last_val_loss": self.last_val_loss,
            "evals_without_improvement": self.evals_without_improvement,
            "train_seconds": self.train_seconds,
            # FSDP: sharded beside it (checkpoint.OPTIMIZER_DIR), written by every rank in save(); expert
            # parallelism: gathered to one process's layout (a collective), so a resume may take any degree
            "optimizer": None if self.fsdp else (self.optimizer.state_dict() if self.expert_parallel is None
                                                 else self.expert_parallel.whole_optimizer_state(self.optimizer)),
            "expert_parallel": self.cfg.run.expert_parallel,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "rng": rng,
            "sampler": self.train_batches.state_dict(),
            "world_size": self.info.world_size,
            "config": config_to_dict(self.cfg),
        }

    def save(self, best: bool = False) -> Path | None:
        """Checkpoint the current step (all ranks call this; rank 0 writes). `best` writes <out_dir>/best instead."""
        state = self._trainer_state()
        folder = model_state = None
        move_in: dict[str, Path] = {}
        if self.fsdp:  # collectives: every rank writes its optimizer shard, rank 0 receives the whole weights
            staging = self.run_dir / ckpt.CHECKPOINTS / f".tmp-optimizer-{'best' if best else self.step}"
            if self.info.is_main:
                shutil.rmtree(staging, ignore_errors=True)
            dist_utils.barrier()
            ckpt.save_sharded_optimizer(self.raw_model, self.optimizer, staging)
            model_state = ckpt.gathered_model_state(self.raw_model)
            move_in = {ckpt.OPTIMIZER_DIR: staging}
            dist_utils.barrier()  # every shard written before rank 0 moves the folder into the checkpoint
        elif self.expert_parallel is not None:  # a collective: every expert whole, as one process holds them
            model_state = self.expert_parallel.whole_model_state(self.raw_model)
        if self.info.is_main:
            if best:
                folder = ckpt.save_checkpoint(self.run_dir / ckpt.BEST, self.raw_model, self.tokenizer, state,
                                              model_state, move_in)
            else:
                folder = ckpt.save_step_checkpoint(
                    self.run_dir, self.step, self.raw_model, self.tokenizer, state, self.cfg.checkpoint.keep_last,
                    model_state, move_in,
                )
        dist_utils.barrier()  # nobody runs ahead (or exits) while rank 0 is still writing
        if not best:
            self.last_checkpoint = self.run_dir / ckpt.CHECKPOINTS / ckpt.step_dir_name(self.step)
        return folder

    # ------------------------------------------------------------------------------------------- steps

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over grad_accum micro-batches (steps.py `optimizer_step`, the race's step too).
        Returns the step's rank-averaged numbers."""
        cfg = self.cfg
        lr = set_scheduled_lr(self.optimizer, self.schedule_position(), cfg.optim)
        micro_batches = [self._to_device(self.train_batches.micro_batch(self.step, micro))
                         for micro in range(cfg.data.grad_accum)]
        try:
            numbers = optimizer_step(self.model, micro_batches, self.optimizer, self.params, self.gradient_sync,
                                     autocast=self.autocast, clip=cfg.optim.grad_clip if cfg.optim.grad_clip > 0
                                     else float("inf"), scaler=self.scaler)
        except NonFiniteStep as error:
            self._diverged(str(error))
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return {"loss": numbers.loss, "lm_loss": numbers.lm_loss, "aux_loss": numbers.aux_loss, "lr": lr,
                "grad_norm": numbers.grad_norm, "expert_counts": numbers.expert_counts}

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.device_type == "cuda":  # pinned host memory lets the copy overlap with queued GPU work
            return x.pin_memory().to(self.device, non_blocking=True)
        return x

    def _diverged(self, what: str) -> None:
        where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint
                 else "no checkpoint was saved yet")
        raise TrainingDiverged(
            f"training diverged at step {self.step + 1}: {what}. Stopped without saving this state; {where}. "
            "Lower optim.lr (or raise optim.warmup_steps / use run.precision=bf16) and resume with --resume"
        )

    def evaluate(self) -> float:
        """Mean LM cross entropy (no aux loss) over the fixed validation windows, summed across ranks
        (training/evaluation.py: the race's evaluation too)."""
        routing = SplitRoutingTally()
        total, count = next_token_loss_sums(
            self.eval_model, (self._to_device(x) for x in self.eval_batches), self.autocast,
            on_output=lambda out, x: routing.add(getattr(out, "router_stats", None), x.numel()))
        if self.expert_parallel is not None:  # every process in every exchange, whatever its share of windows
            sample = next(iter(self.eval_batches), None)  # None: this process has no window of its own
            if sample is None:
                sample = torch.zeros(1, self.eval_batches.length, dtype=torch.int64)
            self.expert_parallel.forwards_for_every_exchange(
                self.eval_model, len(self.eval_batches), self._to_device(sample), self.autocast)
        # this process's windows (the routers' view; the loss below is summed across ranks); FSDP and expert
        # parallelism hold only part of each expert stack here, so the experts' distances need whole weights
        whole = not self.fsdp and self.expert_parallel is None
        self.last_routing = routing.result(expert_distances(self.raw_model) if whole else None)
        totals = torch.tensor([total, count], dtype=torch.float64, device=self.device)
        dist_utils.all_reduce_sum(totals)
        return float(totals[0] / totals[1])

    # ------------------------------------------------------------------------------------------- the loop

    def run(self) -> TrainResult:
        """Train until the schedule is done (max_steps, or optim.time_budget seconds of steps), early stopping
        or a stop request (SIGINT/SIGTERM: the step finishes and a checkpoint is saved)."""
        self.begin()
        with StopRequest() as stop:
            while not self.done:
                self.advance()
                if not self.done and dist_utils.any_rank(stop.requested, self.device):
                    self.stopped = "interrupted"
        return self.end(stop.signal_name)

    # The loop in three parts, so that several trainers can take turns in one process (a contest:
    # flash_experts/contest/engine.py): begin, advance one step at a time, end.

    def begin(self) -> None:
        """Start (or continue) the run: its validation starting point when at step 0, the progress bar."""
        cfg = self.cfg
        self._started, self._invocation_seconds, self._losses = time.perf_counter(), 0.0, {}
        self._window, self._saved_this_step = _LogWindow(), False
        self.model.train()
        until = (f"{cfg.optim.time_budget:g} s of training steps" if cfg.optim.time_budget
                 else f"step {cfg.optim.max_steps}")
        self._say(
            f"training {self.run_dir.name}: {sum(p.numel() for p in self.params):,} trainable parameters, "
            f"{self.info.world_size} process(es) on {self.device} ({self.precision}), global batch "
            f"{self.train_batches.global_batch} x {cfg.data.block_size} tokens, step {self.step} -> {until}"
        )
        if self.step == 0 and self.last_val_loss is None:
            self._after_eval(self.evaluate())  # the starting point of the validation curve
        self._progress = self._progress_bar()

    @property
    def done(self) -> bool:
        return self.stopped != "completed" or self.schedule_finished()

    def schedule_position(self) -> float:
        """Where the run stands in its schedule, in steps: the step itself, or under optim.time_budget the
        fraction of the budget spent times max_steps (the planned steps, which shape the schedule)."""
        budget = self.cfg.optim.time_budget
        if budget > 0:
            return min(1.0, self.train_seconds / budget) * self.cfg.optim.max_steps
        return self.step

    def schedule_finished(self) -> bool:
        """max_steps reached; or, under optim.time_budget, the budget spent as nearly as whole steps allow:
        another step would overshoot it by more than it would fall short."""
        budget = self.cfg.optim.time_budget
        if budget <= 0:
            return self.step >= self.cfg.optim.max_steps
        if self._losses:  # the steps of this invocation: this machine, now
            mean_step = self._invocation_seconds / len(self._losses)
        elif self.step:  # resumed, no step taken yet: the run's own mean
            mean_step = self.train_seconds / self.step
        else:
            return False
        return self.train_seconds + mean_step / 2 >= budget

    def advance(self) -> float:
        """One optimizer step, then what follows it: logging, evaluation (early stopping), checkpoints. Returns
        the seconds of the training step alone (what a contest compares: flash_experts/contest)."""
        cfg = self.cfg
        step_started = time.perf_counter()
        metrics = self.train_step()
        elapsed = time.perf_counter() - step_started
        self._invocation_seconds += elapsed
        self.train_seconds += elapsed
        self._window.add(metrics, elapsed, self.tokens_per_step)
        self._losses[self.step] = metrics["loss"]
        if self._progress is not None:
            self._progress.update(elapsed if cfg.optim.time_budget else 1)
        last = self.schedule_finished()
        if self.step % cfg.tracking.log_interval == 0 or last:
            self._log(self._window.flush(), self._progress)
        self._saved_this_step = False
        if self.step % cfg.eval.interval == 0 or last:
            if self._after_eval(self.evaluate()):
                self.stopped = "early_stopping"
        if (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0) or last:
            self.save()
            self._saved_this_step = True
        return elapsed

    def end(self, signal_name: str | None = None) -> TrainResult:
        """Save what a stop left unsaved and return the result of this invocation."""
        if self.stopped != "completed" and not self._saved_this_step:
            self.save()
        if self._progress is not None:
            self._progress.close()
        return self._finish(self.stopped, signal_name, time.perf_counter() - self._started, self._losses,
                            self._invocation_seconds)

    def _after_eval(self, val_loss: float) -> bool:
        """Record an evaluation: log it, keep the best checkpoint. Returns True when early stopping triggers."""
        cfg = self.cfg
        self.last_val_loss = val_loss
        if self.tracker is not None:
            self.tracker.log(self.step, {"val/loss": val_loss, "val/ppl": perplexity(val_loss),
                                         "train/seconds": self.train_seconds, "train/tokens": self.tokens_seen,
                                         **routing_metrics(self.last_routing)})
        if self.step == 0:  # the untrained starting point: a baseline for the curve, not a candidate for best/
            self.initial_val_loss = val_loss
            self.initial_routing = self.last_routing
            self._say(f"{self._run_name()}step 0: val loss {val_loss:.4f}, ppl {perplexity(val_loss):.2f}")
            return False
        improved = self.best_val_loss is None or val_loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.best_step = val_loss, self.step
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        best = " (best)" if improved else ""
        self._say(f"{self._run_name()}step {self.step}: val loss {val_loss:.4f}, ppl {perplexity(val_loss):.2f}{best}")
        if improved and cfg.eval.keep_best:
            self.save(best=True)
        patience = cfg.eval.early_stopping_patience
        if patience and self.evals_without_improvement >= patience:
            self._say(f"early stopping: no improvement in {patience} evaluations "
                      f"(best {self.best_val_loss:.4f} at step {self.best_step})")
            return True
        return False

    def _log(self, numbers: dict[str, Any], progress: Any) -> None:
        metrics = {
            "train/loss": numbers["lm_loss"], "train/ppl": perplexity(numbers["lm_loss"]),
            "train/total_loss": numbers["loss"], "train/aux_loss": numbers["aux_loss"], "train/lr": numbers["lr"],
            "train/grad_norm": numbers["grad_norm"], "train/tokens": self.tokens_seen,
            "train/tokens_per_sec": numbers["tokens_per_sec"], "train/seconds": self.train_seconds,
        }
        for layer, counts in sorted(numbers["expert_counts"].items()):
            counts = dist_utils.all_reduce_sum(counts.double())
            metrics[f"expert_load/layer_{layer}"] = (counts / counts.sum().clamp_min(1)).tolist()
        if self.tracker is not None:
            self.tracker.log(self.step, metrics)
        if progress is not None:
            progress.set_postfix(
                loss=f"{numbers['lm_loss']:.4f}", tok_s=f"{numbers['tokens_per_sec']:,.0f}", refresh=False
            )
        elif self.info.is_main:
            budget = self.cfg.optim.time_budget
            where = (f"{self._run_name()}step {self.step} ({self.train_seconds:.0f}/{budget:g} s)" if budget
                     else f"{self._run_name()}step {self.step}/{self.cfg.optim.max_steps}")
            print(
                f"{where}: loss {numbers['lm_loss']:.4f} "
                f"aux {numbers['aux_loss']:.4f} "
                f"lr {numbers['lr']:.2e} grad norm {numbers['grad_norm']:.3f} {numbers['tokens_per_sec']:,.0f} tok/s",
                flush=True,
            )

    def _progress_bar(self) -> Any:
        if not self.info.is_main or self.cfg.run.quiet:
            return None
        from tqdm.auto import tqdm

        budget = self.cfg.optim.time_budget
        if budget:  # seconds of training steps, the budget's own unit
            return tqdm(total=round(budget), initial=min(self.train_seconds, budget), unit="s", dynamic_ncols=True,
                        desc=self.run_dir.name, bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s{postfix}")
        return tqdm(total=self.cfg.optim.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                    desc=self.run_dir.name)

    def _run_name(self) -> str:
        """A prefix naming the run where its lines share one output with other runs' (run.quiet: runs taking
        turns in a contest print log lines, no progress bar), else nothing."""
        return f"{self.run_dir.name} " if self.cfg.run.quiet else ""

    def _say(self, message: str) -> None:
        if self.info.is_main:
            if self.cfg.run.quiet:
                print(message, flush=True)
            else:
                from tqdm.auto import tqdm

                tqdm.write(message)

    def _finish(self, stopped: str, signal_name: str | None, seconds: float, losses: dict[int, float],
                step_seconds: float) -> TrainResult:
        result = TrainResult(
            run_dir=str(self.run_dir), steps=self.step, tokens=self.tokens_seen, seconds=seconds,
            final_val_loss=self.last_val_loss, final_val_ppl=perplexity(self.last_val_loss),
            best_val_loss=self.best_val_loss, best_val_ppl=perplexity(self.best_val_loss), best_step=self.best_step,
            stopped=stopped, checkpoint=str(self.last_checkpoint) if self.last_checkpoint else None, losses=losses,
            initial_val_loss=self.initial_val_loss, initial_val_ppl=perplexity(self.initial_val_loss),
            step_seconds=step_seconds, train_seconds=self.train_seconds,
            initial_routing=None if self.initial_routing is None or self.initial_routing.is_empty
            else self.initial_routing,
            final_routing=None if self.last_routing is None or self.last_routing.is_empty else self.last_routing,
        )
        if self.tracker is not None:
            self.tracker.summary({f"final/{k}": v for k, v in result.as_dict().items() if k != "run_dir"})
        if stopped == "interrupted":
            self._say(
                f"stopped by {signal_name} after step {self.step}; checkpoint saved to {self.last_checkpoint}. "
                f"Resume with the same command plus `--resume auto` (or --resume {self.last_checkpoint})"
            )
        return result

    def close(self) -> None:
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None


class _LogWindow:
    """Averages the steps between two log lines (so a logged loss is not one noisy step) and their throughput."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps, self.seconds, self.tokens = 0, 0.0, 0
        self.expert_counts: dict[int, torch.Tensor] = {}
        self.last: dict[str, Any] = {}

    def add(self, metrics: dict[str, Any], seconds: float, tokens: int) -> None:
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            self.sums[key] = self.sums.get(key, 0.0) + metrics[key]
        for layer, counts in metrics["expert_counts"].items():
            self.expert_counts[layer] = self.expert_counts.get(layer, 0) + counts
        self.steps, self.seconds, self.tokens = self.steps + 1, self.seconds + seconds, self.tokens + tokens
        self.last = metrics

    def flush(self) -> dict[str, Any]:
        numbers = {key: value / self.steps for key, value in self.sums.items()}
        numbers.update(lr=self.last["lr"], tokens_per_sec=self.tokens / max(self.seconds, 1e-9),
                       expert_counts=self.expert_counts)
        self.reset()
        return numbers
