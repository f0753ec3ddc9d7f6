"""Our Llama-family MoE as a vanilla transformers `MixtralForCausalLM` folder: no remote code needed.

The parameters map one to one (attention, norms, embeddings, router = Mixtral's `gate`); each layer's
experts go into Mixtral's fused `gate_up_proj` (E, 2F, D: gate rows first, as `MixtralExperts.forward`
splits them) and `down_proj` (E, D, F). Dense layers become identical experts (see `export.common`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from flash_experts.export.common import check_exportable, expert_tensors, fresh_output


def mixtral_config(config) -> MixtralConfig:  # noqa: ANN001 (a LlamaMoEConfig)
    return MixtralConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act=config.hidden_act,
        max_position_embeddings=config.max_position_embeddings, initializer_range=config.initializer_range,
        rms_norm_eps=config.rms_norm_eps, rope_parameters=dict(config.rope_parameters),
        sliding_window=config.sliding_window, tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        num_local_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
        router_aux_loss_coef=config.router_aux_loss_coef, router_jitter_noise=0.0, attention_dropout=0.0,
    )


@torch.no_grad()
def to_mixtral(model: PreTrainedModel) -> MixtralForCausalLM:
    """A `MixtralForCausalLM` computing `model`'s function (float32; refused settings raise a UserError)."""
    check_exportable(model, "mixtral")
    mixtral = MixtralForCausalLM(mixtral_config(model.config)).float().eval()
    ours = model.state_dict()
    target = mixtral.state_dict()
    for name, tensor in ours.items():  # everything outside the MLPs has the same name in both
        if ".mlp." not in name and name in target:
            target[name].copy_(tensor)
    for index, layer in enumerate(expert_tensors(model)):
        prefix = f"model.layers.{index}.mlp"
        target[f"{prefix}.gate.weight"].copy_(layer.router_ED)
        target[f"{prefix}.experts.gate_up_proj"].copy_(torch.cat([layer.gate_EFD, layer.up_EFD], dim=1))
        target[f"{prefix}.experts.down_proj"].copy_(layer.down_EDF)
    missing = [name for name in target if ".mlp." not in name and name not in ours]
    if missing:
        raise AssertionError(f"Mixtral parameters with no source: {missing[:3]}")
    if model.config.tie_word_embeddings:
        mixtral.tie_weights()
    return mixtral


def export_mixtral(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, out: Path) -> Path:
    """Write `model` as a Mixtral folder at `out` (which must not exist), with the tokenizer beside it."""
    mixtral = to_mixtral(model)
    with fresh_output(Path(out), is_folder=True) as partial:
        mixtral.save_pretrained(partial)
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
    return Path(out)
