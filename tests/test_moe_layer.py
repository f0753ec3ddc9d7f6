"""MoELayer vs a naive per-token, per-expert loop (the reference), and router losses vs their formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flash_experts.model.moe import MoELayer, MoESettings, load_balancing_loss, router_z_loss


def make_layer(num_experts: int, top_k: int, capacity_factor: float, gated: bool, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    settings = MoESettings(num_experts=num_experts, num_experts_per_tok=top_k, capacity_factor=capacity_factor)
    layer = MoELayer(settings, hidden_size=16, ffn_size=24,
                     activation=F.silu if gated else (lambda x: F.gelu(x, approximate="tanh")),
                     gated=gated, bias=not gated, layer_index=0)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, 0.5)
    return layer


def loop_reference(layer: MoELayer, x_BTD: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax router, top-k, renormalise, each chosen expert's MLP, weighted sum.
    Capacity: tokens are admitted to an expert in order (token 0 first) until it is full. The renormalising
    sum is a constant to autograd (the layer's router-gradient estimator, tested on its own below)."""
    B, T, D = x_BTD.shape
    x = x_BTD.reshape(B * T, D)
    experts = layer.experts
    capacity = layer.capacity(B * T)
    admitted = [0] * layer.num_experts
    # First pass: all routing decisions, so that capacity is granted in assignment order (token, slot).
    decisions = []
    for t in range(B * T):
        probs = torch.softmax(x[t].float() @ layer.router.weight.float().T, dim=-1)
        weights, chosen = probs.topk(layer.top_k)
        weights = weights / weights.sum().detach()
        decisions.append((weights, chosen))
    kept = {}
    for e in range(layer.num_experts):
        for t in range(B * T):
            for slot in range(layer.top_k):
                if int(decisions[t][1][slot]) == e:
                    ok = capacity is None or admitted[e] < capacity
                    kept[(t, slot)] = ok
                    admitted[e] += ok
    rows = []
    for t in range(B * T):
        out = torch.zeros(D)
        weights, chosen = decisions[t]
        for slot in range(layer.top_k):
            if not kept[(t, slot)]:
                continue
            e = int(chosen[slot])
            if experts.gated:
                hidden = F.silu(x[t] @ experts.w_gate[e]) * (x[t] @ experts.w_up[e])
                y = hidden @ experts.w_down[e]
            else:
                hidden = F.gelu(x[t] @ experts.w_up[e] + experts.b_up[e], approximate="tanh")
                y = hidden @ experts.w_down[e] + experts.b_down[e]
            out = out + weights[slot] * y
        rows.append(out)
    return torch.stack(rows).reshape(B, T, D)


SETTINGS = [  # (experts, top_k, capacity factor)
    (4, 1, 0.0),
    (4, 2, 0.0),
    (8, 2, 0.0),
    (3, 3, 0.0),  # top-k = experts
    (4, 2, 0.5),  # capacity drops tokens
    (4, 1, 1.0),
]


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("num_experts,top_k,capacity_factor", SETTINGS)
def test_moe_layer_matches_loop_reference(num_experts, top_k, capacity_factor, gated, backend):
    layer = make_layer(num_experts, top_k, capacity_factor, gated)
    layer.experts.backend = backend
    reference = make_layer(num_experts, top_k, capacity_factor, gated)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 13, 16, generator=torch.Generator().manual_seed(5))
    x_ref = x.clone().requires_grad_()
    x = x.clone().requires_grad_()

    out, stats = layer(x)
    expected = loop_reference(reference, x_ref)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)

    grad_out = torch.randn_like(out)
    (out * grad_out).sum().backward()
    (expected * grad_out).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
    for (name, p), (_, q) in zip(layer.named_parameters(), reference.named_parameters()):
        assert q.grad is not None, name
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name

    assert int(stats.tokens_per_expert.sum()) == 2 * 13 * top_k
    capacity = layer.capacity(26)
    expected_dropped = 0 if capacity is None else int((stats.tokens_per_expert - capacity).clamp(min=0).sum())
    assert int(stats.dropped_tokens) == expected_dropped
    if capacity_factor == 0.5:
        assert expected_dropped > 0  # the setting really exercises dropping


