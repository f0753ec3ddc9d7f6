"""Training configuration: one dataclass tree, loaded from YAML, overridden from the command line.

    cfg = load_config("configs/mtg_moe.yaml", ["optim.lr=1e-4", "--moe.num_experts", "4", "moe=null"])
    cfg.optim.lr, cfg.moe (None = dense), cfg.run.out_dir ...

Every key is checked and every value coerced to its field's type (training/config_convert.py), and every
impossible value is a ValueError that names the field ("optim.lr must be > 0, got -0.1"). Nothing but
ValueError escapes validation, whatever the input (a property test checks this).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from flash_experts.errors import ConfigError, UserError
from flash_experts.model.config import validate_moe_fields
from flash_experts.model.moe import MoESettings
from flash_experts.training.config_convert import (  # noqa: F401 (PRECISIONS, parse_overrides: public here too)
    OTHER_PRECISION_SPELLINGS,
    PRECISIONS,
    apply_override,
    build_section,
    check_key,
    parse_overrides,
    read_yaml,
)


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str | None = None  # None -> runs/<name>
    seed: int = 1337
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto = bf16 autocast where the hardware computes bf16 natively (CUDA; CPUs with AVX-512 BF16 or AMX),
    # else fp32; master weights are always fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile (inductor); a part that fails to compile runs eagerly (training/compile.py)
    # ddp: every process holds the whole model; fsdp: parameters, gradients and optimizer state sharded over the
    # processes (FSDP2; docs/DISTRIBUTED.md). With one process both train the same unsharded model.
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # processes that split each MoE layer's experts (expert parallelism, training/expert_parallel.py); it must
    # divide the experts and the process count; 1 = every process holds every expert
    expert_parallel: int = 1
    quiet: bool = False


@dataclass
class ModelConfig:
    # hub id ("gpt2"), local folder, "smollm2" (offline GGUF base) or "scratch" (random init, sizes below)
    base: str = "gpt2"
    n_layer: int = 12  # the four size fields are used only when base == "scratch"
    n_embd: int = 768
    n_head: int = 12
    n_positions: int = 1024
    dropout: float = 0.0
    attention: Literal["auto", "sdpa", "flash", "eager", "triton"] = "auto"
    train: Literal["all", "moe"] = "all"  # "moe" = train only the experts and routers


@dataclass
class MoEConfig(MoESettings):
    """The model's MoE settings (model/moe.py `MoESettings`: one schema, one validation), plus the two that only
    say how upcycled experts start."""

    expert_noise: float = 0.0  # relative noise added to the upcycled expert copies to break their symmetry
    drop_ratio: float = 0.0  # Drop-Upcycling: share of each expert's hidden units re-initialised (0 = exact copies)

    def settings(self) -> MoESettings:
        """The fields the model config holds (everything but the upcycling-only ones)."""
        return MoESettings.of(self)


# Keys of a section renamed since: an old config gets one line naming the new key. The trainer's MoE keys took the
# model config's names.
RENAMED_KEYS = {"moe": {"top_k": "num_experts_per_tok", "layers": "moe_layers", "aux_loss_coef": "router_aux_loss_coef",
                        "z_loss_coef": "router_z_loss_coef", "jitter": "router_jitter"}}


@dataclass
class DataConfig:
    dir: str | None = None  # prepared folder: train.bin, val.bin, meta.json
    block_size: int = 256
    batch_size: int = 8
    grad_accum: int = 1


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float | None = None  # end of the cosine decay; None -> lr / 10
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 = off
    warmup_steps: int = 100
    max_steps: int = 2000
    schedule: Literal["cosine", "constant"] = "cosine"
    # Experts and routers warm up to this peak instead of `lr` (re-warming towards the base's pretraining peak,
    # He et al. 2024), the rest of the model keeps `lr`; both follow the same warm-up and decay shape. None = lr.
    rewarm_peak: float | None = None
    # The routers' rate as a multiple of their neighbours' (the experts'): a router is a small new matrix
    # that must move far from its random start within a fine-tuning run, which the base's rate barely allows
    # (docs/UPCYCLING.md, "Routers that learn"). 1.0 = no group of their own.
    router_lr_scale: float = 1.0
    # > 0: train for this many seconds of measured training steps (evaluation, checkpoints and start-up not
    # counted) instead of a number of steps. The schedule keeps its shape (warmup_steps over max_steps, read
    # as a plan), but advances with the fraction of the budget spent: on a machine whose speed drifts, the
    # decay ends when the budget does. 0 = off (max_steps decides).
    time_budget: float = 0.0


@dataclass
class EvalConfig:
    interval: int = 200
    batches: int = 20
    early_stopping_patience: int = 0  # evaluations without improvement before stopping; 0 = off
    keep_best: bool = True


@dataclass
class CheckpointConfig:
    interval: int = 500  # 0 = only at the end
    keep_last: int = 2


@dataclass
class TrackingConfig:
    wandb: Literal["auto", "online", "offline", "off"] = "auto"  # auto: online with WANDB_API_KEY, else offline
    wandb_project: str = "flash-experts"
    tensorboard: bool = True
    log_interval: int = 10


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig | None = field(default_factory=MoEConfig)  # None = dense
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


# section name -> its dataclass (`moe: null`, a dense model, is handled by hand)
SECTIONS: dict[str, type] = {
    "run": RunConfig, "model": ModelConfig, "moe": MoEConfig, "data": DataConfig, "optim": OptimConfig,
    "eval": EvalConfig, "checkpoint": CheckpointConfig, "tracking": TrackingConfig,
}
assert list(SECTIONS) == [f.name for f in dataclasses.fields(TrainConfig)]


# ----------------------------------------------------------------------------------------------- public API


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] | None = (),
                defaults: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (or start from the defaults when `path` is None), apply CLI overrides, validate.

    Overrides are "section.key=value" ("optim.lr=1e-4", "moe=null"), "--section.key=value" or the pair
    "--section.key", "value". Values are parsed as YAML, then coerced to the field's type. `defaults`, in the
    same form, change the file itself before the user's overrides (a script's own sizes for a config).
    """
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(Path(path))
    for dotted, text in parse_overrides(list(defaults)):
        apply_override(raw, dotted, text, SECTIONS, RENAMED_KEYS)
    pairs = parse_overrides(list(overrides or []))
    planned_steps = _optim_value(raw, "max_steps")
    for dotted, text in pairs:
        apply_override(raw, dotted, text, SECTIONS, RENAMED_KEYS)
    if not any(dotted in ("optim", "optim.warmup_steps") for dotted, _ in pairs):
        _shorten_warmup(raw, planned_steps)
    return config_from_dict(raw)


