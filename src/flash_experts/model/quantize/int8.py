"""Weight-only int8: a quarter of the fp32 bytes for every decoded token to read.

Symmetric, one fp32 scale per output channel (gpt-fast's int8 scheme: scale = max|w_row| / 127,
w ~ scale * round(w / scale)).

The arithmetic (`int8_product` is its definition; tests/test_quantize.py holds every path to it or to float64
math): with c the compute dtype (bf16 for an fp32 model on CPU, where bf16 products
are native and the int8 kernel takes nothing else; the activations' own dtype elsewhere),

    y = c(c(x) @ w_int8.T) * scale       (the sum in fp32, the int8 weights exact in c, the scale in fp32)

- `torch._weight_int8pack_mm` on CPU for a few rows (decoding): one kernel that reads the int8 weight directly,
  so a decoded token reads a quarter of the fp32 bytes (BENCHMARKS.md has the measured speed-up), given unit
  scales so that the fp32 scale is applied after it: the kernel takes its scales in bf16, and a bf16 scale is
  off by up to 2^-8 for every row of its channel alike, a bias that does not average out over a model's layers
  (issue 45: eager int8 decoding was further from float64 math than the compiled one). It is only correct for an
  inner size that is a multiple of 16 (other sizes gave wrong results or crashed, torch 2.13), so it is used for
  those only, and only after a check of its product on this machine for that size; and it does no blocking over
  rows, so
- otherwise (many rows, other inner sizes, other devices): the weight is converted to the compute dtype
  and multiplied with `F.linear` (gpt-fast's formulation). On a GPU that is a memory saving, not a speed-up,
  unless torch.compile fuses the dequantization into the product (as gpt-fast does); untested here on GPU;
- inside the compiled decode step, one row: a multiply and a sum over the input features (`Int8Linear.product`),
  in fp32 from unrounded x (the one exception to the rounding above, for speed: it is the more precise path, and
  differs from the others by the bf16 rounding of x and of the sum, which the tests bound).
The error per weight is at most scale / 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flash_experts.model.quantize.base import COMPILED_SUM_MAX_ROWS, QuantizedLinear

# The CPU kernel reads int8 directly but recomputes per row: above this many rows, dequantizing once and
# running one bf16 matmul is faster (the two break even at about this many rows on the CPUs measured).
INT8_KERNEL_MAX_ROWS = 16


def quantize_weight_int8(w_OI: Tensor) -> tuple[Tensor, Tensor]:
    """(out, in) float weight -> (int8 weight (out, in), fp32 scales (out,)), symmetric per output channel."""
    w = w_OI.detach().float()
    scales_O = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
    w_int8 = torch.round(w / scales_O[:, None]).clamp(-127, 127).to(torch.int8)
    return w_int8.contiguous(), scales_O


# Whether torch._weight_int8pack_mm gives the right product for an inner size, checked once per size on this
# machine (the kernel is internal and CPU-specific: some inner sizes give NaN or wrong products on some CPUs).
_KERNEL_CORRECT: dict[int, bool] = {}


def _int8_kernel_is_correct(in_features: int) -> bool:
    correct = _KERNEL_CORRECT.get(in_features)
    if correct is None:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(3, in_features, generator=generator).to(torch.bfloat16)
        w_int8 = torch.randint(-127, 128, (48, in_features), generator=generator, dtype=torch.int8)
        scales = (torch.rand(48, generator=generator) + 0.5).to(torch.bfloat16)
        got = torch._weight_int8pack_mm(x, w_int8, scales).float()
        want = (x.double() @ w_int8.double().t() * scales.double()).float()
        bound = 2**-7 * (x.double().abs() @ w_int8.double().abs().t() * scales.double()).float() + 1e-6
        correct = bool(((got - want).abs() <= bound).all())
        _KERNEL_CORRECT[in_features] = correct
    return correct


@torch.library.custom_op("flash_experts::int8_weight_mm", mutates_args=())
def _int8_weight_mm(x_RI: Tensor, w_int8_OI: Tensor, scales_O: Tensor) -> Tensor:
    """The CPU kernel, as an opaque operator: inductor's own lowering of `_weight_int8pack_mm` fails on a computed
    input (torch 2.13: "LoweringException ... Pointwise"), so the compiled decode step calls it as it is."""
    return torch._weight_int8pack_mm(x_RI, w_int8_OI, scales_O)


@_int8_weight_mm.register_fake
def _(x_RI: Tensor, w_int8_OI: Tensor, scales_O: Tensor) -> Tensor:
    return x_RI.new_empty(x_RI.shape[0], w_int8_OI.shape[0])


def int8_compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype an int8 product rounds its input and its sum to: bf16 for fp32 activations on CPU, else theirs."""
    return torch.bfloat16 if x.dtype == torch.float32 and x.device.type == "cpu" else x.dtype


