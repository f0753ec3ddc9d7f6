"""The experts' matrix products, made fast: what `model/moe.py` calls, kept beside it as `attention/flash_triton.py`
sits beside `attention/flash.py`.

`moe.py` says what the products compute; this file says how they are made fast:
- `grouped_linear`: y[rows of expert e] = x[rows of expert e] @ w[e] + b[e], for rows already sorted by expert.
  Two interchangeable backends (the tests hold both to the same loop reference): `torch._grouped_mm`, one kernel
  for all experts where it is a fused kernel (CUDA, bf16, Hopper or newer), and elsewhere (CPU included) one BLAS
  call per expert written into one output, with a hand-written backward of the same shape (no split/cat copies,
  no per-row bias gather), reusing the weights' compute-dtype copy and gradient from one step to the next
  (`model/buffers.py` says why that matters on CPU). benchmarks/bench_moe.py prints both backends.
- `chosen_experts_products` and `every_expert_products`: the products of the compiled one-token decode step
  (`generation/compiled.py`), in fixed shapes: no sort, no per-expert row counts read on the host, which would
  give the compiled graph a new shape every step.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from flash_experts.errors import ConfigError
from flash_experts.model.buffers import ExpertWeightBuffers

GROUPED_BACKENDS = ("auto", "grouped_mm", "loop")


def grouped_linear(x_ND: Tensor, w_EDF: Tensor, b_EF: Tensor | None, counts_E: Tensor, backend: str = "auto",
                   buffers: ExpertWeightBuffers | None = None, row_blocks: bool | None = None) -> Tensor:
    """y[rows of expert e] = x[rows of expert e] @ w[e] + b[e]; rows sorted by expert, `counts_E` rows each.

    The product runs in x's dtype: `w` may be stored in another (fp32 master weights under bf16 autocast) and
    its gradient comes back in its own dtype; `b` must already be in x's dtype. `buffers` (the weight's own,
    kept by its module) lets the loop reuse memory from one training step to the next. `row_blocks` (None:
    where oneDNN compiles a kernel per shape, see ROW_BLOCK) runs the loop's products in whole row blocks plus a
    padded tail; benchmarks/bench_race_step.py --exact-rows times it off. "auto" takes
    `_grouped_mm` where it is one fused kernel, else the loop: on CPU `_grouped_mm` is itself a loop of
    per-expert matmuls, and ours is at least as fast with less peak memory.
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
    blocked = _block_rows(x_ND) if row_blocks is None else row_blocks
    return _LoopGroupedLinear.apply(x_ND, w_EDF, w_compute_EDF, b_EF, counts_E.tolist(), buffers, blocked)


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


def expert_slices(counts: list[int]):
    """(expert, its rows) for every expert that received rows, rows sorted by expert with `counts` each."""
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, slice(start, start + n)
        start += n


# oneDNN, which computes bf16 and fp16 products on CPU, compiles a kernel for each matrix shape it meets and keeps
# the last ~1,000 in a cache. An expert's row count changes with every step's routing, so a product over exactly its
# rows would compile a new kernel nearly every time (BENCHMARKS.md measures the race's step both ways). So on that
# path an expert's rows are cut into a head of whole ROW_BLOCKs, taken in place, and a tail of fewer rows, copied
# into scratch memory padded with zero rows to a multiple of TAIL_ROWS: a product's shapes then come from a small
# set that stays cached. The zero rows change nothing (a zero input row gives an output row nobody reads; in the
# weight gradient it adds zero).
ROW_BLOCK = 64
TAIL_ROWS = 16


def _block_rows(x: Tensor) -> bool:
    """True where products go through oneDNN's per-shape kernels: reduced precision on CPU (fp32 on CPU uses
    MKL, CUDA uses cuBLAS: neither compiles per shape)."""
    return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)


def _split_rows(rows: slice, blocked: bool) -> tuple[slice, slice]:
    """An expert's rows as (head, tail): the head whole ROW_BLOCKs (all of them when not blocked), the tail the rest."""
    if not blocked:
        return rows, slice(rows.stop, rows.stop)
    head_stop = rows.start + (rows.stop - rows.start) // ROW_BLOCK * ROW_BLOCK
    return slice(rows.start, head_stop), slice(head_stop, rows.stop)


