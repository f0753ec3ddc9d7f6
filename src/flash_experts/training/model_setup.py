"""What a training run starts from: the model the config describes, which of its weights train, their AdamW
groups and the optimizer, the seeds. The trainer (trainer.py) and the step timing (steps.py) build a run with
these, so that a timed step is the trained step.
"""

from __future__ import annotations

import dataclasses
import random
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from flash_experts.data.tokens import load_meta
from flash_experts.errors import UserError
from flash_experts.training.config import TrainConfig
from flash_experts.training.optimizer import build_adamw


def build_model(cfg: TrainConfig) -> tuple[nn.Module, Any]:
    """The model to train and its tokenizer, as the config describes them.

    base="scratch": a fresh GPT-2-shaped model (MoE when cfg.moe is set) sized by cfg.model, with the data
    folder's tokenizer and vocabulary. Otherwise the base is loaded and, with an moe section, upcycled; a
    dense run converts GPT-2/Llama bases to our code with no MoE layers, so attention runs through our kernels.
    """
    from flash_experts.model import GPT2MoEConfig, GPT2MoEForCausalLM, upcycle
    from flash_experts.model.loading import load_model
    from flash_experts.model.moe import MoESettings
    from flash_experts.model.upcycle import SUPPORTED_FAMILIES

    moe = cfg.moe
    # The trainer's moe section is the model's MoESettings plus two upcycling options; a dense run is a model of
    # our code with no MoE layer.
    settings = moe.settings() if moe is not None else MoESettings(num_experts=1, num_experts_per_tok=1, moe_layers=[])
    moe_fields: dict[str, Any] = dict(dataclasses.asdict(settings), attention_implementation=cfg.model.attention)

    if cfg.model.base == "scratch":
        meta = read_meta(cfg.data.dir)
        if "vocab_size" not in meta:
            raise UserError(f"{cfg.data.dir}/meta.json must give vocab_size to size a model trained from scratch")
        p = cfg.model.dropout
        config = GPT2MoEConfig(
            vocab_size=int(meta["vocab_size"]), n_positions=cfg.model.n_positions, n_embd=cfg.model.n_embd,
            n_layer=cfg.model.n_layer, n_head=cfg.model.n_head, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p,
            bos_token_id=meta.get("eos_token_id", 0), eos_token_id=meta.get("eos_token_id", 0), **moe_fields,
        )
        return GPT2MoEForCausalLM(config), _data_tokenizer(cfg.data.dir)

    model, tokenizer = load_model(cfg.model.base)  # quiet: no transformers bar inside the trainer's own
    already_moe = bool(getattr(model.config, "num_experts", None)) and hasattr(model.config, "moe_layer_indices")
    if already_moe:
        if moe is not None:
            warnings.warn(f"{cfg.model.base} is already an MoE model; the moe section is ignored", stacklevel=2)
    elif moe is not None or model.config.model_type in SUPPORTED_FAMILIES:
        model = upcycle(model, settings, expert_noise=moe.expert_noise if moe else 0.0,
                        drop_ratio=moe.drop_ratio if moe else 0.0, seed=cfg.run.seed,
                        attention_implementation=cfg.model.attention)
    set_dropout(model, cfg.model.dropout)
    return model, tokenizer


def _data_tokenizer(data_dir: str | None) -> Any:
    from flash_experts.data.tokenizer import load_tokenizer

    try:
        return load_tokenizer(data_dir)
    except (UserError, OSError, ValueError) as error:
        warnings.warn(f"no tokenizer found with the data in {data_dir} ({error}); checkpoints will lack one",
                      stacklevel=3)
        return None


def read_meta(data_dir: str | None) -> dict[str, Any]:
    if data_dir is None:
        raise UserError(
            "data.dir is not set: prepare a folder with `flash-experts prepare-data` and pass data.dir=PATH"
        )
    return load_meta(data_dir)


def set_dropout(model: nn.Module, p: float) -> None:
    """Use dropout `p` everywhere (and record it in the config, so a saved model says what it was trained with)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout"):
        if hasattr(model.config, name):
            setattr(model.config, name, p)


def is_moe_parameter(name: str) -> bool:
    """Expert and router weights: what train="moe" trains."""
    return ".mlp.experts." in name or is_router_parameter(name)


def is_router_parameter(name: str) -> bool:
    return ".mlp.router." in name


def optimizer_groups(model: nn.Module, weight_decay: float, moe_lr_scale: float | None = None,
                     router_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices (incl. stacked experts), none on biases, norms and embeddings.

    With `moe_lr_scale` (optim.rewarm_peak / optim.lr) the expert and router parameters get groups of their
    own whose rate is the schedule's times that scale; with `router_lr_scale` != 1 (optim.router_lr_scale) the
    routers get a group of their own at that multiple of their neighbours' rate. Every group carries its
    "lr_scale" (1.0 elsewhere). Without either there are two groups, as checkpoints written before the
    options expect.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    # key: (kind, decays) with kind 0 = the rest, 1 = experts (and routers) re-warmed, 2 = routers apart
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():  # tied weights appear once
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        decays = not (param.ndim < 2 or id(param) in embeddings or "bias" in leaf or leaf in ("b_up", "b_down"))
        kind = 2 if router_lr_scale != 1.0 and is_router_parameter(name) else (
            1 if moe_lr_scale is not None and is_moe_parameter(name) else 0)
        groups.setdefault((kind, decays), []).append(param)
    scales = {0: 1.0, 1: moe_lr_scale, 2: router_lr_scale * (moe_lr_scale or 1.0)}
    order = [(0, True), (0, False), (1, True), (1, False), (2, True), (2, False)]
    return [{"params": groups.get(key, []), "weight_decay": weight_decay if key[1] else 0.0, "lr_scale": scales[key[0]]}
            for key in order if key in groups or key[0] == 0]


def prepare_for_training(model: nn.Module, cfg: TrainConfig, device: str,
                         shard: Callable[[nn.Module], None] | None = None) -> tuple[list[nn.Parameter], Any]:
    """Put `model` in fp32 on `device`, freeze what cfg.model.train leaves out, shard it (`shard`: FSDP, or
    expert parallelism's split of the experts), and build its AdamW.

    The trainer's own setup, shared with the step timing of training/steps.py so that a timed step is
    the trained step. Returns the trainable parameters and the optimizer."""
    model.to(device=device, dtype=torch.float32)  # fp32 master weights, whatever the base was stored in
    if cfg.model.train == "moe":
        for name, param in model.named_parameters():
            param.requires_grad_(is_moe_parameter(name))
    if shard is not None:
        shard(model)  # FSDP2 replaces the parameters by their shards: the optimizer must see those
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("model.train=moe but the model has no expert or router parameters (is moe.moe_layers empty?)")
    groups = optimizer_groups(model, cfg.optim.weight_decay, moe_lr_scale=None if cfg.optim.rewarm_peak is None
                              else cfg.optim.rewarm_peak / cfg.optim.lr, router_lr_scale=cfg.optim.router_lr_scale)
    from torch.distributed.tensor import DTensor

    # FSDP2's shards are DTensors (the foreach AdamW); expert parallelism's are plain tensors (the fused one)
    return params, build_adamw(groups, cfg.optim, sharded=any(isinstance(p, DTensor) for p in params))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