def int8_product(x_RI: Tensor, w_int8_OI: Tensor, scales_O: Tensor) -> Tensor:
    """The int8 product's definition (module docstring), for 2-D x: (rows, out) in fp32. The kernel path computes
    this too; this one is the plain formulation, the reference the tests compare it with (the compiled one-row
    product is the exception: fp32 from unrounded x)."""
    compute = int8_compute_dtype(x_RI)
    return F.linear(x_RI.to(compute), w_int8_OI.to(compute)).float() * scales_O.float()


def int8_linear(x: Tensor, w_int8_OI: Tensor, scales_O: Tensor, bias_O: Tensor | None = None) -> Tensor:
    """x (..., in) @ dequantized(w).T (+ bias): `int8_product`, returned in x's dtype."""
    dtype = x.dtype
    in_features = x.shape[-1]
    x_RI = x.reshape(-1, in_features)
    if (x.device.type == "cpu" and x_RI.shape[0] <= INT8_KERNEL_MAX_ROWS and in_features % 16 == 0
            and int8_compute_dtype(x_RI) == torch.bfloat16
            and hasattr(torch, "_weight_int8pack_mm") and _int8_kernel_is_correct(in_features)):
        # unit scales: the kernel's bf16 result is c(c(x) @ w.T); the fp32 scale comes after
        y = _int8_weight_mm(x_RI.to(torch.bfloat16).contiguous(), w_int8_OI, _unit_scales(w_int8_OI.shape[0]))
        y = y.float() * scales_O.float()
    else:
        y = int8_product(x_RI, w_int8_OI, scales_O)
    y = y.to(dtype)
    if bias_O is not None:
        y = y + bias_O.to(dtype)
    return y.view(*x.shape[:-1], w_int8_OI.shape[0])


_UNIT_SCALES: dict[int, Tensor] = {}


def _unit_scales(out_features: int) -> Tensor:
    """bf16 ones for the kernel's scale argument, one tensor per output size for the process."""
    if out_features not in _UNIT_SCALES:
        _UNIT_SCALES[out_features] = torch.ones(out_features, dtype=torch.bfloat16)
    return _UNIT_SCALES[out_features]


class Int8Linear(QuantizedLinear):
    """Stands in for an `nn.Linear` or a GPT-2 `Conv1D`: int8 weight (out, in), fp32 scale per output channel."""

    scheme = "int8"

    def __init__(self, weight_OI: Tensor, bias_O: Tensor | None):
        super().__init__(weight_OI, bias_O)
        w_int8, scales = quantize_weight_int8(weight_OI)
        self.register_buffer("weight_int8", w_int8)
        self.register_buffer("scales", scales)

    def product(self, x_RI: Tensor) -> Tensor:
        if torch.compiler.is_compiling() and x_RI.shape[0] <= COMPILED_SUM_MAX_ROWS and not torch.is_grad_enabled():
            # Compiled (the decode step): a multiply and a sum over the input features, which inductor fuses with
            # the int8 -> float conversion into one loop streaming the int8 weight once (faster than the kernel).
            # In fp32 from x as it is: rounding x to bf16 here as `int8_product` does made inductor round it again
            # for every weight it met (the rounding fused into the loop): 0.79x the decode speed, measured. So this
            # path is the precise one; the others differ from it by bf16 rounding only (tests bound it).
            return (x_RI[:, None, :].float() * self.weight_int8.float()).sum(-1) * self.scales
        return int8_linear(x_RI, self.weight_int8, self.scales)