def _padded(scratch_RC: Tensor, source_RC: Tensor) -> Tensor:
    """source's rows copied into the top of scratch, zero rows below, to a multiple of TAIL_ROWS rows."""
    n = source_RC.shape[0]
    padded_RC = scratch_RC[:-(-n // TAIL_ROWS) * TAIL_ROWS]
    padded_RC[:n].copy_(source_RC)
    padded_RC[n:].zero_()
    return padded_RC


class _LoopGroupedLinear(torch.autograd.Function):
    """Per-expert matmuls over contiguous row slices, written in place into one output (and one gradient).
    `w_EDF` is the parameter (its gradient is returned in its dtype); the products read `w_compute_EDF`, the
    same weights in x's dtype, cast once for the forward and the backward together."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, w_EDF: Tensor, w_compute_EDF: Tensor, b_EF: Tensor | None,
                counts: list[int], buffers: ExpertWeightBuffers | None, blocked: bool) -> Tensor:
        y_NF = x_ND.new_empty(x_ND.shape[0], w_EDF.shape[-1])
        tail_x_RD = x_ND.new_empty(ROW_BLOCK, x_ND.shape[1]) if blocked else None
        tail_y_RF = y_NF.new_empty(ROW_BLOCK, y_NF.shape[1]) if blocked else None

        def product(x: Tensor, e: int, out: Tensor) -> None:
            if b_EF is None:
                torch.mm(x, w_compute_EDF[e], out=out)
            else:
                torch.addmm(b_EF[e], x, w_compute_EDF[e], out=out)

        for e, rows in expert_slices(counts):
            head, tail = _split_rows(rows, blocked)
            if head.stop > head.start:
                product(x_ND[head], e, y_NF[head])
            if tail.stop > tail.start:
                x_RD = _padded(tail_x_RD, x_ND[tail])
                product(x_RD, e, tail_y_RF[:x_RD.shape[0]])
                y_NF[tail].copy_(tail_y_RF[:tail.stop - tail.start])
        ctx.save_for_backward(x_ND, w_compute_EDF)
        ctx.counts = counts
        ctx.has_bias = b_EF is not None
        ctx.weight_dtype = w_EDF.dtype
        ctx.buffers = buffers
        ctx.blocked = blocked
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
        blocked = ctx.blocked
        tail_x_RD = x_ND.new_empty(ROW_BLOCK, x_ND.shape[1]) if blocked else None
        tail_g_RF = grad_NF.new_empty(ROW_BLOCK, grad_NF.shape[1]) if blocked else None
        tail_gx_RD = x_ND.new_empty(ROW_BLOCK, x_ND.shape[1]) if blocked and grad_x is not None else None
        # A weight gradient is computed in the compute dtype, as autocast computes a dense weight's gradient,
        # into one scratch matrix reused for every expert, then written into the fp32 gradient.
        scratch_DF = None
        if grad_w is not None and grad_w.dtype != x_ND.dtype:
            scratch_DF = x_ND.new_empty(w_compute_EDF.shape[1:])
        for e, rows in expert_slices(ctx.counts):
            head, tail = _split_rows(rows, blocked)
            has_head, has_tail = head.stop > head.start, tail.stop > tail.start
            if has_tail:  # the tail's rows, padded with zero rows (module comment above); x only for grad_w
                g_RF = _padded(tail_g_RF, grad_NF[tail])
                x_RD = _padded(tail_x_RD, x_ND[tail]) if grad_w is not None else None
            if grad_x is not None:
                w_FD = w_compute_EDF[e].t()
                if has_head:
                    torch.mm(grad_NF[head], w_FD, out=grad_x[head])
                if has_tail:
                    grad_x[tail].copy_(torch.mm(g_RF, w_FD, out=tail_gx_RD[:g_RF.shape[0]])[:tail.stop - tail.start])
            if grad_w is not None:
                w_grad_DF = grad_w[e] if scratch_DF is None else scratch_DF
                if has_head:
                    torch.mm(x_ND[head].t(), grad_NF[head], out=w_grad_DF)
                if has_tail and has_head:
                    w_grad_DF.addmm_(x_RD.t(), g_RF)
                elif has_tail:
                    torch.mm(x_RD.t(), g_RF, out=w_grad_DF)
                if scratch_DF is not None:
                    grad_w[e].copy_(scratch_DF)
            if grad_b is not None:
                torch.sum(grad_NF[rows], dim=0, out=grad_b[e])
        return grad_x, grad_w, None, grad_b, None, None, None


def combine_expert_outputs(y_ND: Tensor, weight_N: Tensor, token_N: Tensor, num_tokens: int,
                           counts_E: Tensor) -> Tensor:
    """out[t] = sum over t's assignments n of weight[n] * y[n], in fp32: the experts' outputs (rows sorted by
    expert, `counts_E` each) weighted and added back to their tokens, what `torch.zeros(T, D).index_add_(0,
    token_N, y_ND * weight_N[:, None])` computes.

    Done one expert's rows at a time into reused scratch memory, forward and backward: the whole-tensor form makes
    a fresh N x D fp32 temporary at every step (the product, its cast, the gathered gradient), passes that run at
    memory speed and, on CPU, page-fault on every new page (benchmarks/bench_race_step.py --profile showed them
    as a large part of a small MoE's step)."""
    return _CombineExperts.apply(y_ND, weight_N, token_N, num_tokens, counts_E.tolist())


class _CombineExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND: Tensor, weight_N: Tensor, token_N: Tensor, num_tokens: int, counts: list[int]) -> Tensor:
        # fp32, or float64 for a float64 model (the tests' exact references)
        dtype = torch.promote_types(y_ND.dtype, torch.float32)
        out_TD = torch.zeros(num_tokens, y_ND.shape[1], dtype=dtype, device=y_ND.device)
        scratch_RD = torch.empty(max(counts, default=0), y_ND.shape[1], dtype=dtype, device=y_ND.device)
        for _, rows in expert_slices(counts):
            part_RD = scratch_RD[:rows.stop - rows.start]
            torch.mul(y_ND[rows], weight_N[rows, None], out=part_RD)  # bf16 x fp32 -> fp32, no cast pass
            out_TD.index_add_(0, token_N[rows], part_RD)
        ctx.save_for_backward(y_ND, weight_N, token_N)
        ctx.counts = counts
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD: Tensor):
        y_ND, weight_N, token_N = ctx.saved_tensors
        grad_TD = grad_TD.contiguous()
        grad_y = torch.empty_like(y_ND) if ctx.needs_input_grad[0] else None
        # in the combine's dtype (float64 for a float64 model), returned in the weights' own
        grad_w = weight_N.new_zeros(weight_N.shape, dtype=grad_TD.dtype) if ctx.needs_input_grad[1] else None
        rows_max = max(ctx.counts, default=0)
        gathered_RD = grad_TD.new_empty(rows_max, grad_TD.shape[1])
        product_RD = grad_TD.new_empty(rows_max, grad_TD.shape[1]) if grad_w is not None else None
        for _, rows in expert_slices(ctx.counts):
            n = rows.stop - rows.start
            g_RD = torch.index_select(grad_TD, 0, token_N[rows], out=gathered_RD[:n])
            if grad_w is not None:  # d out / d weight[n] = y[n]
                torch.sum(torch.mul(g_RD, y_ND[rows], out=product_RD[:n]), dim=1, out=grad_w[rows])
            if grad_y is not None:  # d out / d y[n] = weight[n], written in y's dtype
                torch.mul(g_RD, weight_N[rows, None], out=grad_y[rows])
        return grad_y, None if grad_w is None else grad_w.to(weight_N.dtype), None, None, None


# -- the compiled decode step's products (fixed shapes) ------------------------------------------------------

def chosen_experts_product(experts: nn.Module, expert_T: Tensor, name: str, x_TD: Tensor) -> Tensor:
    """In fp32, y[t] = x[t] @ w[expert_T[t]] + b[expert_T[t]] for the experts' projection `name`: each row
    through its own expert, as a multiply and a sum that inductor turns into one loop loading the weights
    through the index (nothing is gathered, and only the chosen experts' weights are read)."""
    w_EIO, b_EO = getattr(experts, name), experts.bias(name)
    y_TO = (x_TD[:, :, None].float() * w_EIO[expert_T].float()).sum(1)
    return y_TO if b_EO is None else y_TO + b_EO[expert_T].float()


def every_expert_product(experts: nn.Module, name: str, x_ETD: Tensor) -> Tensor:
    """In fp32, (E, T, O): every row through every expert's projection `name` (batched products, each weight
    read once). `x_ETD` may be (1, T, D), the same rows for every expert."""
    w_EIO, b_EO = getattr(experts, name), experts.bias(name)
    y_ETO = torch.matmul(x_ETD.float(), w_EIO.float())
    return y_ETO if b_EO is None else y_ETO + b_EO.float()[:, None, :]