def _counts(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.bincount(experts_TK.reshape(-1), minlength=num_experts)


def test_load_balancing_loss_hand_computed():
    # 4 tokens, 2 experts, top-1. Routed: e0, e0, e0, e1 -> f = [3/4, 1/4].
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    experts = torch.tensor([[0], [0], [0], [1]])
    # P = mean probs = [0.65, 0.35]; loss = E * sum f*P = 2 * (0.75*0.65 + 0.25*0.35) = 1.15
    assert math.isclose(load_balancing_loss(probs, _counts(experts, 2)).item(), 1.15, rel_tol=1e-6)
    # Uniform routing and uniform probabilities give the minimum, 1.0.
    uniform = torch.full((4, 4), 0.25)
    assert math.isclose(load_balancing_loss(uniform, _counts(torch.tensor([[0], [1], [2], [3]]), 4)).item(), 1.0,
                        rel_tol=1e-6)
    # top-2: assignments counted over T*K: tokens (0,1),(0,1) -> f = [0.5, 0.5, 0]; P = [0.5, 0.4, 0.1]
    probs3 = torch.tensor([[0.5, 0.4, 0.1], [0.5, 0.4, 0.1]])
    value = load_balancing_loss(probs3, _counts(torch.tensor([[0, 1], [0, 1]]), 3)).item()
    assert math.isclose(value, 3 * (0.5 * 0.5 + 0.5 * 0.4), rel_tol=1e-6)


def test_router_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4 -> mean of squares
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert math.isclose(router_z_loss(logits).item(), expected, rel_tol=1e-6)


def test_router_jitter_only_while_training():
    layer = make_layer(4, 2, 0.0, gated=False)
    layer.router.jitter = 0.2
    x = torch.randn(1, 8, 16)
    layer.eval()
    a, _ = layer(x)
    b, _ = layer(x)
    assert torch.equal(a, b)
    layer.train()
    torch.manual_seed(0)
    c, _ = layer(x)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_experts_that_receive_no_tokens_get_zero_gradient(backend):
    """Reference: the loop reference's gradients (zero for the idle experts' slices of the stacked weights)."""
    layer = make_layer(8, 2, 0.0, gated=False)
    layer.experts.backend = backend
    with torch.no_grad():
        layer.router.weight[:2] = layer.router.weight[:2].abs()  # positive inputs: only experts 0 and 1 can win
        layer.router.weight[2:] = -layer.router.weight[2:].abs()
    reference = make_layer(8, 2, 0.0, gated=False)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(1, 9, 16, generator=torch.Generator().manual_seed(1)).abs()
    out, stats = layer(x)
    assert stats.tokens_per_expert[2:].sum() == 0 and stats.tokens_per_expert[:2].sum() == 18
    out.square().sum().backward()
    loop_reference(reference, x).square().sum().backward()
    for (name, p), (_, q) in zip(layer.named_parameters(), reference.named_parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4), name
    assert torch.all(layer.experts.w_up.grad[2:] == 0) and torch.all(layer.experts.b_down.grad[2:] == 0)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_experts_follow_bf16_autocast(backend):
    """Reference: the fp32 loop reference. Under bf16 autocast the expert matmuls must run in bf16 (as autocast
    runs a dense MLP's), so the output moves off the fp32 result by bf16 rounding, and no further."""
    layer = make_layer(4, 2, 0.0, gated=False)
    layer.experts.backend = backend
    x = torch.randn(2, 13, 16, generator=torch.Generator().manual_seed(5))
    expected = loop_reference(layer, x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = layer(x)
    error = (out.float() - expected).abs().max() / expected.abs().max()
    assert 1e-4 < error < 3e-2, float(error)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("gated", [False, True])
def test_gradients_under_bf16_autocast_reach_fp32_weights(backend, gated):
    """Reference: the fp32 loop reference's gradients. Under bf16 autocast the layer computes in bf16 but its
    parameters stay fp32: every gradient must arrive in fp32 and differ from the reference by bf16 rounding
    only (a gradient sent to the wrong expert or row would be off by O(1))."""
    layer = make_layer(4, 2, 0.0, gated=gated, seed=3)
    layer.experts.backend = backend
    x = torch.randn(2, 13, 16, generator=torch.Generator().manual_seed(6), requires_grad=True)
    upstream = torch.randn(2, 13, 16, generator=torch.Generator().manual_seed(7))
    params = [p for p in layer.parameters()]
    expected = torch.autograd.grad((loop_reference(layer, x) * upstream).sum(), [x, *params])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = layer(x)
    grads = torch.autograd.grad((out.float() * upstream).sum(), [x, *params], allow_unused=True)
    names = ["x", *(name for name, _ in layer.named_parameters())]
    for name, got, want in zip(names, grads, expected, strict=True):
        assert got.dtype == torch.float32, name
        error = (got - want).abs().max() / want.abs().max()
        assert error < 3e-2, (name, float(error))


def test_router_decides_in_fp32_under_autocast():
    """Reference: the router's formula in plain fp32 math; autocast must not lower the routing scores."""
    layer = make_layer(8, 2, 0.0, gated=False)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        weights, experts, logits, _ = layer.router(x)
    assert logits.dtype == torch.float32
    assert torch.allclose(logits, x @ layer.router.weight.T, rtol=1e-6, atol=1e-6)  # bf16 would be ~1e-2 off
    assert torch.equal(experts, (x @ layer.router.weight.T).topk(2).indices)


# ------------------------------------------------------------------------------------ the router's gradient


def _expert_outputs_float64(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """(T, E, D): every expert's MLP on every token, in float64, written out from the weights."""
    experts = layer.experts
    rows = []
    for e in range(layer.num_experts):
        if experts.gated:
            hidden = F.silu(x_TD @ experts.w_gate[e].double()) * (x_TD @ experts.w_up[e].double())
            rows.append(hidden @ experts.w_down[e].double())
        else:
            hidden = F.gelu(x_TD @ experts.w_up[e].double() + experts.b_up[e].double(), approximate="tanh")
            rows.append(hidden @ experts.w_down[e].double() + experts.b_down[e].double())
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("top_k, through_sum", [(1, False), (2, False), (2, True)])
def test_router_gradient_matches_finite_differences_of_the_intended_formula(top_k, through_sum, gated):
    """Reference: central finite differences in float64 of the estimator's formula, written out here:
    out_t = sum over the chosen experts k of p_tk(W) / S_t * y_k(x_t), where p = softmax(x W^T), the top-k
    choice and S_t = sum_k p_tk are held at their values at W (the forward renormalises; the gradient flows
    through p alone). With `renormalize_through_sum`, S_t = sum_k p_tk(W) moves with W (HF Mixtral's
    gradient). The loss is <out, R> for a fixed random R."""
    layer = make_layer(4, top_k, 0.0, gated, seed=3)
    layer.router.through_sum = through_sum
    x_TD = torch.randn(1, 9, 16, generator=torch.Generator().manual_seed(7))
    R = torch.randn(1, 9, 16, generator=torch.Generator().manual_seed(8))
    out, _ = layer(x_TD)
    (out * R).sum().backward()
    grad = layer.router.weight.grad.double()

    x64, R64 = x_TD[0].double(), R[0].double()
    W0 = layer.router.weight.detach().double()
    with torch.no_grad():
        y_TED = _expert_outputs_float64(layer, x64)
        probs0 = torch.softmax(x64 @ W0.T, dim=-1)
        chosen_TK = probs0.topk(top_k, dim=-1).indices
        S_T1 = probs0.gather(1, chosen_TK).sum(1, keepdim=True)

    def loss(W: torch.Tensor) -> float:
        p_TK = torch.softmax(x64 @ W.T, dim=-1).gather(1, chosen_TK)
        p_TK = p_TK / (p_TK.sum(1, keepdim=True) if through_sum else S_T1)
        y_TKD = y_TED.gather(1, chosen_TK[..., None].expand(-1, -1, y_TED.shape[-1]))
        return float(((p_TK[..., None] * y_TKD).sum(1) * R64).sum())

    eps = 1e-6
    expected = torch.zeros_like(W0)
    for index in torch.cartesian_prod(torch.arange(W0.shape[0]), torch.arange(W0.shape[1])):
        i, j = int(index[0]), int(index[1])
        step = torch.zeros_like(W0)
        step[i, j] = eps
        expected[i, j] = (loss(W0 + step) - loss(W0 - step)) / (2 * eps)
    assert expected.abs().max() > 1e-2  # the reference itself is not zero
    assert torch.allclose(grad, expected, atol=1e-4, rtol=1e-3)


def test_top1_router_learns_from_the_output_loss_alone():
    """Reference: zero, the gradient a renormalised top-1 weight (p / p = 1) would give. The router must get a
    gradient from a loss on the layer's output alone (no balancing or z terms), even with identical experts,
    while the forward value stays exactly 1 (an upcycled model equals its source)."""
    layer = make_layer(4, 1, 0.0, gated=False, seed=4)
    with torch.no_grad():  # identical experts, as upcycling makes them
        for p in layer.experts.parameters():
            p.copy_(p[:1].expand_as(p))
    x_TD = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    weights_TK, _, _, _ = layer.router(x_TD.reshape(-1, 16))
    assert torch.equal(weights_TK, torch.ones_like(weights_TK))
    out, _ = layer(x_TD)
    out.square().sum().backward()
    assert layer.router.weight.grad.abs().max() > 1e-2


@pytest.mark.parametrize("gated", [False, True])
def test_detached_router_input_sends_no_routing_gradient_into_the_model(gated):
    """Reference: the loop reference with the routing weights held constant (computed from x under no_grad):
    with router_detach_input the input's gradient is only what flows through the experts; the router's own
    weight gradient is unchanged (it does not depend on whether the input is detached)."""
    layer = make_layer(4, 2, 0.0, gated, seed=6)
    attached = make_layer(4, 2, 0.0, gated, seed=6)
    layer.router.detach_input = True
    x = torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(2))
    R = torch.randn(1, 7, 16, generator=torch.Generator().manual_seed(3))
    x_detached, x_attached, x_ref = (x.clone().requires_grad_() for _ in range(3))
    out, _ = layer(x_detached)
    (out * R).sum().backward()
    out_attached, _ = attached(x_attached)
    (out_attached * R).sum().backward()

    reference = make_layer(4, 2, 0.0, gated, seed=6)
    with torch.no_grad():  # the routing, as constants
        weights_TK, experts_TK, _, _ = reference.router(x[0])
    expected = loop_reference_with_routing(reference, x_ref, weights_TK, experts_TK)
    (expected * R).sum().backward()
    assert torch.allclose(out, out_attached)
    assert torch.allclose(x_detached.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(x_detached.grad, x_attached.grad, atol=1e-5, rtol=1e-4)  # the routing's share
    assert torch.allclose(layer.router.weight.grad, attached.router.weight.grad, atol=1e-6, rtol=1e-5)


def loop_reference_with_routing(layer: MoELayer, x_BTD: torch.Tensor, weights_TK: torch.Tensor,
                                experts_TK: torch.Tensor) -> torch.Tensor:
    """Token by token, each chosen expert's MLP weighted by the given (constant) routing weights."""
    B, T, D = x_BTD.shape
    x = x_BTD.reshape(B * T, D)
    experts = layer.experts
    rows = []
    for t in range(B * T):
        out = torch.zeros(D)
        for k in range(layer.top_k):
            e = int(experts_TK[t, k])
            if experts.gated:
                y = (F.silu(x[t] @ experts.w_gate[e]) * (x[t] @ experts.w_up[e])) @ experts.w_down[e]
            else:
                hidden = F.gelu(x[t] @ experts.w_up[e] + experts.b_up[e], approximate="tanh")
                y = hidden @ experts.w_down[e] + experts.b_down[e]
            out = out + weights_TK[t, k] * y
        rows.append(out)
    return torch.stack(rows).reshape(B, T, D)


@pytest.mark.parametrize("bias", [True, False])
def test_bf16_grouped_products_in_row_blocks_match_a_float64_loop(bias):
    """Reference: each expert's rows times its weight in float64, one expert at a time. In bf16 on CPU the
    products run in whole row blocks plus a zero-padded tail (expert_products.ROW_BLOCK): counts chosen to hit an
    empty expert, a tail alone, a head alone, head + tail, and a tail that is not a multiple of TAIL_ROWS. A row
    sent to the wrong place, or a padding row leaking into a weight gradient, would be off by O(1)."""
    from flash_experts.model.buffers import ExpertWeightBuffers
    from flash_experts.model.expert_products import ROW_BLOCK, TAIL_ROWS, grouped_linear

    counts = [0, 5, ROW_BLOCK, 2 * ROW_BLOCK + TAIL_ROWS + 3, ROW_BLOCK + 1, TAIL_ROWS]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), 24, generator=generator)
    w = torch.randn(len(counts), 24, 40, generator=generator)
    b = torch.randn(len(counts), 40, generator=generator) if bias else None
    upstream = torch.randn(sum(counts), 40, generator=generator)

    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if bias else None
    start, outputs = 0, []
    for e, n in enumerate(counts):
        outputs.append(x64[start:start + n] @ w64[e] + (b64[e] if bias else 0))
        start += n
    expected = torch.cat(outputs)
    expected_grads = torch.autograd.grad((expected * upstream.double()).sum(), [x64, w64] + ([b64] if bias else []))

    x16 = x.bfloat16().requires_grad_()
    w32 = w.clone().requires_grad_()  # fp32 master weights, as under autocast
    b16 = b.bfloat16().requires_grad_() if bias else None
    for buffers in (None, ExpertWeightBuffers()):
        out = grouped_linear(x16, w32, b16, torch.tensor(counts), "loop", buffers)
        grads = torch.autograd.grad((out.float() * upstream).sum(), [x16, w32] + ([b16] if bias else []))
        assert (out.float() - expected).abs().max() / expected.abs().max() < 2e-2
        for name, got, want in zip(["x", "w", "b"], grads, expected_grads):
            assert (got.double() - want).abs().max() / want.abs().max() < 2e-2, name
        assert grads[1].dtype == torch.float32 and torch.all(grads[1][0] == 0)  # the empty expert: exactly zero


@pytest.mark.parametrize("gated", [False, True])
def test_shared_expert_and_expert_size_match_a_loop_reference(gated):
    """Reference: the loop reference of the routed experts plus, for every token, the shared expert's MLP written
    out by hand (weight 1), forward and gradients. The experts take `moe_intermediate_size`, not the model's MLP
    size; the shared expert its own size."""
    torch.manual_seed(0)
    settings = MoESettings(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12,
                           shared_expert_intermediate_size=20)
    activation = F.silu if gated else (lambda x: F.gelu(x, approximate="tanh"))
    layer = MoELayer(settings, hidden_size=16, ffn_size=24, activation=activation, gated=gated, bias=not gated,
                     layer_index=0)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0.0, 0.5)
    assert layer.experts.w_up.shape == (4, 16, 12) and layer.shared_expert.w_up.shape == (1, 16, 20)
    x = torch.randn(2, 13, 16, generator=torch.Generator().manual_seed(5), requires_grad=True)
    out, stats = layer(x)

    shared = layer.shared_expert
    x_TD = x.reshape(26, 16)
    if gated:
        shared_out = (F.silu(x_TD @ shared.w_gate[0]) * (x_TD @ shared.w_up[0])) @ shared.w_down[0]
    else:
        shared_out = F.gelu(x_TD @ shared.w_up[0] + shared.b_up[0], approximate="tanh") @ shared.w_down[0] + shared.b_down[0]
    expected = loop_reference(layer, x) + shared_out.reshape(2, 13, 16)
    assert torch.allclose(out, expected, atol=1e-5, rtol=1e-5)
    params = [x, *layer.parameters()]
    upstream = torch.randn_like(out)
    got = torch.autograd.grad((out * upstream).sum(), params)
    want = torch.autograd.grad((expected * upstream).sum(), params)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-4)
    assert int(stats.tokens_per_expert.sum()) == 26 * 2  # the shared expert is not routed: not in the counts
