"""The Mixture-of-Experts layer: router, stacked experts, grouped dispatch, auxiliary losses.

Shapes: T tokens, D model width, F expert hidden width, E experts, K experts per token (top-k), N = T*K
token-to-expert assignments (fewer when a capacity drops some).

The dispatch never loops over tokens. Assignments are sorted by expert so that each expert's tokens are one
contiguous slice, then both expert matmuls run as grouped matrix products over those slices
(`torch._grouped_mm` where it is one fused kernel; elsewhere, CPU included, one BLAS call per expert into a
shared output, measured at least as fast: see `grouped_linear`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flash_experts.errors import ConfigError
from flash_experts.model.buffers import ExpertWeightBuffers


@dataclass
class RouterStats:
    """What one MoE layer's router did on one forward pass."""

    layer: int
    tokens_per_expert: Tensor  # (E,) long: assignments each expert received (before capacity drops)
    dropped_tokens: Tensor  # () long: token-to-expert assignments dropped by the capacity limit
    load_balancing_loss: Tensor  # () Switch loss, unweighted (1.0 = perfectly balanced)
    z_loss: Tensor  # () ST-MoE router z-loss, unweighted
    entropy: Tensor  # () mean entropy of the routing distribution, in nats
    top1_prob: Tensor  # () mean over tokens of the largest routing probability (1/E uniform, 1.0 certain)


def routing_stats(layer: int, logits_TE: Tensor, probs_TE: Tensor, counts_E: Tensor, dropped: Tensor) -> RouterStats:
    """One forward's RouterStats from the router's logits and softmax and the assignments per expert: the one
    place they are computed, for the training dispatch and the fixed-shape decode step alike. The balancing
    and z losses keep their graph (they are trained); the descriptive numbers are detached."""
    log_probs_TE = torch.log_softmax(logits_TE, dim=-1)
    return RouterStats(
        layer=layer,
        tokens_per_expert=counts_E.detach().long(),
        dropped_tokens=dropped.detach(),
        load_balancing_loss=load_balancing_loss(probs_TE, counts_E),
        z_loss=router_z_loss(logits_TE),
        entropy=-(probs_TE * log_probs_TE).sum(-1).mean().detach(),
        top1_prob=probs_TE.max(dim=-1).values.mean().detach(),
    )


