"""Expert parallelism (model/expert_parallel.py) against one process.

Reference: the same MoE layer with every expert in one process (`LocalExperts`), run on each process's tokens.
Spawned gloo processes (2 and 4) each compare their own outputs, input gradients, router gradient (from their
own tokens' loss) and their experts' weight gradients (the sum over every process's tokens' losses) with the
reference, in float64 to 1e-12 and fp32 to rtol 1e-5: top-2, top-1, a capacity limit, and a process whose
experts receive no token beside an expert that gets none. Without the exchange's gradient the comparison fails
(checked, so this test can fail).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from flash_experts.model.expert_parallel import (
    AllToAllExperts,
    _exchange,
    expert_major_order,
    shard_experts,
    whole_experts_state_dict,
)
from flash_experts.model.moe import MoELayer, MoESettings

CASES = [
    # name, experts, top-k, capacity factor, gated, starve (experts whose router rows push every token away)
    ("top2", 4, 2, 0.0, True, ()),
    ("top1_bias", 4, 1, 0.0, False, ()),
    ("capacity", 4, 2, 1.0, True, ()),
    ("starved", 4, 1, 0.0, False, (0, 2, 3)),
]


def build_layer(num_experts: int, top_k: int, capacity: float, gated: bool, dtype: torch.dtype) -> MoELayer:
    torch.manual_seed(0)
    settings = MoESettings(num_experts=num_experts, num_experts_per_tok=top_k, capacity_factor=capacity)
    layer = MoELayer(settings, hidden_size=8, ffn_size=12, activation=F.gelu, gated=gated, bias=not gated,
                     layer_index=0)
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    return layer.to(dtype)


def tokens_of(rank: int, dtype: torch.dtype, starve: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(1, 5 + 3 * rank, 8, generator=generator, dtype=dtype)
    if starve:
        x = x.abs()  # positive inputs: a router row of -1s scores every token lowest
    return x, torch.randn(x.shape, generator=generator, dtype=dtype)


def compare(case, world: int, rank: int, dtype: torch.dtype, drop_gradient: bool) -> bool:
    """True when every figure of this process matches the one-process reference."""
    _, num_experts, top_k, capacity, gated, starve = case
    reference = build_layer(num_experts, top_k, capacity, gated, dtype)
    with torch.no_grad():
        for e in starve:
            reference.router.weight[e] = -1.0
    parallel = copy.deepcopy(reference)
    shard_experts(parallel)
    dispatch: AllToAllExperts = parallel.expert_dispatch
    if drop_gradient:
        dispatch.exchange = lambda x, out_splits, in_splits, group, ledger: _exchange(
            x.detach(), out_splits, in_splits, group, ledger)

    # The reference: each process's tokens through the whole layer; the experts' gradient sums every process's
    # loss, the router's and the inputs' come from this process's loss alone.
    expert_grads = [torch.zeros_like(p) for p in reference.experts.parameters()]
    for source in range(world):
        x, weight = tokens_of(source, dtype, starve)
        x.requires_grad_(True)
        out, _ = reference(x)
        grads = torch.autograd.grad((out * weight).sum(), [x, reference.router.weight,
                                                            *reference.experts.parameters()])
        expert_grads = [total + g for total, g in zip(expert_grads, grads[2:])]
        if source == rank:
            ref_out, ref_x_grad, ref_router_grad = out.detach(), grads[0], grads[1]

    x, weight = tokens_of(rank, dtype, starve)
    x.requires_grad_(True)
    out, stats = parallel(x)
    (out * weight).sum().backward()
    tolerance = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    kept = slice(dispatch.first_expert, dispatch.first_expert + dispatch.local_experts)
    checks = [torch.allclose(out, ref_out, **tolerance),
              x.grad is not None and torch.allclose(x.grad, ref_x_grad, **tolerance),
              torch.allclose(parallel.router.weight.grad, ref_router_grad, **tolerance)]
    for parameter, whole_grad in zip(parallel.experts.parameters(), expert_grads):
        checks.append(parameter.grad is not None and torch.allclose(parameter.grad, whole_grad[kept], **tolerance))
    if starve and not drop_gradient:  # the starved case really starves: rank 1's experts got no row at all
        received = torch.tensor(stats.tokens_per_expert.tolist())
        dist.all_reduce(received)
        assert received[list(starve)].sum() == 0
    if not drop_gradient:  # the checkpoint layout: the whole experts, gathered, equal the reference's
        state = whole_experts_state_dict(parallel)
        for name, parameter in reference.experts.named_parameters():
            assert torch.equal(state[f"experts.{name}"], parameter.detach())
        # The ledger: rows this process sends to others (its rows for their experts, then their rows' outputs
        # back), forward and backward, against what every process's routing says
        sent = dispatch.ledger.rows_sent
        counts = torch.tensor(stats.tokens_per_expert.tolist())
        if capacity:
            counts = counts.clamp(max=parallel.capacity(x.shape[1]))
        every = [torch.zeros_like(counts) for _ in range(world)]
        dist.all_gather(every, counts)
        by_rank_SR = torch.stack([c.reshape(world, -1).sum(1) for c in every])  # [source, holder] rows
        to_others = int(by_rank_SR[rank].sum() - by_rank_SR[rank, rank])
        from_others = int(by_rank_SR[:, rank].sum() - by_rank_SR[rank, rank])
        expected = 2 * (to_others + from_others)  # forward: rows out, outputs back; backward: the same again
        assert sent == expected, (sent, expected)
    return all(checks)


def worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for case in CASES:
            for dtype in (torch.float64, torch.float32):
                assert compare(case, world, rank, dtype, drop_gradient=False), (case[0], dtype, rank)
        # Without the exchange's gradient the inputs' and experts' gradients are wrong: this test can fail.
        wrong = not compare(CASES[0], world, rank, torch.float64, drop_gradient=True)
        flags = torch.tensor([float(wrong)])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        assert flags.item() == 1.0, "dropping the exchange's gradient went unnoticed"
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_one_process(world, tmp_path):
    mp.spawn(worker, args=(world, str(tmp_path / "init")), nprocs=world, join=True)


def test_expert_major_order_against_a_loop():
    """Reference: the rows enumerated expert by expert, source by source, in plain Python."""
    counts_SE = torch.tensor([[2, 0, 1], [0, 3, 2]])
    starts = {}
    position = 0
    for s in range(2):
        for e in range(3):
            starts[s, e] = position
            position += int(counts_SE[s, e])
    expected = [starts[s, e] + i for e in range(3) for s in range(2) for i in range(int(counts_SE[s, e]))]
    assert expert_major_order(counts_SE).tolist() == expected


def test_degree_must_divide_the_experts():
    from flash_experts.errors import ConfigError
    from flash_experts.model.expert_parallel import check_expert_parallel_degree

    with pytest.raises(ConfigError, match="divisible by 3"):
        check_expert_parallel_degree(4, 3)
    with pytest.raises(ConfigError, match="processes divisible"):
        check_expert_parallel_degree(4, 2, world_size=3)
    check_expert_parallel_degree(4, 2, world_size=4)  # divides both: no error
