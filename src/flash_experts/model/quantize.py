"""Weight-only int8 quantization for inference: a quarter of the fp32 bytes for every decoded token to read.

Decoding one token at a time is bound by memory bandwidth: each step reads every weight once for a handful
of rows. Storing the matrices as int8 with one fp scale per output channel (symmetric, gpt-fast's int8
scheme: scale = max|w_row| / 127, w ~ scale * round(w / scale)) cuts those bytes 4x against fp32; the
activations, embeddings, norms, routers and the KV cache keep the model's dtype.

The product y = (x @ w_int8.T) * scale + bias runs as
- `torch._weight_int8pack_mm` on CPU for a few rows (decoding): one kernel that reads the int8 weight
  directly (x in bf16), so a decoded token reads a quarter of the fp32 bytes (BENCHMARKS.md has the measured
  speed-up). It is only correct for an inner size that is a multiple of 16 (other
  sizes gave wrong results or crashed, torch 2.13), so it is used for those only, and only after a check of
  its product on this machine for that size; and it does no blocking over rows, so
- otherwise (many rows, other inner sizes, other devices): the weight is dequantized to the compute dtype
  and multiplied with `F.linear` (gpt-fast's formulation). On a GPU that is a memory saving, not a speed-up,
  unless torch.compile fuses the dequantization into the product (as gpt-fast does); untested here on GPU.

Inference only: quantized modules hold buffers, not parameters, so nothing trains them; keep the unquantized
checkpoint and quantize when loading (`--quantize int8` of generate, generate-names, compare, evaluate).
Quality: the error per weight is at most scale / 2; benchmarks/bench_generate.py reports the tokens the
quantized model shares with the fp32 one, `flash-experts evaluate --quantize int8` its perplexity.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from flash_experts.errors import ConfigError
from flash_experts.model.moe import GroupedExperts, _expert_slices, expert_compute_dtype, expert_feed_forward

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
# machine (the kernel is internal and CPU-specific: torch 2.13 on AVX-512 gave NaN for 8 and 50% errors for 24).
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


def int8_linear(x: Tensor, w_int8_OI: Tensor, scales_O: Tensor, bias_O: Tensor | None = None) -> Tensor:
    """x (..., in) @ dequantized(w).T (+ bias), computed and returned in x's dtype."""
    dtype = x.dtype
    in_features = x.shape[-1]
    x_RI = x.reshape(-1, in_features)
    if (x.device.type == "cpu" and x_RI.shape[0] <= INT8_KERNEL_MAX_ROWS and in_features % 16 == 0
            and hasattr(torch, "_weight_int8pack_mm") and _int8_kernel_is_correct(in_features)):
        y = torch._weight_int8pack_mm(x_RI.to(torch.bfloat16).contiguous(), w_int8_OI,
                                      scales_O.to(torch.bfloat16)).to(dtype)
    else:
        # bf16 on CPU even for an fp32 model: the kernel path rounds x to bf16 too (the two paths agree), and
        # the bf16 product of the dequantized weight is faster than fp32 where the CPU computes bf16 natively.
        compute = torch.bfloat16 if dtype == torch.float32 and x.device.type == "cpu" else dtype
        y = (F.linear(x_RI.to(compute), w_int8_OI.to(compute)) * scales_O.to(compute)).to(dtype)
    if bias_O is not None:
        y = y + bias_O.to(dtype)
    return y.view(*x.shape[:-1], w_int8_OI.shape[0])


