"""Weight-only int4 with group-wise scales: an eighth of the fp32 bytes (plus 4 bytes of scale and zero per group).

Asymmetric per group of `group_size` consecutive input weights of one output row, as gpt-fast's int4 and
llama.cpp's Q4_1 (which stores a scale and a minimum per 32 weights): with the group's range [lo, hi],

    scale = (hi - lo) / 15,  zero = lo + 8 * scale     (both stored in bf16)
    q = round((w - (zero - 8 * scale)) / scale), clamped to 0..15
    w ~ (q - 8) * scale + zero

q is computed from the *stored* (bf16-rounded) scale and zero, so each weight is within scale / 2 of its value
unless the rounding of zero and scale moved the grid's ends past the group's range (then at most that shift
more: |zero - zero_bf16| + 8 |scale - scale_bf16|). Smaller groups follow the weights more closely (32: 5 bits
a weight in all; 128: 4.25).

The product:
- on CPU, `torch.ops.aten._weight_int4pack_mm_for_cpu` (x in bf16, its packed layout, output rows padded to a
  multiple of 16, which it requires) after a one-time check of its product on this machine for each shape,
  as the int8 kernel gets; it serves every row count (slower than a bf16 matmul at hundreds of rows, yet
  prefill and perplexity stay usable);
- elsewhere, or when that check fails: two weights a byte (low nibble first), unpacked and dequantized to the
  compute dtype per call, then `F.linear`: a memory saving, not a speed-up (untested here on a GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flash_experts.errors import ConfigError
from flash_experts.model.quantize.base import QuantizedLinear

INT4_GROUP_SIZES = (32, 64, 128, 256)
DEFAULT_INT4_GROUP_SIZE = 32  # llama.cpp's Q4_0 / Q4_1 block size: the quality end of the choices
_KERNEL_ROW_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
_INNER_K_TILES = 2


def check_int4_shape(in_features: int, group_size: int, where: str = "a matrix") -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size}")
    if in_features % group_size:
        raise ConfigError(
            f"int4 cannot serve {where}: its {in_features} input features are not a multiple of the group size "
            f"{group_size}; use a group size that divides it, or --quantize int8"
        )


def quantize_weight_int4(w_OI: Tensor, group_size: int = DEFAULT_INT4_GROUP_SIZE) -> tuple[Tensor, Tensor, Tensor]:
    """(out, in) float weight -> (q (out, in) uint8 in 0..15, scales (out, in/group) bf16, zeros (same) bf16)."""
    check_int4_shape(w_OI.shape[1], group_size)
    rows, width = w_OI.shape
    w_OGS = w_OI.detach().float().reshape(rows, width // group_size, group_size)
    lo, hi = w_OGS.amin(dim=-1), w_OGS.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=torch.finfo(torch.bfloat16).tiny).to(torch.bfloat16)
    zeros = (lo + 8 * scales.float()).to(torch.bfloat16)
    grid_start = zeros.float() - 8 * scales.float()  # of the stored values, so rounding picks the nearest level
    q = torch.round((w_OGS - grid_start[..., None]) / scales.float()[..., None]).clamp(0, 15)
    return q.to(torch.uint8).reshape(rows, width), scales, zeros


def dequantize_int4(q_OI: Tensor, scales_OG: Tensor, zeros_OG: Tensor, dtype: torch.dtype) -> Tensor:
    """(q - 8) * scale + zero per group, in `dtype`."""
    rows, width = q_OI.shape
    groups = scales_OG.shape[1]
    q_OGS = q_OI.reshape(rows, groups, width // groups).to(dtype)
    return ((q_OGS - 8) * scales_OG.to(dtype)[..., None] + zeros_OG.to(dtype)[..., None]).reshape(rows, width)


def _kernel_pack(q_OI: Tensor, scales_OG: Tensor, zeros_OG: Tensor) -> tuple[Tensor, Tensor]:
    """The CPU kernel's operands: packed weight (rows padded to a multiple of 16) and (G, O_pad, 2) scale/zero."""
    rows = q_OI.shape[0]
    extra = -(-rows // _KERNEL_ROW_MULTIPLE) * _KERNEL_ROW_MULTIPLE - rows
    if extra:  # zero rows (scale and zero 0), cut off the product again
        q_OI = torch.cat([q_OI, q_OI.new_full((extra, q_OI.shape[1]), 8)])
        scales_OG = torch.cat([scales_OG, scales_OG.new_zeros(extra, scales_OG.shape[1])])
        zeros_OG = torch.cat([zeros_OG, zeros_OG.new_zeros(extra, zeros_OG.shape[1])])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_OI.to(torch.int32).contiguous(), _INNER_K_TILES)
    scales_and_zeros_GO2 = torch.stack([scales_OG, zeros_OG], dim=-1).transpose(0, 1).contiguous()
    return packed, scales_and_zeros_GO2


