"""What every weight-only scheme shares: a quantized stand-in for a Linear / GPT-2 Conv1D, and MoE experts made
of such stand-ins (one per expert and projection), so int8 and int4 differ only in how a matrix is stored and
multiplied."""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from flash_experts.model.expert_products import expert_slices
from flash_experts.model.moe import GroupedExperts, expert_compute_dtype, expert_mlp

# Inside a compiled graph (the decode step) a product of this many rows or fewer is written as a multiply and a
# sum over the input features, one loop that streams the weight once; with more rows that loop reads the weight
# once per row and the library GEMM wins (GPT-2 at batch 16 with a limit of 16 rows: BENCHMARKS.md).
COMPILED_SUM_MAX_ROWS = 1


def weight_and_bias(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """An `nn.Linear`'s or GPT-2 `Conv1D`'s weight as (out, in) (Conv1D stores (in, out)) and its bias."""
    return (module.weight.t() if isinstance(module, Conv1D) else module.weight), module.bias


class QuantizedLinear(nn.Module):
    """y = x @ dequantized(w).T + bias, in x's dtype. A subclass stores the weight its own way (buffers, not
    parameters: nothing trains them) and implements `product(x_RI)` for 2-D x."""

    scheme = "?"  # "int8" | "int4": how `compare` and `--help` name it

    def __init__(self, weight_OI: Tensor, bias_O: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight_OI.shape
        self.register_buffer("bias", None if bias_O is None else bias_O.detach().clone())
        # True when the float weight lives on as another module's parameter (an LM head tied to the input
        # embedding): this quantized copy is then not a parameter of its own.
        self.copies_a_parameter = False

    @classmethod
    def from_module(cls, module: nn.Module, **options: Any) -> "QuantizedLinear":
        return cls(*weight_and_bias(module), **options)

    def product(self, x_RI: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        y = self.product(x.reshape(-1, self.in_features)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def parameter_count(self) -> int:
        """The float parameters this module stands for (the weight's logical size, not its packed bytes)."""
        weight = 0 if self.copies_a_parameter else self.out_features * self.in_features
        return weight + (0 if self.bias is None else self.bias.numel())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme} weight-only"


class QuantizedGroupedExperts(nn.Module):
    """`GroupedExperts` with quantized weights: one quantized product per expert that received rows, so decoding
    reads only the experts the router chose (at batch 1: top-k of them)."""

    def __init__(self, experts: GroupedExperts, make_linear: Callable[[Tensor, Tensor | None], QuantizedLinear]):
        super().__init__()
        self.activation = experts.activation
        self.gated = experts.gated
        self.num_experts = experts.num_experts
        names = ("w_gate", "w_up", "w_down") if experts.gated else ("w_up", "w_down")
        biases = {"w_up": experts.b_up, "w_down": experts.b_down, "w_gate": None}
        # The float experts store (E, in, out) like Conv1D; each expert's projection is quantized as (out, in).
        self.experts = nn.ModuleList(
            nn.ModuleDict({
                name: make_linear(getattr(experts, name)[e].t(),
                                  None if biases[name] is None else biases[name][e])
                for name in names
            })
            for e in range(experts.num_experts)
        )

    def forward(self, x_ND: Tensor, counts_E: Tensor) -> Tensor:
        x_ND = x_ND.to(expert_compute_dtype(x_ND))
        out_ND = x_ND.new_empty(x_ND.shape)
        for e, rows in expert_slices(counts_E.tolist()):
            expert = self.experts[e]
            out_ND[rows] = expert_mlp(x_ND[rows], lambda name, h, expert=expert: expert[name](h), self.gated,
                                      self.activation)
        return out_ND
