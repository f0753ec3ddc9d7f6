"""Sparse upcycling: a dense model becomes an MoE model whose experts all start as copies of its MLPs.

Invariant: with `normalize_top_k=True` (the default), no expert noise and no Drop-Upcycling, every token's
top-k weights sum to 1 over identical experts, so right after upcycling the MoE model computes the dense
model's function. The router is new (random); it learns to specialise the experts during fine-tuning.

Identical experts are also the weakness of upcycling: their gradients differ only through the router, so at
fine-tuning learning rates they stay near-copies (He et al., 2024). Two ways to break the symmetry, both
giving up exactness at step 0: `expert_noise` (small Gaussian noise on every copy) and `drop_ratio`
(Drop-Upcycling, Nakamura et al., ICLR 2025: each expert re-draws a random share of its hidden units).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from flash_experts.errors import ConfigError, UserError
from flash_experts.model.config import GPT2MoEConfig, LlamaMoEConfig
from flash_experts.model.gpt2_moe import GPT2MoEForCausalLM
from flash_experts.model.llama_moe import LlamaMoEForCausalLM
from flash_experts.model.moe import MoESettings

# The dense model types we upcycle, by the block layout they share: GPT-2's, and Llama's (attention + gated
# SwiGLU MLP + RMSNorm: Llama, Mistral, Qwen2). The one list of supported families.
GPT2_FAMILY = ("gpt2",)
LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED_FAMILIES = GPT2_FAMILY + LLAMA_FAMILY


def upcycle(source: PreTrainedModel | str, settings: MoESettings | None = None, *, expert_noise: float = 0.0,
            drop_ratio: float = 0.0, seed: int | None = None, attention_implementation: str | None = None,
            **setting_overrides: Any) -> PreTrainedModel:
    """Upcycle a dense GPT-2 or Llama-family model (a module, a hub id or a local folder) into our MoE form.

    `settings` (default `MoESettings()`) with `setting_overrides` on top: any MoESettings field by name
    (num_experts, num_experts_per_tok or top_k, moe_layers, router_aux_loss_coef, capacity_factor, ...).
    `expert_noise` > 0 perturbs each expert copy by that relative std; `drop_ratio` in (0, 1] re-initialises
    that share of each expert's hidden units (`drop_upcycle`). Either breaks the experts' symmetry and the
    model then no longer equals the dense one exactly. `moe_layers=[]` converts the dense model to our code
    without experts (dense baselines).
    """
    from flash_experts.model.loading import load_dense_model

    if not 0.0 <= drop_ratio <= 1.0:
        raise UserError(f"drop_ratio must be in [0, 1], got {drop_ratio}")
    if not (math.isfinite(expert_noise) and expert_noise >= 0):  # nan would pass for "no noise", inf ruins the weights
        raise UserError(f"expert_noise must be a finite number >= 0, got {expert_noise}")
    if "top_k" in setting_overrides:
        setting_overrides["num_experts_per_tok"] = setting_overrides.pop("top_k")
    unknown = set(setting_overrides) - set(MoESettings.names())
    if unknown:
        raise ConfigError(f"unknown MoE setting(s): {', '.join(sorted(unknown))}")
    moe = dataclasses.asdict(dataclasses.replace(settings or MoESettings(), **setting_overrides))
    if moe["moe_intermediate_size"] is not None or moe["shared_expert_intermediate_size"]:
        raise ConfigError("moe_intermediate_size and shared_expert_intermediate_size describe experts trained from "
                          "scratch: upcycled experts are copies of the model's MLP, its size, and none is shared")
    if attention_implementation is not None:
        moe["attention_implementation"] = attention_implementation
    dense = load_dense_model(source) if isinstance(source, str) else source
    model_type = dense.config.model_type
    if model_type in GPT2_FAMILY:
        model = _upcycle_gpt2(dense, moe)
    elif model_type in LLAMA_FAMILY:
        model = upcycle_llama(dense, moe)
    else:
        raise UserError(
            f"cannot upcycle a model of type {model_type!r}: supported are GPT-2 and the Llama family "
            f"({', '.join(SUPPORTED_FAMILIES)})"
        )
    if drop_ratio > 0:
        drop_upcycle(model, drop_ratio, seed)
    if expert_noise > 0:
        add_expert_noise(model, expert_noise, seed)
    return model


def upcycle_gpt2(source: PreTrainedModel | str, settings: MoESettings | None = None, **kwargs: Any) -> PreTrainedModel:
    """`upcycle` for a GPT-2 source (a `GPT2LMHeadModel`, a hub id or a local folder)."""
    return upcycle(source, settings, **kwargs)


# Config fields that describe the dense source, not the model it becomes. `quantization_config` is how the
# source was stored (SmolLM2 comes from a Q4_1 GGUF file, dequantized on load): our weights are plain floats,
# and a folder that carried it would make transformers look for that GGUF file when it loads ours.
_CONFIG_FIELDS_NOT_COPIED = ("model_type", "architectures", "transformers_version", "_name_or_path", "dtype",
                             "torch_dtype", "quantization_config")


def _upcycle_gpt2(dense: PreTrainedModel, moe: dict[str, Any]) -> GPT2MoEForCausalLM:
    fields = dense.config.to_dict()
    for name in _CONFIG_FIELDS_NOT_COPIED:
        fields.pop(name, None)
    config = GPT2MoEConfig(**fields, **moe)
    dtype = next(dense.parameters()).dtype
    model = GPT2MoEForCausalLM(config).to(dtype)
    copy_dense_weights(dense.state_dict(), model, expert_sources={
        "mlp.experts.w_up": "mlp.c_fc.weight",  # Conv1D (in, out) = our (D, F) per expert
        "mlp.experts.b_up": "mlp.c_fc.bias",
        "mlp.experts.w_down": "mlp.c_proj.weight",
        "mlp.experts.b_down": "mlp.c_proj.bias",
    })
    return model.to(next(dense.parameters()).device).train(dense.training)


def upcycle_llama(dense: PreTrainedModel, moe: dict[str, Any]) -> LlamaMoEForCausalLM:
    """A dense Llama-family model -> `LlamaMoEForCausalLM` with every expert a copy of the dense MLP.

    `moe` holds every MoE field (`MoESettings`) and the attention choice. Called through `upcycle`.
    """
    fields = dense.config.to_dict()
    for name in _CONFIG_FIELDS_NOT_COPIED:
        fields.pop(name, None)
    if dense.config.model_type == "qwen2":  # biases on q/k/v but not on the output projection
        fields.update(attention_bias=True, attention_out_bias=False)
    config = LlamaMoEConfig(**fields, **moe)
    dtype = next(dense.parameters()).dtype
    model = LlamaMoEForCausalLM(config).to(dtype)

    # HF Linear weights are (out, in); our experts are (in, out) per expert: transpose the MLP weights of the
    # layers that become MoE (dense layers keep their Linear layout and copy by name).
    dense_state = dict(dense.state_dict())
    for i in config.moe_layer_indices():
        for proj in ("gate_proj", "up_proj", "down_proj"):
            name = f"model.layers.{i}.mlp.{proj}.weight"
            dense_state[name] = dense_state[name].t()
    copy_dense_weights(dense_state, model, expert_sources={
        "mlp.experts.w_gate": "mlp.gate_proj.weight",  # (D, F) per expert
        "mlp.experts.w_up": "mlp.up_proj.weight",  # (D, F)
        "mlp.experts.w_down": "mlp.down_proj.weight",  # (F, D)
    })
    return model.to(next(dense.parameters()).device).train(dense.training)


# What "computes the same function" means here: the parity tests' fp32 tolerance (tests/test_llama_moe.py,
# tests/test_model_upcycle_gpt2.py), relative to the logits' scale.
SAME_LOGITS_RTOL = 1e-4


def in_our_classes(model: PreTrainedModel) -> tuple[PreTrainedModel, str | None]:
    """(model in our own class, None) for a transformers GPT-2 or Llama-family model, the same weights moved into
    `GPT2MoEForCausalLM` / `LlamaMoEForCausalLM` without experts, so that our attention, static KV cache,
    quantization and compiled decode apply; checked: its logits on a short input must equal the model's own
    within SAME_LOGITS_RTOL of their scale. Otherwise (another family, or a setting our classes compute
    differently) (the model itself, why): the caller says so in one line and runs it as it is. Our own models
    come back as they are."""
    model_type = model.config.model_type
    if model_type in ("gpt2_moe", "llama_moe"):
        return model, None
    if model_type not in SUPPORTED_FAMILIES:
        return model, f"{type(model).__name__} ({model_type}) has no class of ours (GPT-2 and the Llama family do)"
    try:
        ours = upcycle(model, moe_layers=[]).eval()
    except (UserError, ValueError, KeyError, TypeError) as error:
        return model, f"{type(model).__name__} does not convert to our class ({' '.join(str(error).split())[:160]})"
    vocab = model.config.vocab_size
    ids = (torch.arange(16) * max(1, vocab // 16) + 1).clamp(max=vocab - 1)[None].to(next(model.parameters()).device)
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits.float()
        got = ours(input_ids=ids).logits.float()
    error = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
    if not error <= SAME_LOGITS_RTOL:
        return model, (f"{type(model).__name__} in our class gives other logits ({error:.1e} of their scale, over "
                       f"{SAME_LOGITS_RTOL:.0e}): a setting our class does not compute as transformers does")
    return ours.train(model.training), None


def copy_dense_weights(dense_state: dict[str, torch.Tensor], model: nn.Module,
                       expert_sources: dict[str, str]) -> None:
    """Copy every dense weight into `model`: same-named tensors as they are; each expert tensor from the MLP
    tensor it replaces (`expert_sources` maps our expert suffix -> the dense suffix), repeated per expert.
    Routers stay as initialised. Raises if any dense weight would be left unused or any of ours unset."""
    used: set[str] = set()
    with torch.no_grad():
        for name, param in model.state_dict().items():
            if name in dense_state:
                param.copy_(dense_state[name])
                used.add(name)
                continue
            suffix = next((s for s in expert_sources if name.endswith(s)), None)
            if suffix is not None:
                source_name = name[: -len(suffix)] + expert_sources[suffix]
                param.copy_(dense_state[source_name].unsqueeze(0).expand_as(param))
                used.add(source_name)
            elif not name.endswith("mlp.router.weight"):
                raise UserError(f"upcycling: no dense weight for {name}")
    # Tied output embeddings and non-persistent buffers may appear in the dense state under other names.
    left = [n for n in dense_state if n not in used and not n.endswith((".attn.bias", ".attn.masked_bias"))]
    left = [n for n in left if not (n == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False))]
    if left:
        raise UserError(f"upcycling: dense weights not used: {', '.join(left[:5])}")


def add_expert_noise(model: nn.Module, relative_std: float, seed: int | None = None) -> None:
    """Perturb every expert weight by Gaussian noise of `relative_std` times that tensor's std."""
    generator = torch.Generator().manual_seed(seed if seed is not None else 0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mlp.experts.w_" in name:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.add_((noise * relative_std * param.float().std()).to(param.dtype).to(param.device))


def drop_upcycle(model: nn.Module, ratio: float, seed: int | None = None) -> None:
    """Drop-Upcycling (Nakamura et al., ICLR 2025): in every expert, re-initialise a random `ratio` of the hidden
    units, each expert drawing its own units.

    A hidden unit j is column j of the input projections (w_up, w_gate: (D, F)), entry j of b_up and row j of
    w_down (F, D); its new values are drawn from a normal distribution with the mean and standard deviation
    of the copied tensor they replace, so the expert keeps the scale of the dense MLP while (1 - ratio) of it
    stays the pretrained one. round(ratio * F) units per expert; b_down (shared output) is kept.
    """
    from flash_experts.model.moe import GroupedExperts

    generator = torch.Generator().manual_seed(seed if seed is not None else 0)
    with torch.no_grad():
        for experts in (m for m in model.modules() if isinstance(m, GroupedExperts)):
            num_experts, _, hidden = experts.w_up.shape
            dropped = round(ratio * hidden)
            if dropped == 0:
                continue
            # (tensor, the dimension of the hidden unit within one expert's slice)
            unit_tensors = [(experts.w_up, 1), (experts.w_down, 0)]
            unit_tensors += [(t, 1) for t in (experts.w_gate,) if t is not None]
            unit_tensors += [(t, 0) for t in (experts.b_up,) if t is not None]
            for e in range(num_experts):
                units = torch.randperm(hidden, generator=generator)[:dropped]
                for tensor, dim in unit_tensors:
                    _redraw_units(tensor[e], units, dim, generator)


def _redraw_units(weight: torch.Tensor, units: torch.Tensor, dim: int, generator: torch.Generator) -> None:
    """weight.index_select(dim, units) <- N(mean(weight), std(weight)), the statistics taken before the draw."""
    source = weight.float()
    mean, std = source.mean(), source.std() if source.numel() > 1 else torch.zeros(())
    shape = list(weight.shape)
    shape[dim] = len(units)
    fresh = torch.randn(shape, generator=generator, dtype=torch.float32) * std + mean
    weight.index_copy_(dim, units.to(weight.device), fresh.to(device=weight.device, dtype=weight.dtype))