def _optim_value(raw: dict[str, Any], key: str) -> Any:
    optim = raw.get("optim")
    value = optim.get(key) if isinstance(optim, dict) else None
    return getattr(OptimConfig, key) if value is None else value


def _shorten_warmup(raw: dict[str, Any], planned_steps: Any) -> None:
    """An override that cuts optim.max_steps below the config's own warm-up (`optim.max_steps=2` on a config
    with 100 warm-up steps) keeps the warm-up's share of the run instead of failing validation; the user did
    not choose the warm-up, so its default follows, and a line says so. An explicit warm-up is never changed."""
    steps, warmup = _optim_value(raw, "max_steps"), _optim_value(raw, "warmup_steps")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (steps, warmup, planned_steps)):
        return  # validation reports the bad value
    if not 0 <= steps < warmup or planned_steps <= 0:
        return
    shortened = min(steps, warmup * steps // planned_steps)
    if not isinstance(raw.get("optim"), dict):
        raw["optim"] = {}
    raw["optim"]["warmup_steps"] = shortened
    print(f"note: optim.max_steps={steps} is below the config's optim.warmup_steps={warmup}: warm-up shortened to "
          f"{shortened} steps, its share of the planned {planned_steps} (set optim.warmup_steps to choose)",
          file=sys.stderr)


def config_from_dict(raw: Any) -> TrainConfig:
    """Build and validate a TrainConfig from a plain nested dict (e.g. a saved config.yaml). ValueError on bad input."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"a training config must be a mapping of sections, got {type(raw).__name__}")
    sections: dict[str, Any] = {}
    for key, value in raw.items():
        name = check_key(key, SECTIONS, prefix="")
        if name == "moe" and value is None:
            sections["moe"] = None
            continue
        sections[name] = build_section(name, SECTIONS[name], value, RENAMED_KEYS.get(name))
    cfg = TrainConfig(**sections)
    _validate(cfg)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain nested dict (tuples become lists) that `config_from_dict` turns back into the same config."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a GPU is visible, else "cpu"."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device=cuda but no CUDA device is visible; use run.device=auto or cpu")
    return device


def resolve_precision(precision: str, device: str) -> str:
    """"auto" -> "bf16" where the hardware computes in bf16 natively (a CUDA GPU that supports it; a CPU with
    AVX-512 BF16 or AMX), else "fp32". fp16/bf16 are autocast dtypes only: master weights stay fp32."""
    import torch

    if precision == "fp16" and not device.startswith("cuda"):
        raise UserError("run.precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    if precision != "auto":
        return precision
    if device.startswith("cuda"):
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run natively, faster than fp32 (without them, emulated and slower)."""
    import torch

    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


# ---------------------------------------------------------------------------------------------- validation


def _validate(cfg: TrainConfig) -> None:
    run, model, moe, data, optim = cfg.run, cfg.model, cfg.moe, cfg.data, cfg.optim

    def require(ok: bool, where: str, rule: str, value: Any) -> None:
        if not ok:
            raise ConfigError(f"{where} {rule}, got {value!r}")

    require(bool(run.name.strip()), "run.name", "must not be empty", run.name)
    require(run.seed >= 0, "run.seed", "must be >= 0", run.seed)
    require(run.expert_parallel >= 1, "run.expert_parallel", "must be >= 1 (1 = no expert parallelism)",
            run.expert_parallel)
    if cfg.moe is not None and cfg.moe.num_experts % run.expert_parallel:
        require(False, "run.expert_parallel", f"must divide moe.num_experts={cfg.moe.num_experts}",
                run.expert_parallel)
    if run.out_dir is None:
        run.out_dir = str(Path("runs") / run.name)
    require(bool(run.out_dir.strip()), "run.out_dir", "must not be empty", run.out_dir)

    require(bool(model.base.strip()), "model.base", "must name a hub id, a folder, 'smollm2' or 'scratch'", model.base)
    for name in ("n_layer", "n_embd", "n_head", "n_positions"):
        require(getattr(model, name) >= 1, f"model.{name}", "must be >= 1", getattr(model, name))
    require(model.n_embd % model.n_head == 0, "model.n_embd", f"must be divisible by model.n_head={model.n_head}", model.n_embd)
    require(0.0 <= model.dropout < 1.0, "model.dropout", "must be in [0, 1)", model.dropout)
    require(model.train != "moe" or moe is not None, "model.train", "'moe' needs an moe section (the model is dense)", model.train)
    scratch = model.base == "scratch"

    if moe is not None:
        # The model config's own check (one validation for both); layer indices are checked against the
        # base's depth once it is loaded, or here against model.n_layer for a model trained from scratch.
        try:
            validate_moe_fields(moe, num_layers=model.n_layer if scratch else None)
        except ConfigError as error:
            raise ConfigError(f"moe.{error}") from None
        require(math.isfinite(moe.expert_noise) and moe.expert_noise >= 0, "moe.expert_noise",
                "must be a finite number >= 0", moe.expert_noise)
        require(0.0 <= moe.drop_ratio <= 1.0, "moe.drop_ratio", "must be in [0, 1]", moe.drop_ratio)
        for name in ("drop_ratio", "expert_noise"):
            require(not (scratch and getattr(moe, name) > 0), f"moe.{name}",
                    "applies to experts upcycled from a pretrained base; with model.base=scratch they start random (set 0)",
                    getattr(moe, name))

    require(data.dir is None or bool(data.dir.strip()), "data.dir", "must not be empty", data.dir)
    for name in ("block_size", "batch_size", "grad_accum"):
        require(getattr(data, name) >= 1, f"data.{name}", "must be >= 1", getattr(data, name))
    if scratch:
        require(data.block_size <= model.n_positions, "data.block_size", f"must be <= model.n_positions={model.n_positions}", data.block_size)

    require(optim.lr > 0, "optim.lr", "must be > 0", optim.lr)
    if optim.min_lr is None:
        optim.min_lr = optim.lr / 10
    require(0 <= optim.min_lr <= optim.lr, "optim.min_lr", f"must be in [0, optim.lr={optim.lr}]", optim.min_lr)
    if optim.rewarm_peak is not None:
        require(optim.rewarm_peak > 0, "optim.rewarm_peak", "must be > 0 (or null: experts follow optim.lr)", optim.rewarm_peak)
        require(moe is not None, "optim.rewarm_peak", "needs an moe section (the model is dense)", optim.rewarm_peak)
    require(optim.router_lr_scale > 0 and math.isfinite(optim.router_lr_scale), "optim.router_lr_scale",
            "must be a number > 0 (1 = the routers follow the experts' rate)", optim.router_lr_scale)
    require(optim.router_lr_scale == 1.0 or moe is not None, "optim.router_lr_scale",
            "needs an moe section (the model is dense)", optim.router_lr_scale)
    require(0 <= optim.time_budget < float("inf"), "optim.time_budget",
            "must be a number of seconds >= 0 (0 = train max_steps steps)", optim.time_budget)
    require(optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0", optim.weight_decay)
    require(all(0.0 <= b < 1.0 for b in optim.betas), "optim.betas", "must both be in [0, 1)", list(optim.betas))
    require(optim.eps > 0, "optim.eps", "must be > 0", optim.eps)
    require(optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 = off)", optim.grad_clip)
    require(optim.max_steps >= 1, "optim.max_steps", "must be >= 1", optim.max_steps)
    require(optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0", optim.warmup_steps)
    require(optim.warmup_steps <= optim.max_steps, "optim.warmup_steps", f"must be <= optim.max_steps={optim.max_steps}", optim.warmup_steps)

    require(cfg.eval.interval >= 1, "eval.interval", "must be >= 1", cfg.eval.interval)
    require(cfg.eval.batches >= 1, "eval.batches", "must be >= 1", cfg.eval.batches)
    require(cfg.eval.early_stopping_patience >= 0, "eval.early_stopping_patience", "must be >= 0 (0 = off)", cfg.eval.early_stopping_patience)
    require(cfg.checkpoint.interval >= 0, "checkpoint.interval", "must be >= 0 (0 = only at the end)", cfg.checkpoint.interval)
    require(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1", cfg.checkpoint.keep_last)
    require(bool(cfg.tracking.wandb_project.strip()), "tracking.wandb_project", "must not be empty", cfg.tracking.wandb_project)
    require(cfg.tracking.log_interval >= 1, "tracking.log_interval", "must be >= 1", cfg.tracking.log_interval)