class Int8Linear(nn.Module):
    """Stands in for an `nn.Linear` or a GPT-2 `Conv1D` (whose (in, out) weight is transposed on the way in)."""

    def __init__(self, weight_OI: Tensor, bias_O: Tensor | None):
        super().__init__()
        w_int8, scales = quantize_weight_int8(weight_OI)
        self.register_buffer("weight_int8", w_int8)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if bias_O is None else bias_O.detach().clone())
        self.in_features, self.out_features = weight_OI.shape[1], weight_OI.shape[0]
        # True when the float weight lives on as another module's parameter (an LM head tied to the input
        # embedding): this int8 copy is then not a parameter of its own.
        self.copies_a_parameter = False

    @classmethod
    def from_module(cls, module: nn.Module) -> "Int8Linear":
        weight = module.weight.t() if isinstance(module, Conv1D) else module.weight
        return cls(weight, module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return int8_linear(x, self.weight_int8, self.scales, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


class Int8GroupedExperts(nn.Module):
    """`GroupedExperts` with int8 weights: one int8 product per expert that received rows (few when decoding)."""

    def __init__(self, experts: GroupedExperts):
        super().__init__()
        self.copies_a_parameter = False  # expert stacks are never tied to anything
        self.activation = experts.activation
        self.gated = experts.gated
        self.num_experts = experts.num_experts
        for name in ("w_gate", "w_up", "w_down"):
            weight = getattr(experts, name)
            if weight is None:
                self.register_buffer(f"{name}_int8", None)
                self.register_buffer(f"{name}_scales", None)
                continue
            # stored (E, in, out) like Conv1D; quantized per expert and output channel as (E, out, in)
            pairs = [quantize_weight_int8(weight[e].t()) for e in range(weight.shape[0])]
            self.register_buffer(f"{name}_int8", torch.stack([w for w, _ in pairs]))
            self.register_buffer(f"{name}_scales", torch.stack([s for _, s in pairs]))
        for name in ("b_up", "b_down"):
            bias = getattr(experts, name)
            self.register_buffer(name, None if bias is None else bias.detach().clone())

    def forward(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        x_ND = x_ND.to(expert_compute_dtype(x_ND))
        out_ND = x_ND.new_empty(x_ND.shape)
        for e, rows in _expert_slices(counts_E.tolist()):
            out_ND[rows] = expert_feed_forward(x_ND[rows], self._linear("w_up", e, self.b_up),
                                               self._linear("w_gate", e) if self.gated else None,
                                               self._linear("w_down", e, self.b_down), self.activation)
        return out_ND

    def _linear(self, name: str, e: int, bias_EO: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        """Expert e's int8 projection `name` (w_up, w_gate, w_down), as a function of x."""
        w_int8, scales = getattr(self, f"{name}_int8")[e], getattr(self, f"{name}_scales")[e]
        bias = None if bias_EO is None else bias_EO[e]
        return lambda x: int8_linear(x, w_int8, scales, bias)


def quantized_weights(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(name, tensor) of the int8 weights and the biases that `quantize_int8` turned from parameters into buffers
    (scales left out): what a parameter count must still count."""
    for module_name, module in model.named_modules():
        if isinstance(module, (Int8Linear, Int8GroupedExperts)):
            for name, buffer in module.named_buffers(recurse=False):
                if name.endswith("scales") or (name == "weight_int8" and module.copies_a_parameter):
                    continue
                yield f"{module_name}.{name}", buffer


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace, in place, every Linear / Conv1D (the LM head included) and every MoE expert stack by its int8
    weight-only version, and return the model. Embeddings, norms and routers keep their dtype (the routers
    are tiny and pick the experts: a quantization error there would change which experts run)."""
    def quantizable(module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, Conv1D, GroupedExperts))

    kept = {id(p) for m in model.modules() if not quantizable(m) for p in m.parameters(recurse=False)}
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (nn.Linear, Conv1D)):
                quantized = Int8Linear.from_module(child)
                quantized.copies_a_parameter = id(child.weight) in kept
                setattr(parent, name, quantized)
            elif isinstance(child, GroupedExperts):
                setattr(parent, name, Int8GroupedExperts(child))
            else:
                continue
            replaced += 1
    if replaced == 0:
        raise ConfigError("nothing to quantize: the model has no Linear, Conv1D or MoE expert layers")
    model.requires_grad_(False)
    return model
