"""What both export formats share: which models map, and every layer's experts in one uniform layout.

Mixtral and llama.cpp's `llama` architecture describe the same function: a Llama block whose MLP is a
softmax router over E SwiGLU experts, the top-k weights renormalised to sum to 1, every layer an MoE layer
with the same E and k. Our models differ in three ways, handled here once:
- layers that stayed dense become E identical copies of their MLP behind an all-zero router: the router's
  probabilities are then uniform, any k of them renormalise to 1/k each, and k identical experts weighted
  1/k sum to the dense MLP (the same function, in exact arithmetic);
- our experts are stored (in, out) for grouped matmuls; both formats want nn.Linear's (out, in);
- settings with no counterpart are refused, each with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedModel

from flash_experts.errors import UserError

GPT2_TRAVELS_AS_REMOTE_CODE = (
    "a GPT-2 MoE model has no Mixtral or GGUF form (neither transformers nor llama.cpp has a GPT-2 MoE class); "
    "its checkpoint folder already travels as remote code: "
    "AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)"
)


@dataclass
class LayerExperts:
    """One layer's MLP as E experts: router (E, D); gate and up (E, F, D); down (E, D, F), nn.Linear layout."""

    router_ED: Tensor
    gate_EFD: Tensor
    up_EFD: Tensor
    down_EDF: Tensor


def check_exportable(model: PreTrainedModel, target: str) -> None:
    """Raise a UserError naming the first thing about `model` that `target` ("mixtral", "gguf") cannot hold."""
    model_type = model.config.model_type
    if model_type == "gpt2_moe":
        raise UserError(GPT2_TRAVELS_AS_REMOTE_CODE)
    if model_type != "llama_moe":
        raise UserError(
            f"export takes an MoE model made by this package (model type llama_moe); this one is {model_type!r}, "
            f"which transformers and llama.cpp load as it is"
        )
    config = model.config
    if not config.moe_layer_indices():
        raise UserError("this model has no MoE layer (moe_layers=[]): it is a dense Llama; export the dense source")
    refusals = [
        (config.capacity_factor > 0,
         f"capacity_factor={config.capacity_factor}: {target} is dropless (every token reaches its experts)"),
        (config.router_jitter > 0,
         f"router_jitter={config.router_jitter}: Mixtral's jitter noise also scales the experts' inputs, ours only "
         f"the router's; set router_jitter=0 (it acts in training only) and save again"),
        (not config.normalize_top_k and config.num_experts_per_tok < config.num_experts,
         f"normalize_top_k=False: {target} always renormalises the top-k weights"),
        (config.attention_bias or config.o_proj_bias, f"attention biases (Qwen2-style): {target}'s Mixtral/llama "
                                                      f"layout has none"),
        (config.mlp_bias, f"MLP biases: {target}'s experts have none"),
        (config.hidden_act != "silu", f"hidden_act={config.hidden_act!r}: {target}'s experts are SwiGLU (silu)"),
        (config.shared_expert_intermediate_size > 0, f"a shared expert: {target}'s MoE layers have routed experts only"),
        (config.moe_intermediate_size not in (None, config.intermediate_size),
         f"experts of hidden size {config.moe_intermediate_size} beside dense MLPs of {config.intermediate_size}: "
         f"{target} has one feed-forward size"),
    ]
    if target == "gguf":
        rope_type = (config.rope_parameters or {}).get("rope_type", "default")
        refusals += [
            (rope_type != "default", f"rope_type={rope_type!r}: only default RoPE is written to GGUF here"),
            (config.sliding_window is not None, "a sliding attention window is not written to GGUF here"),
        ]
    for refused, reason in refusals:
        if refused:
            raise UserError(f"cannot export to {target}: {reason}")


@torch.no_grad()
def expert_tensors(model: PreTrainedModel) -> Iterator[LayerExperts]:
    """Every decoder layer's MLP as E experts (see the module docstring), in float32, layer by layer."""
    num_experts = model.config.num_experts
    for layer in model.model.layers:
        mlp = layer.mlp
        if layer.is_moe:
            experts = mlp.experts
            yield LayerExperts(
                router_ED=mlp.router.weight.detach().float(),
                gate_EFD=experts.w_gate.detach().float().transpose(1, 2),
                up_EFD=experts.w_up.detach().float().transpose(1, 2),
                down_EDF=experts.w_down.detach().float().transpose(1, 2),
            )
        else:
            def copies(weight: Tensor) -> Tensor:
                return weight.detach().float().unsqueeze(0).expand(num_experts, *weight.shape)

            yield LayerExperts(
                router_ED=mlp.gate_proj.weight.detach().new_zeros(num_experts, model.config.hidden_size).float(),
                gate_EFD=copies(mlp.gate_proj.weight),
                up_EFD=copies(mlp.up_proj.weight),
                down_EDF=copies(mlp.down_proj.weight),
            )


def refuse_existing_output(out: Path, empty_folder_ok: bool = False) -> None:
    """Commands that write a model never overwrite: a UserError when `out` exists (with `empty_folder_ok`, when
    it is anything but an empty folder). Callers check early, before loading a model. An older model's files
    left beside a new one (extra shards, another tokenizer) would make a folder that loads as neither."""
    out = Path(out)
    if empty_folder_ok and out.is_dir() and not any(out.iterdir()):
        return
    if out.exists():
        raise UserError(f"{out} already exists: choose a new output path (models are never written over others)")


@contextlib.contextmanager
def fresh_output(out: Path, is_folder: bool) -> Iterator[Path]:
    """Yield a temporary path beside `out` to write into; it becomes `out` only if the block completes.

    `out` must not exist (nothing is overwritten); on any error the temporary path is removed, so a failed
    export leaves nothing behind.
    """
    out = Path(out)
    refuse_existing_output(out)
    if not out.parent.is_dir():
        raise UserError(f"output folder {out.parent} does not exist")
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    if is_folder:
        partial.mkdir()
    try:
        yield partial
        os.replace(partial, out)
    finally:
        if partial.is_dir():
            shutil.rmtree(partial)
        elif partial.exists():
            partial.unlink()
