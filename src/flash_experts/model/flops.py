"""What a model's forward costs per token, in floating-point operations of its matrix products.

A contest at equal compute (flash_experts/contest) gives every contender the same budget of training FLOPs,
so each model says what a token costs it: `model.flops_per_token(context)` (CausalLMForward, both families).
Counted as the products run, the way `torch.utils.flop_counter.FlopCounterMode` counts them (tests compare the
two): 2 x in x out per token for every linear map (the attention and MLP projections, the LM head), the
attention scores and weighted values over the whole window (4 x context x heads x head_dim per token per layer:
the score matrix is computed in full, then masked), and for a MoE layer the router (2 x D x E), the top-k
experts each token goes to and the shared expert. Elementwise work (norms, activations, softmax, the combine)
is left out, as in Kaplan et al.'s and PaLM's model-FLOP counts.

A capacity factor c < 1 caps each expert at c x T x K / E assignments, so a token's experts cost at most
c x K experts' products: that bound is what is counted (the layer never computes more; it computes less when
the routing leaves some experts below their capacity). Training costs 3x the forward (the backward computes
a gradient for each product's input and for its weight: two products of the forward's size), the count PaLM's
model FLOPs use; frozen weights and detached router inputs make the real backward a little cheaper.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

TRAINING_MULTIPLE = 3  # forward + backward (input and weight gradients) of every matrix product


def linear_flops_per_token(module: nn.Module) -> float:
    """2 x in x out for a linear map: nn.Linear, a quantized one (model/quantize: the same in_features and
    out_features) or GPT-2's Conv1D (weight (in, out)); 0 for any other module."""
    if isinstance(module, Conv1D):
        return 2.0 * module.weight.shape[0] * module.weight.shape[1]
    if isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int):
        return 2.0 * module.in_features * module.out_features
    return 0.0


def expert_stack_flops_per_token(experts: nn.Module) -> float:
    """One token through one expert of a GroupedExperts stack (stacked weights (E, in, out)) or of its quantized
    form (a linear map per projection per expert): every projection's 2 x in x out, the gate's too when the
    experts are gated (SwiGLU)."""
    names = ("w_gate", "w_up", "w_down") if experts.gated else ("w_up", "w_down")
    if getattr(experts, "w_up", None) is not None:
        return sum(2.0 * getattr(experts, name).shape[1] * getattr(experts, name).shape[2] for name in names)
    first = experts.experts[0]  # QuantizedGroupedExperts: every expert has the same shapes
    return sum(linear_flops_per_token(first[name]) for name in names)


def moe_layer_flops_per_token(layer: nn.Module) -> float:
    """The router's scores, the top-k routed experts (at most c x K of them under a capacity factor c < 1) and
    the shared expert."""
    routed = layer.top_k * expert_stack_flops_per_token(layer.experts)
    if 0 < layer.capacity_factor < 1:
        routed *= layer.capacity_factor
    shared = expert_stack_flops_per_token(layer.shared_expert) if layer.shared_expert is not None else 0.0
    return 2.0 * layer.router.weight.shape[1] * layer.num_experts + routed + shared


def module_flops_per_token(module: nn.Module) -> float:
    """The products of `module` and everything inside it, per token (attention scores excepted: they depend
    on the context, see `forward_flops_per_token`). A MoE layer is counted as a whole (its experts' weights are
    stacks, not linear maps, and a token uses only K of them)."""
    from flash_experts.model.moe import MoELayer

    if isinstance(module, MoELayer):
        return moe_layer_flops_per_token(module)
    own = linear_flops_per_token(module)
    return own + sum(module_flops_per_token(child) for child in module.children())


def forward_flops_per_token(model: nn.Module, context: int) -> float:
    """The forward's matrix-product FLOPs per token for windows of `context` tokens (model: one of ours,
    whose config says its layers, heads and head size)."""
    config = model.config
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention_width = config.num_attention_heads * head_dim
    scores_and_values = 2 * 2.0 * context * attention_width
    return module_flops_per_token(model) + layers * scores_and_values