# Whether the CPU kernel gives the right product for an (in_features, group_size), checked once per pair on this
# machine: the kernel is internal and CPU-specific (the int8 one computed wrong products for some sizes).
_KERNEL_CORRECT: dict[tuple[int, int], bool] = {}


def _int4_kernel_is_correct(in_features: int, group_size: int) -> bool:
    key = (in_features, group_size)
    if key not in _KERNEL_CORRECT:
        correct = False
        if hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            generator = torch.Generator().manual_seed(0)
            q, scales, zeros = quantize_weight_int4(torch.randn(40, in_features, generator=generator), group_size)
            x = torch.randn(3, in_features, generator=generator).to(torch.bfloat16)
            try:
                packed, scales_and_zeros = _kernel_pack(q, scales, zeros)
                got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)
                w = dequantize_int4(q, scales, zeros, torch.float64)
                want = x.double() @ w.t()
                bound = 2**-7 * (x.double().abs() @ w.abs().t()) + 1e-6
                correct = bool(((got[:, :40].double() - want).abs() <= bound).all())
            except RuntimeError:  # a build or CPU without the kernel for this shape
                correct = False
        _KERNEL_CORRECT[key] = correct
    return _KERNEL_CORRECT[key]


class Int4Linear(QuantizedLinear):
    """Stands in for an `nn.Linear` or a GPT-2 `Conv1D`: 4-bit weights, a bf16 scale and zero per group."""

    scheme = "int4"

    def __init__(self, weight_OI: Tensor, bias_O: Tensor | None, group_size: int = DEFAULT_INT4_GROUP_SIZE,
                 kernel: bool | None = None):
        """kernel: use the CPU kernel (None: where the weight is on CPU and the kernel passes its check)."""
        super().__init__(weight_OI, bias_O)
        self.group_size = group_size
        q, scales, zeros = quantize_weight_int4(weight_OI, group_size)
        if kernel is None:
            kernel = weight_OI.device.type == "cpu" and _int4_kernel_is_correct(self.in_features, group_size)
        self.kernel = kernel
        if kernel:
            packed, scales_and_zeros = _kernel_pack(q, scales, zeros)
            self.register_buffer("weight_int4pack", packed)
            self.register_buffer("scales_and_zeros", scales_and_zeros)
        else:
            self.register_buffer("weight_nibbles", (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous())
            self.register_buffer("scales", scales)
            self.register_buffer("zeros", zeros)

    def product(self, x_RI: Tensor) -> Tensor:
        if self.kernel:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x_RI.to(torch.bfloat16).contiguous(), self.weight_int4pack,
                                                           self.group_size, self.scales_and_zeros)
            return y[:, :self.out_features]
        compute = torch.bfloat16 if x_RI.dtype == torch.float32 and x_RI.device.type == "cpu" else x_RI.dtype
        q = torch.stack([self.weight_nibbles & 15, self.weight_nibbles >> 4], dim=-1).reshape(self.out_features, -1)
        return F.linear(x_RI.to(compute), dequantize_int4(q, self.scales, self.zeros, compute))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"