def load_balancing_loss(probs_TE: Tensor, counts_E: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss: E * sum_e f_e * P_e.

    f_e is the share of the T*K assignments that went to expert e (`counts_E`: assignments per expert, which
    the dispatch has counted already), P_e the mean router probability of e. It is 1.0 when routing is
    uniform and grows as load concentrates on few experts.
    """
    counts_E = counts_E.to(probs_TE.dtype)
    fraction_E = counts_E / counts_E.sum()
    mean_prob_E = probs_TE.mean(dim=0)
    return probs_TE.shape[-1] * torch.sum(fraction_E * mean_prob_E)


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(router logits)^2 (keeps router logits small)."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


class Router(nn.Module):
    """Linear scores -> softmax (in fp32) -> top-k experts and their weights."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, jitter: float, normalize_top_k: bool,
                 detach_input: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k = top_k
        self.jitter = jitter
        self.normalize_top_k = normalize_top_k
        self.detach_input = detach_input

    def forward(self, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns (weights_TK fp32, experts_TK long, logits_TE fp32, probs_TE fp32)."""
        if self.detach_input:  # the router learns from its input; the input learns nothing from routing
            x_TD = x_TD.detach()
        with torch.autocast(x_TD.device.type, enabled=False):
            return self._route(x_TD.float())

    def _route(self, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * noise
        # Routing decisions are made in fp32 (autocast off): bf16 scores flip top-k choices between near-equal
        # experts.
        logits_TE = F.linear(x_TD, self.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        weights_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.normalize_top_k:
            # The value is renormalised (the K weights sum to 1, so identical upcycled experts reproduce the
            # dense MLP exactly), but the sum is a constant to autograd: w_k = p_k / stop_gradient(sum_j p_j).
            # Dividing by the live sum would make top-1's weight p / p = 1, whose derivative is 0: the router
            # would learn nothing from the language-model loss. With the sum held constant the gradient is the
            # Switch Transformer's (its output is p * expert(x), d/dp = expert(x)), scaled by 1/sum_j p_j; for
            # top-1 this is the "p / stop_gradient(p)" estimator, forward value exactly 1.
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True).detach()
        return weights_TK, experts_TK, logits_TE, probs_TE


GROUPED_BACKENDS = ("auto", "grouped_mm", "loop")


def grouped_linear(x_ND: Tensor, w_EDF: Tensor, b_EF: Tensor | None, counts_E: Tensor, backend: str = "auto",
                   buffers: ExpertWeightBuffers | None = None) -> Tensor:
    """y[rows of expert e] = x[rows of expert e] @ w[e] + b[e]; rows sorted by expert, `counts_E` rows each.

    The product runs in x's dtype: `w` may be stored in another (fp32 master weights under bf16 autocast) and
    its gradient comes back in its own dtype; `b` must already be in x's dtype. `buffers` (the weight's own,
    kept by its module) lets the loop reuse the memory of `w`'s compute-dtype copy and of its gradient from one
    training step to the next (model/buffers.py says why that matters on CPU).
    Two interchangeable implementations (the tests hold both to the same loop reference):
    - "grouped_mm": `torch._grouped_mm`, one kernel for all experts (the bias is gathered per row);
    - "loop": one BLAS call per non-empty expert writing into one output, the bias fused (`addmm`), with a
      hand-written backward of the same shape (no split/cat copies, no per-row bias gather). The weights are
      cast once, for the forward and the backward together, and a weight gradient computed in bf16 passes
      through one scratch matrix on its way into the fp32 gradient.
    "auto" takes `_grouped_mm` where it is one fused kernel (CUDA, bf16, Hopper or newer), else the loop. On
    CPU `_grouped_mm` is itself a loop of per-expert matmuls, and ours is at least as fast with less peak
    memory (benchmarks/bench_moe.py prints both rows).
    """
    if backend == "auto":
        backend = "grouped_mm" if _fused_grouped_mm(x_ND, w_EDF) else "loop"
    if backend == "grouped_mm":
        offsets_E = torch.cumsum(counts_E, dim=0).to(torch.int32)
        y_NF = torch._grouped_mm(x_ND, w_EDF.to(x_ND.dtype), offs=offsets_E)
        if b_EF is None:
            return y_NF
        # index_select rather than b[experts]: its backward is index_add_ (parallel on CPU), where advanced
        # indexing's is an accumulating index_put_ (serial on CPU).
        experts_N = torch.repeat_interleave(torch.arange(len(counts_E), device=x_ND.device), counts_E,
                                            output_size=x_ND.shape[0])
        return y_NF + b_EF.index_select(0, experts_N)
    if backend != "loop":
        raise ConfigError(f"unknown grouped backend {backend!r}; choose from {GROUPED_BACKENDS}")
    training = torch.is_grad_enabled() and w_EDF.requires_grad
    if not training:
        buffers = None  # inference allocates plainly: concurrent forwards (the studio's) never share memory
    if w_EDF.dtype == x_ND.dtype:
        w_compute_EDF = w_EDF.detach()
    elif buffers is not None:
        w_compute_EDF = buffers.compute_copy.take(w_EDF.shape, x_ND.dtype, w_EDF.device)
        with torch.no_grad():
            # Every forward casts again: optimizers update weights in place without always bumping their
            # version counter (fused AdamW does not), so no "weights unchanged, skip the cast" test is safe.
            w_compute_EDF.copy_(w_EDF)
    else:
        w_compute_EDF = w_EDF.detach().to(x_ND.dtype)
    return _LoopGroupedLinear.apply(x_ND, w_EDF, w_compute_EDF, b_EF, counts_E.tolist(), buffers)


def _fused_grouped_mm(x: Tensor, w: Tensor) -> bool:
    """True where `torch._grouped_mm` is one fused kernel: CUDA, bf16, Hopper or newer, 16-byte aligned rows."""
    return (
        hasattr(torch, "_grouped_mm")
        and x.device.type == "cuda"
        and x.dtype == w.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device)[0] >= 9
        and x.shape[-1] % 8 == 0
        and w.shape[-1] % 8 == 0
    )


class _LoopGroupedLinear(torch.autograd.Function):
    """Per-expert matmuls over contiguous row slices, written in place into one output (and one gradient).
    `w_EDF` is the parameter (its gradient is returned in its dtype); the products read `w_compute_EDF`, the
    same weights in x's dtype."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, w_EDF: Tensor, w_compute_EDF: Tensor, b_EF: Tensor | None,
                counts: list[int], buffers: ExpertWeightBuffers | None) -> Tensor:
        y_NF = x_ND.new_empty(x_ND.shape[0], w_EDF.shape[-1])
        for e, rows in _expert_slices(counts):
            if b_EF is None:
                torch.mm(x_ND[rows], w_compute_EDF[e], out=y_NF[rows])
            else:
                torch.addmm(b_EF[e], x_ND[rows], w_compute_EDF[e], out=y_NF[rows])
        ctx.save_for_backward(x_ND, w_compute_EDF)
        ctx.counts = counts
        ctx.has_bias = b_EF is not None
        ctx.weight_dtype = w_EDF.dtype
        ctx.buffers = buffers
        return y_NF

    @staticmethod
    def backward(ctx, grad_NF: Tensor):
        x_ND, w_compute_EDF = ctx.saved_tensors
        grad_NF = grad_NF.contiguous()
        need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
        grad_x = torch.empty_like(x_ND) if need_x else None
        grad_w = None
        if need_w:
            shape = w_compute_EDF.shape
            if ctx.buffers is None:
                grad_w = w_compute_EDF.new_empty(shape, dtype=ctx.weight_dtype)
            else:
                # A view of the buffer, not the buffer: autograd then keeps it as the weight's .grad without a
                # copy, and the buffer sees that it is held until the optimizer has let it go.
                grad_w = ctx.buffers.gradient.take(shape, ctx.weight_dtype, w_compute_EDF.device).view(shape)
        grad_b = grad_NF.new_empty(w_compute_EDF.shape[0], w_compute_EDF.shape[-1]) if need_b and ctx.has_bias else None
        # Experts that received no rows get exactly zero gradient (zeroing only those saves a pass over all
        # E x D x F weights).
        for e, n in enumerate(ctx.counts):
            if n == 0:
                for grad in (grad_w, grad_b):
                    if grad is not None:
                        grad[e].zero_()
        # A weight gradient is computed in the compute dtype, as autocast computes a dense weight's gradient,
        # into one scratch matrix reused for every expert, then written into the fp32 gradient.
        scratch_DF = None
        if grad_w is not None and grad_w.dtype != x_ND.dtype:
            scratch_DF = x_ND.new_empty(w_compute_EDF.shape[1:])
        for e, rows in _expert_slices(ctx.counts):
            g = grad_NF[rows]
            if grad_x is not None:
                torch.mm(g, w_compute_EDF[e].t(), out=grad_x[rows])
            if grad_w is not None:
                if scratch_DF is None:
                    torch.mm(x_ND[rows].t(), g, out=grad_w[e])
                else:
                    grad_w[e].copy_(torch.mm(x_ND[rows].t(), g, out=scratch_DF))
            if grad_b is not None:
                torch.sum(g, dim=0, out=grad_b[e])
        return grad_x, grad_w, None, grad_b, None, None


