"""A model's own FLOP count (`model.flops_per_token`, model/flops.py) against PyTorch's.

Reference: `torch.utils.flop_counter.FlopCounterMode`, which counts every matrix product a forward (and a
backward) really runs, shape by shape. The models run with eager attention (the score matrix in full, as
counted) and the experts' plain per-expert loop (the row-blocked loop pads a tail with zero rows: speed work,
not model FLOPs). Both families, dense and MoE: top-1, top-2, a shared expert, every-other layers, experts of
their own size; a capacity factor as the bound it is.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from flash_experts.model import GPT2MoEConfig, GPT2MoEForCausalLM
from flash_experts.model.config import LlamaMoEConfig
from flash_experts.model.llama_moe import LlamaMoEForCausalLM
from flash_experts.model.moe import MoELayer

BATCH, CONTEXT = 3, 16

RECIPES = {
    "dense": dict(moe_layers=[]),
    "top1": dict(num_experts=4, num_experts_per_tok=1, moe_layers="all"),
    "top2": dict(num_experts=4, num_experts_per_tok=2, moe_layers="all"),
    "shared": dict(num_experts=4, num_experts_per_tok=2, moe_layers="all", moe_intermediate_size=24,
                   shared_expert_intermediate_size=24),
    "every_other": dict(num_experts=4, num_experts_per_tok=2, moe_layers="every_other"),
}


def build(family: str, recipe: dict) -> torch.nn.Module:
    common = dict(attention_implementation="eager", router_detach_input=False, **recipe)
    if family == "gpt2":
        config = GPT2MoEConfig(vocab_size=97, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
        model = GPT2MoEForCausalLM(config)
    else:  # grouped-query attention: 4 query heads over 2 key/value heads
        config = LlamaMoEConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                                **common)
        model = LlamaMoEForCausalLM(config)
    for module in model.modules():
        if isinstance(module, MoELayer):
            for stack in (module.experts, module.shared_expert):
                if stack is not None:
                    stack.backend, stack.row_blocks = "loop", False
    return model


def counted(model: torch.nn.Module, ids: torch.Tensor, training: bool) -> int:
    with FlopCounterMode(display=False) as counter:
        out = model(input_ids=ids, labels=ids)
        if training:
            out.loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_flops_per_token_equal_torchs_counter_forward_and_training(family, recipe):
    torch.manual_seed(0)
    model = build(family, RECIPES[recipe])
    ids = torch.randint(0, 97, (BATCH, CONTEXT))
    tokens = BATCH * CONTEXT
    with torch.no_grad():
        assert counted(model, ids, training=False) == pytest.approx(tokens * model.flops_per_token(CONTEXT), rel=1e-12)
    # forward and backward: every product's input and weight gradients, 3x the forward (the embeddings' lookup
    # is no product in either direction)
    assert counted(model, ids, training=True) == pytest.approx(
        tokens * model.flops_per_token(CONTEXT, training=True), rel=1e-12)


def test_an_moe_layer_costs_its_top_k_experts_and_router_not_all_its_experts():
    """By hand: a GPT-2 MLP of D=32, F=64 costs 2 * 2 * D * F per token; top-k of E such experts cost k of them
    plus the router's 2 * D * E; the dense model and its top-1 upcycle differ by the routers alone."""
    dense, top1, top2 = (build("gpt2", RECIPES[r]) for r in ("dense", "top1", "top2"))
    mlp, router = 2 * 2 * 32 * 64, 2 * 32 * 4
    assert top1.flops_per_token(CONTEXT) - dense.flops_per_token(CONTEXT) == 2 * router
    assert top2.flops_per_token(CONTEXT) - top1.flops_per_token(CONTEXT) == 2 * mlp


def test_a_capacity_factor_bounds_the_experts_cost():
    """Reference: the counter on a layer whose capacity (0.5 x T x K / E per expert) drops assignments: what
    it ran is at most the bound counted, and the bound is c x K experts' products plus the router."""
    torch.manual_seed(0)
    model = build("gpt2", dict(RECIPES["top2"], capacity_factor=0.5))
    ids = torch.randint(0, 97, (BATCH, CONTEXT))
    uncapped = build("gpt2", RECIPES["top2"])
    with torch.no_grad():
        ran = counted(model, ids, training=False)
    bound = model.flops_per_token(CONTEXT)
    assert ran <= BATCH * CONTEXT * bound
    per_layer_saving = 0.5 * 2 * (2 * 2 * 32 * 64)  # half of the two experts' products
    assert uncapped.flops_per_token(CONTEXT) - bound == pytest.approx(2 * per_layer_saving)


def test_quantized_experts_cost_what_their_float_experts_cost():
    from flash_experts.model.quantize import quantize

    model = build("llama", RECIPES["top2"])
    before = model.flops_per_token(CONTEXT)
    quantize(model, "int8")
    assert model.flops_per_token(CONTEXT) == before
