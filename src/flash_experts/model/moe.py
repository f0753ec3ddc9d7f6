"""A Mixture-of-Experts layer, top-down: the settings, the router, the experts, the layer, the losses.

A dense transformer block sends every token through one MLP. An MoE block holds E MLPs (the experts) and a
router that sends each token to K of them (top-k), so the model holds E times the MLP parameters while each
token pays for K MLPs. Shapes: T tokens, D model width, F expert hidden width, E experts, K experts per token,
N = T*K token-to-expert assignments (fewer when a capacity limit drops some).

The layer never loops over tokens: assignments are sorted by expert so that each expert's tokens are one
contiguous slice, and each expert projection is one grouped product over those slices (`grouped_linear`, in
`expert_products.py` beside this file with the other speed work: what it computes is written below).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable, Literal, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flash_experts.model.buffers import ExpertWeightBuffers
from flash_experts.model.expert_products import (
    chosen_experts_product,
    combine_expert_outputs,
    every_expert_product,
    grouped_linear,
)


@dataclass
class MoESettings:
    """Every Mixture-of-Experts setting, defined once: the model configs hold these fields under these names
    (HF Mixtral's where it has one), the training config's `moe:` section is these plus how upcycled experts
    start, `upcycle()` takes them as keywords, and `MoELayer` reads the per-layer ones."""

    num_experts: int = 8
    num_experts_per_tok: int = 2  # top-k (HF Mixtral's name: transformers reserves `top_k` for generation)
    # "all", "every_other" (layers 1, 3, 5, ... as in GShard/Switch) or a list of layer indices; [] = dense
    moe_layers: Union[Literal["all", "every_other"], list[int]] = "every_other"
    router_aux_loss_coef: float = 0.01  # weight of the Switch load-balancing loss
    router_z_loss_coef: float = 0.001  # weight of the ST-MoE router z-loss
    router_jitter: float = 0.0  # multiplicative noise in [1 - jitter, 1 + jitter] on the router's input (Switch)
    # The router reads its input detached: it still learns from the task loss, but the model below learns only
    # from what the experts compute (docs/UPCYCLING.md, "Routers that learn").
    router_detach_input: bool = False
    capacity_factor: float = 0.0  # 0 = dropless; else each expert takes ceil(factor * T * K / E) assignments
    normalize_top_k: bool = True  # the K weights sum to 1: an upcycled model then equals its dense source
    # With top-k >= 2, whether the gradient flows through that sum (HF Mixtral's gradient: the chosen experts
    # compete, only their relative weights learn) or sees it held constant (the default: each chosen expert's
    # probability is pushed by its own output, the Switch gradient; see Router). Same forward either way.
    renormalize_through_sum: bool = False
    # Each expert's hidden size; None = the model's MLP size, as upcycling needs (experts are copies of the MLP).
    # Smaller experts, more of them and a larger top-k = finer granularity at the same arithmetic (DeepSeekMoE);
    # the model's dense layers keep the MLP size. (Qwen2-MoE's and DeepSeek's name.)
    moe_intermediate_size: Optional[int] = None
    # A dense MLP of this hidden size beside the routed experts, every token through it, its output added
    # (DeepSeekMoE's shared experts: K_s shared experts of hidden h are one MLP of hidden K_s * h). 0 = none.
    shared_expert_intermediate_size: int = 0

    @staticmethod
    def names() -> list[str]:
        return [field.name for field in dataclasses.fields(MoESettings)]

    @staticmethod
    def of(holder: object) -> MoESettings:
        """The settings `holder` carries under these names (a model config, the training config's moe section)."""
        return MoESettings(**{name: getattr(holder, name) for name in MoESettings.names()})


# -- the router ------------------------------------------------------------------------------------------------

class RouterChoice(NamedTuple):
    """The router's decision for T tokens (a named tuple: `routing.experts_TK`, or unpacked in this order)."""

    weights_TK: Tensor  # fp32: how much each chosen expert's output counts
    experts_TK: Tensor  # long: the chosen experts, best first
    logits_TE: Tensor  # fp32: the router's scores (the z-loss keeps them small)
    probs_TE: Tensor  # fp32: softmax over all experts (the balancing loss reads it)


class Router(nn.Module):
    """Linear scores -> softmax (in fp32) -> top-k experts and their weights."""

    def __init__(self, hidden_size: int, settings: MoESettings):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(settings.num_experts, hidden_size))
        self.top_k = settings.num_experts_per_tok
        self.jitter = settings.router_jitter
        self.normalize_top_k = settings.normalize_top_k
        self.through_sum = settings.renormalize_through_sum
        self.detach_input = settings.router_detach_input

    def forward(self, x_TD: Tensor) -> RouterChoice:
        if self.detach_input:  # the router learns from its input; the input learns nothing from routing
            x_TD = x_TD.detach()
        # In fp32, autocast off: bf16 scores flip top-k choices between near-equal experts.
        with torch.autocast(x_TD.device.type, enabled=False):
            x_TD = x_TD.float()
            if self.training and self.jitter > 0:
                x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            logits_TE = F.linear(x_TD, self.weight.float())
            probs_TE = logits_TE.softmax(dim=-1)
            weights_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.normalize_top_k:
            # The value is renormalised (the K weights sum to 1), but the sum is a constant to autograd:
            # w_k = p_k / stop_gradient(sum_j p_j). Dividing by the live sum would make top-1's weight p / p = 1,
            # whose derivative is 0: the router would learn nothing from the language-model loss. With the sum
            # held constant the gradient is the Switch Transformer's (output p * expert(x), d/dp = expert(x)),
            # scaled by 1/sum_j p_j; for top-1 this is "p / stop_gradient(p)", forward value exactly 1.
            # `renormalize_through_sum` (top-k >= 2 only) divides by the live sum instead: Mixtral's gradient.
            total_TK = weights_TK.sum(dim=-1, keepdim=True)
            weights_TK = weights_TK / (total_TK if self.through_sum else total_TK.detach())
        return RouterChoice(weights_TK, experts_TK, logits_TE, probs_TE)


# -- the experts -----------------------------------------------------------------------------------------------

def expert_mlp(x: Tensor, project: Callable[[str, Tensor], Tensor], gated: bool,
               activation: Callable[[Tensor], Tensor]) -> Tensor:
    """An expert's MLP, whatever computes its projections (`project(name, x)`, name one of w_gate, w_up,
    w_down): down(act(up(x))) (GPT-2), or down(act(gate(x)) * up(x)) (SwiGLU). Every dispatch of the layer and
    the quantized experts run this one function."""
    up = project("w_up", x)
    hidden = activation(project("w_gate", x)) * up if gated else activation(up)
    return project("w_down", hidden)


def expert_compute_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device (the expert products are matmuls, which autocast
    would lower, but it does not see inside grouped or `out=` products), else x's own dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class GroupedExperts(nn.Module):
    """E expert MLPs stored as stacked weights, (in, out) per expert (GPT-2's Conv1D layout, so upcycling copies
    a dense MLP's weights as they are). GPT-2 style (`gated=False`): act(x @ w_up + b_up) @ w_down + b_down;
    Llama/Mixtral style (`gated=True`): (act(x @ w_gate) * (x @ w_up)) @ w_down, no biases."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, activation: Callable[[Tensor], Tensor],
                 gated: bool, bias: bool):
        super().__init__()
        E, D, F_ = num_experts, hidden_size, ffn_size
        self.num_experts, self.activation, self.gated = num_experts, activation, gated
        self.w_gate = nn.Parameter(torch.empty(E, D, F_)) if gated else None
        self.w_up = nn.Parameter(torch.empty(E, D, F_))
        self.w_down = nn.Parameter(torch.empty(E, F_, D))
        self.b_up = nn.Parameter(torch.zeros(E, F_)) if bias else None
        self.b_down = nn.Parameter(torch.zeros(E, D)) if bias else None
        self.backend = "auto"  # how grouped_linear computes ("auto", "grouped_mm", "loop"); tests pin one
        self.row_blocks = None  # the loop's products in row blocks (None: where that helps); benchmarks pin it
        # Memory the training step reuses for each weight's compute-dtype copy and gradient (model/buffers.py);
        # not state: never saved, and a copied model starts without it.
        self.weight_buffers = {name: ExpertWeightBuffers() for name in ("w_gate", "w_up", "w_down")}

    def bias(self, name: str) -> Tensor | None:
        return {"w_up": self.b_up, "w_down": self.b_down}.get(name)

    def forward(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """x_ND sorted by expert, `counts_E` rows for each: every row through its own expert, in the compute
        dtype. Each projection: y[rows of e] = x[rows of e] @ w[e] + b[e]."""
        x_ND = x_ND.to(expert_compute_dtype(x_ND))

        def project(name: str, h: Tensor) -> Tensor:
            bias = self.bias(name)
            return grouped_linear(h, getattr(self, name), None if bias is None else bias.to(h.dtype), counts_E,
                                  self.backend, self.weight_buffers.get(name), self.row_blocks)

        with torch.autocast(x_ND.device.type, enabled=False):  # x is cast; autocast must not re-cast inside
            return expert_mlp(x_ND, project, self.gated, self.activation)


# -- where the experts run -------------------------------------------------------------------------------------

class LocalExperts:
    """Every expert in this process: the assignments' rows go straight to the layer's experts. The other choice
    is `expert_parallel.AllToAllExperts` (the experts spread over processes); a layer holds one of the two as
    `expert_dispatch`, and the router, the experts' products and the combine are the same code either way."""

    local = True

    def __call__(self, experts: nn.Module, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """The experts' outputs for x_ND's rows (sorted by expert, `counts_E` rows each), in the same order."""
        return experts(x_ND, counts_E)


# -- the layer -------------------------------------------------------------------------------------------------

FIXED_SHAPE_MAX_ROWS = 64  # FixedShapeDispatch runs every expert on every row: beyond this many, sorting wins


class MoELayer(nn.Module):
    """Router + experts (+ a shared expert, when the settings ask for one). Replaces a dense MLP: (B, T, D) ->
    (B, T, D), plus what the router did (BatchRouting). `ffn_size` is the model's MLP size: the experts' unless
    `settings.moe_intermediate_size` says otherwise."""

    def __init__(self, settings: MoESettings, *, hidden_size: int, ffn_size: int,
                 activation: Callable[[Tensor], Tensor], gated: bool, bias: bool, layer_index: int):
        super().__init__()
        self.num_experts, self.top_k = settings.num_experts, settings.num_experts_per_tok
        self.capacity_factor = settings.capacity_factor
        self.layer_index = layer_index
        self.expert_dispatch = LocalExperts()  # or AllToAllExperts (model/expert_parallel.py): same call
        # how assignments reach the experts: sorted by expert (training, evaluation, prefill), or in shapes that do
        # not depend on the routing (FixedShapeDispatch, which the compiled decode step sets: generation/compiled.py)
        self.dispatch: SortedDispatch | FixedShapeDispatch = SORTED
        self.router = Router(hidden_size, settings)
        expert_size = settings.moe_intermediate_size or ffn_size
        self.experts = GroupedExperts(settings.num_experts, hidden_size, expert_size, activation, gated, bias)
        # The shared expert is an expert stack of one that every token is sent to: the same products, the same
        # initialisation and quantization as the routed experts.
        shared_size = settings.shared_expert_intermediate_size
        self.shared_expert = (GroupedExperts(1, hidden_size, shared_size, activation, gated, bias)
                              if shared_size else None)

    def capacity(self, num_tokens: int) -> int | None:
        """Assignments each expert may take, or None when dropless."""
        if self.capacity_factor <= 0:
            return None
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

    def forward(self, x_BTD: Tensor) -> tuple[Tensor, BatchRouting]:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        routing = self.router(x_TD)
        out_TD, counts_E, dropped = self.dispatch(self, x_TD, routing)
        if self.shared_expert is not None:  # every token, weight 1
            out_TD = out_TD + self.shared_expert(x_TD, torch.tensor([B * T], device=x_TD.device))
        stats = BatchRouting.of(self.layer_index, routing, counts_E, dropped)
        return out_TD.to(x_BTD.dtype).reshape(B, T, D), stats


class SortedDispatch:
    """The layer's dispatch (training, evaluation, prefill): sort the N = T*K assignments by expert, run each
    expert on its slice (grouped products), add the outputs back weighted. Returns (out_TD fp32, assignments per
    expert before drops, assignments dropped)."""

    def __call__(self, layer: "MoELayer", x_TD: Tensor, routing: RouterChoice) -> tuple[Tensor, Tensor, Tensor]:
        experts_N = routing.experts_TK.reshape(-1)
        # stable: earlier tokens first, which is also the order in which a capacity limit keeps them
        order_N = torch.argsort(experts_N, stable=True)
        counts_E = torch.bincount(experts_N, minlength=layer.num_experts)
        kept_counts_E, dropped = counts_E, torch.zeros((), dtype=torch.long, device=x_TD.device)
        capacity = layer.capacity(x_TD.shape[0])
        if capacity is not None:
            starts_E = torch.cumsum(counts_E, dim=0) - counts_E
            rank_N = torch.arange(order_N.numel(), device=x_TD.device) - starts_E[experts_N[order_N]]
            order_N = order_N[rank_N < capacity]
            kept_counts_E = counts_E.clamp(max=capacity)
            dropped = (counts_E - kept_counts_E).sum()

        token_N = order_N // layer.top_k
        # Cast before the gather, which copies each row K times: under bf16 autocast half the bytes (and the
        # backward adds a token's K input gradients in bf16, the dtype autocast's own products return them in).
        x_ND = x_TD.to(expert_compute_dtype(x_TD)).index_select(0, token_N)
        expert_out_ND = layer.expert_dispatch(layer.experts, x_ND, kept_counts_E)
        weight_N = routing.weights_TK.reshape(-1)[order_N]
        # Combined in fp32: a token's K outputs summed with weights that sum to 1 keep an upcycled model
        # (identical experts) equal to its dense source. out[t] = sum of weight[n] * expert_out[n] over t's
        # assignments n (expert_products.py does it an expert's rows at a time).
        out_TD = combine_expert_outputs(expert_out_ND, weight_N, token_N, x_TD.shape[0], kept_counts_E)
        return out_TD, counts_E, dropped


class FixedShapeDispatch:
    """The same function in shapes that do not depend on the routing (expert_products.py), for a compiled decode
    step, which needs the same shapes every step (sorting by expert gives new ones): one row reads only its K
    experts' weights, through the expert index; several rows run every expert on every row and weight the
    unchosen ones by zero (each weight read once, E/K times the expert arithmetic). Tested against SortedDispatch.
    Where its shapes cannot serve (more than FIXED_SHAPE_MAX_ROWS rows, a capacity limit that would drop
    assignments of several rows, experts on other processes) it is the sorted dispatch."""

    def __call__(self, layer: "MoELayer", x_TD: Tensor, routing: RouterChoice) -> tuple[Tensor, Tensor, Tensor]:
        rows = x_TD.shape[0]
        if (not layer.expert_dispatch.local or rows > FIXED_SHAPE_MAX_ROWS
                or (rows > 1 and layer.capacity(rows) is not None)):
            return SORTED(layer, x_TD, routing)
        experts = layer.experts
        chosen_TKE = F.one_hot(routing.experts_TK, layer.num_experts).to(routing.weights_TK.dtype)
        if rows == 1:
            out_TD = 0
            for k in range(layer.top_k):
                project = functools.partial(chosen_experts_product, experts, routing.experts_TK[:, k])
                out_TD = out_TD + routing.weights_TK[:, k, None] * expert_mlp(x_TD, project, experts.gated,
                                                                             experts.activation)
        else:
            project = functools.partial(every_expert_product, experts)
            out_ETD = expert_mlp(x_TD[None], project, experts.gated, experts.activation)
            weights_TE = (routing.weights_TK[..., None] * chosen_TKE).sum(1)
            out_TD = torch.einsum("te,etd->td", weights_TE, out_ETD)
        return out_TD, chosen_TKE.sum((0, 1)), torch.zeros((), dtype=torch.long, device=x_TD.device)


SORTED = SortedDispatch()


# -- the losses and what the router did -----------------------------------------------------------------------

def load_balancing_loss(probs_TE: Tensor, counts_E: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss: E * sum_e f_e * P_e, f_e the share of the assignments expert e
    received, P_e its mean router probability. 1.0 when routing is uniform; it grows as load concentrates."""
    counts_E = counts_E.to(probs_TE.dtype)
    return probs_TE.shape[-1] * torch.sum(counts_E / counts_E.sum() * probs_TE.mean(dim=0))


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(router logits)^2 (keeps router logits small)."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


@dataclass
class BatchRouting:
    """One MoE layer's routing of one batch (what `out.router_stats` lists, one per MoE layer). Over a whole
    split these add up to a SplitRouting (model/routing.py)."""

    layer: int
    tokens_per_expert: Tensor  # (E,) long: assignments each expert received (before capacity drops)
    dropped_tokens: Tensor  # () long: token-to-expert assignments dropped by the capacity limit
    load_balancing_loss: Tensor  # () Switch loss, unweighted (1.0 = perfectly balanced)
    z_loss: Tensor  # () ST-MoE router z-loss, unweighted
    entropy: Tensor  # () mean entropy of the routing distribution, in nats
    top1_prob: Tensor  # () mean over tokens of the largest routing probability (1/E uniform, 1.0 certain)

    @staticmethod
    def of(layer: int, choice: RouterChoice, counts_E: Tensor, dropped: Tensor) -> "BatchRouting":
        """The one place a BatchRouting is computed. The two losses keep their graph (they are trained); the
        descriptive numbers are detached."""
        probs_TE = choice.probs_TE
        return BatchRouting(
            layer=layer,
            tokens_per_expert=counts_E.detach().long(),
            dropped_tokens=dropped.detach(),
            load_balancing_loss=load_balancing_loss(probs_TE, counts_E),
            z_loss=router_z_loss(choice.logits_TE),
            entropy=-(probs_TE * torch.log_softmax(choice.logits_TE, dim=-1)).sum(-1).mean().detach(),
            top1_prob=probs_TE.max(dim=-1).values.mean().detach(),
        )