def _expert_slices(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


def expert_compute_dtype(x: Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device (the experts are matmuls, which autocast would
    lower, but it does not see inside `_grouped_mm` or `out=` calls), else x's own dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def expert_feed_forward(x: Tensor, up: Callable[[Tensor], Tensor], gate: Callable[[Tensor], Tensor] | None,
                        down: Callable[[Tensor], Tensor], activation: Callable[[Tensor], Tensor]) -> Tensor:
    """An expert's MLP given its projections: down(act(up(x))) (GPT-2), or down(act(gate(x)) * up(x)) (gated).
    Shared by the float experts (grouped products over all experts) and the int8 ones (one expert at a time)."""
    up_x = up(x)
    hidden = activation(gate(x)) * up_x if gate is not None else activation(up_x)
    return down(hidden)


class GroupedExperts(nn.Module):
    """E feed-forward experts stored as stacked weights.

    GPT-2 style (`gated=False`): act(x @ w_up + b_up) @ w_down + b_down.
    Llama/Mixtral style (`gated=True`): (act(x @ w_gate) * (x @ w_up)) @ w_down, no biases.
    Weights are stored (in, out) per expert, which is GPT-2's Conv1D layout, so upcycling copies them as is.
    """

    def __init__(self, num_experts: int, hidden_size: int, ffn_size: int, activation: Callable[[Tensor], Tensor],
                 gated: bool, bias: bool):
        super().__init__()
        self.num_experts = num_experts
        self.activation = activation
        self.gated = gated
        E, D, F_ = num_experts, hidden_size, ffn_size
        self.w_gate = nn.Parameter(torch.empty(E, D, F_)) if gated else None
        self.w_up = nn.Parameter(torch.empty(E, D, F_))
        self.w_down = nn.Parameter(torch.empty(E, F_, D))
        self.b_up = nn.Parameter(torch.zeros(E, F_)) if bias else None
        self.b_down = nn.Parameter(torch.zeros(E, D)) if bias else None
        self.backend = "auto"  # see grouped_linear; the tests and benchmarks pin one
        # Memory the training step reuses for each weight's compute-dtype copy and gradient (model/buffers.py);
        # not state: never saved, and a copied model starts without it.
        self.weight_buffers = {name: ExpertWeightBuffers() for name in ("w_gate", "w_up", "w_down")}

    def forward(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        """x_ND: inputs sorted by expert; counts_E: rows per expert. Returns the outputs in the compute dtype."""
        dtype = expert_compute_dtype(x_ND)
        x_ND = x_ND.to(dtype)

        def linear(name: str, b: Tensor | None = None) -> Callable[[Tensor], Tensor]:
            w = getattr(self, name)
            return lambda x: grouped_linear(x, w, None if b is None else b.to(dtype), counts_E, self.backend,
                                            self.weight_buffers.get(name))

        # x was cast above and grouped_linear casts the weights; autocast must not re-cast inside the products.
        with torch.autocast(x_ND.device.type, enabled=False):
            return expert_feed_forward(x_ND, linear("w_up", self.b_up), linear("w_gate") if self.gated else None,
                                       linear("w_down", self.b_down), self.activation)


class MoELayer(nn.Module):
    """Router + experts. Replaces a dense MLP: (B, T, D) -> (B, T, D), plus RouterStats."""

    def __init__(self, hidden_size: int, ffn_size: int, num_experts: int, top_k: int,
                 activation: Callable[[Tensor], Tensor], gated: bool, bias: bool, layer_index: int,
                 capacity_factor: float = 0.0, jitter: float = 0.0, normalize_top_k: bool = True,
                 router_detach_input: bool = False):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.layer_index = layer_index
        self.router = Router(hidden_size, num_experts, top_k, jitter, normalize_top_k, router_detach_input)
        self.experts = GroupedExperts(num_experts, hidden_size, ffn_size, activation, gated, bias)

    @classmethod
    def from_config(cls, config, *, hidden_size: int, ffn_size: int, activation: Callable[[Tensor], Tensor],
                    gated: bool, bias: bool, layer_index: int) -> "MoELayer":
        """The layer a model config's MoE fields describe (num_experts, num_experts_per_tok, capacity_factor,
        router_jitter, normalize_top_k, router_detach_input: the same names for every family); the rest is the
        family's MLP shape."""
        return cls(hidden_size, ffn_size, config.num_experts, config.num_experts_per_tok, activation=activation,
                   gated=gated, bias=bias, layer_index=layer_index, capacity_factor=config.capacity_factor,
                   jitter=config.router_jitter, normalize_top_k=config.normalize_top_k,
                   router_detach_input=config.router_detach_input)

    def capacity(self, num_tokens: int) -> int | None:
        """Assignments each expert may take, or None when dropless."""
        if self.capacity_factor <= 0:
            return None
        return max(1, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

    def forward(self, x_BTD: Tensor) -> tuple[Tensor, RouterStats]:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        num_tokens = B * T
        weights_TK, experts_TK, logits_TE, probs_TE = self.router(x_TD)

        # Sort the N = T*K assignments by expert (stable: earlier tokens first, which is also the order in
        # which a capacity limit keeps them).
        experts_N = experts_TK.reshape(-1)
        order_N = torch.argsort(experts_N, stable=True)
        counts_E = torch.bincount(experts_N, minlength=self.num_experts)
        dropped = torch.zeros((), dtype=torch.long, device=x_TD.device)

        capacity = self.capacity(num_tokens)
        if capacity is not None:
            starts_E = torch.cumsum(counts_E, dim=0) - counts_E
            rank_N = torch.arange(order_N.numel(), device=x_TD.device) - starts_E[experts_N[order_N]]
            order_N = order_N[rank_N < capacity]
            kept_counts_E = counts_E.clamp(max=capacity)
            dropped = (counts_E - kept_counts_E).sum()
        else:
            kept_counts_E = counts_E

        token_N = order_N // self.top_k
        expert_out_ND = self.experts(x_TD.index_select(0, token_N), kept_counts_E)
        weight_N1 = weights_TK.reshape(-1)[order_N].unsqueeze(-1)
        # Combine in fp32: a token's K outputs are summed with weights that sum to 1, which keeps an
        # upcycled model (identical experts) equal to its dense source.
        out_TD = torch.zeros(num_tokens, D, dtype=torch.float32, device=x_TD.device)
        out_TD.index_add_(0, token_N, expert_out_ND.float() * weight_N1)

        stats = routing_stats(self.layer_index, logits_TE, probs_TE, counts_E, dropped)
        return out_TD.to(x_BTD.dtype).reshape(B, T, D), stats
