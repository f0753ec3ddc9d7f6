"""The Mixture-of-Experts layer: router, stacked experts, grouped dispatch, auxiliary losses.

Shapes: T tokens, D model width, F expert hidden width, E experts, K experts per token (top-k), N = T*K
token-to-expert assignments (fewer when a capacity drops some).

The dispatch never loops over tokens. Assignments are sorted by expert so that each expert's tokens are one
contiguous slice, then both expert matmuls run as grouped matrix products over those slices
(`torch._grouped_mm` where the device and dtype support it; otherwise one matmul per expert over its slice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class RouterStats:
    """What one MoE layer's router did on one forward pass."""

    layer: int
    tokens_per_expert: Tensor  # (E,) long: assignments each expert received (before capacity drops)
    dropped_tokens: Tensor  # () long: token-to-expert assignments dropped by the capacity limit
    load_balancing_loss: Tensor  # () Switch loss, unweighted (1.0 = perfectly balanced)
    z_loss: Tensor  # () ST-MoE router z-loss, unweighted
    entropy: Tensor  # () mean entropy of the routing distribution, in nats


def load_balancing_loss(probs_TE: Tensor, experts_TK: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss: E * sum_e f_e * P_e.

    f_e is the share of the T*K assignments that went to expert e, P_e the mean router probability of e.
    It is 1.0 when routing is uniform and grows as load concentrates on few experts.
    """
    num_experts = probs_TE.shape[-1]
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=num_experts).to(probs_TE.dtype)
    fraction_E = counts_E / experts_TK.numel()
    mean_prob_E = probs_TE.mean(dim=0)
    return num_experts * torch.sum(fraction_E * mean_prob_E)


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(router logits)^2 (keeps router logits small)."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


class Router(nn.Module):
    """Linear scores -> softmax (in fp32) -> top-k experts and their weights."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, jitter: float, normalize_top_k: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k = top_k
        self.jitter = jitter
        self.normalize_top_k = normalize_top_k

    def forward(self, x_TD: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns (weights_TK fp32, experts_TK long, logits_TE fp32, probs_TE fp32)."""
        x_TD = x_TD.float()
        if self.training and self.jitter > 0:
            noise = torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
            x_TD = x_TD * noise
        # Routing decisions are made in fp32: bf16 scores flip top-k choices between near-equal experts.
        logits_TE = F.linear(x_TD, self.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        weights_TK, experts_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.normalize_top_k:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        return weights_TK, experts_TK, logits_TE, probs_TE


def grouped_matmul(x_ND: Tensor, w_EDF: Tensor, offsets_E: Tensor, counts: list[int] | None) -> Tensor:
    """y[rows of expert e] = x[rows of expert e] @ w[e]; rows sorted by expert, `offsets_E` = cumulative ends.

    Uses `torch._grouped_mm` (one kernel for all experts) where it is available for this device and dtype;
    otherwise one matmul per expert over its contiguous slice. `counts` are the per-expert row counts on the
    host (only the fallback needs them).
    """
    if _grouped_mm_supported(x_ND, w_EDF):
        return torch._grouped_mm(x_ND, w_EDF, offs=offsets_E)
    assert counts is not None
    pieces = [x @ w_EDF[e] for e, x in enumerate(torch.split(x_ND, counts)) if counts[e] > 0]
    if not pieces:
        return x_ND.new_zeros(0, w_EDF.shape[-1])
    return torch.cat(pieces)


def _grouped_mm_supported(x: Tensor, w: Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        # The CUDA kernel needs bf16, Hopper or newer, and 16-byte aligned row strides.
        return (
            x.dtype == torch.bfloat16
            and torch.cuda.get_device_capability(x.device)[0] >= 9
            and x.shape[-1] % 8 == 0
            and w.shape[-1] % 8 == 0
        )
    return False


def _use_host_counts(x: Tensor, w: Tensor) -> bool:
    return not _grouped_mm_supported(x, w)


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

    def forward(self, x_ND: Tensor, experts_N: Tensor, counts_E: Tensor) -> Tensor:
        """x_ND: inputs sorted by expert; experts_N: the expert of each row; counts_E: rows per expert."""
        offsets_E = torch.cumsum(counts_E, dim=0).to(torch.int32)
        dtype = x_ND.dtype
        w_up = self.w_up.to(dtype)
        host_counts = counts_E.tolist() if _use_host_counts(x_ND, w_up) else None
        up_NF = grouped_matmul(x_ND, w_up, offsets_E, host_counts)
        # index_select rather than b[experts_N]: its backward is index_add_ (parallel on CPU), where advanced
        # indexing's is an accumulating index_put_ (serial on CPU) over N x F elements.
        if self.b_up is not None:
            up_NF = up_NF + self.b_up.to(dtype).index_select(0, experts_N)
        if self.gated:
            gate_NF = grouped_matmul(x_ND, self.w_gate.to(dtype), offsets_E, host_counts)
            hidden_NF = self.activation(gate_NF) * up_NF
        else:
            hidden_NF = self.activation(up_NF)
        out_ND = grouped_matmul(hidden_NF, self.w_down.to(dtype), offsets_E, host_counts)
        if self.b_down is not None:
            out_ND = out_ND + self.b_down.to(dtype).index_select(0, experts_N)
        return out_ND


class MoELayer(nn.Module):
    """Router + experts. Replaces a dense MLP: (B, T, D) -> (B, T, D), plus RouterStats."""

    def __init__(self, hidden_size: int, ffn_size: int, num_experts: int, top_k: int,
                 activation: Callable[[Tensor], Tensor], gated: bool, bias: bool, layer_index: int,
                 capacity_factor: float = 0.0, jitter: float = 0.0, normalize_top_k: bool = True):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.layer_index = layer_index
        self.router = Router(hidden_size, num_experts, top_k, jitter, normalize_top_k)
        self.experts = GroupedExperts(num_experts, hidden_size, ffn_size, activation, gated, bias)

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
        sorted_experts_N = experts_N[order_N]
        counts_E = torch.bincount(experts_N, minlength=self.num_experts)
        dropped = torch.zeros((), dtype=torch.long, device=x_TD.device)

        capacity = self.capacity(num_tokens)
        if capacity is not None:
            starts_E = torch.cumsum(counts_E, dim=0) - counts_E
            rank_N = torch.arange(order_N.numel(), device=x_TD.device) - starts_E[sorted_experts_N]
            keep_N = rank_N < capacity
            order_N, sorted_experts_N = order_N[keep_N], sorted_experts_N[keep_N]
            kept_counts_E = counts_E.clamp(max=capacity)
            dropped = (counts_E - kept_counts_E).sum()
        else:
            kept_counts_E = counts_E

        token_N = order_N // self.top_k
        expert_out_ND = self.experts(x_TD.index_select(0, token_N), sorted_experts_N, kept_counts_E)
        weight_N1 = weights_TK.reshape(-1)[order_N].unsqueeze(-1)
        # Combine in fp32: a token's K outputs are summed with weights that sum to 1, which keeps an
        # upcycled model (identical experts) equal to its dense source.
        out_TD = torch.zeros(num_tokens, D, dtype=torch.float32, device=x_TD.device)
        out_TD.index_add_(0, token_N, expert_out_ND.float() * weight_N1)

        log_probs_TE = torch.log_softmax(logits_TE, dim=-1)
        stats = RouterStats(
            layer=self.layer_index,
            tokens_per_expert=counts_E.detach(),
            dropped_tokens=dropped.detach(),
            load_balancing_loss=load_balancing_loss(probs_TE, experts_TK),
            z_loss=router_z_loss(logits_TE),
            entropy=-(probs_TE * log_probs_TE).sum(-1).mean().detach(),
        )
        return out_TD.to(x_BTD.dtype).reshape(B, T, D), stats
