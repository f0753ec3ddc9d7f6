"""Weight-only quantization for inference: fewer bytes for every decoded token to read.

Decoding one token at a time is bound by memory bandwidth: each step reads every weight once for a handful of
rows. Storing the matrices in 8 or 4 bits cuts those bytes 4x or ~6x against fp32; the activations,
embeddings, norms, routers and the KV cache keep the model's dtype.

    quantize(model, "int8")                  # int8.py: one scale per output channel
    quantize(model, "int4", group_size=32)   # int4.py: a scale and a zero per group of input weights

Every Linear / Conv1D (the LM head included) becomes a `QuantizedLinear` and every MoE expert stack a
`QuantizedGroupedExperts` (base.py). Inference only: quantized modules hold buffers, not parameters, so
nothing trains them; keep the unquantized checkpoint and quantize when loading (`--quantize` of generate,
generate-names, compare, evaluate). benchmarks/bench_generate.py reports the tokens a quantized model shares
with the fp32 one, `flash-experts evaluate --quantize ...` its perplexity.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator

from torch import nn
from transformers.pytorch_utils import Conv1D

from flash_experts.errors import ConfigError
from flash_experts.model.moe import GroupedExperts
from flash_experts.model.quantize.base import QuantizedGroupedExperts, QuantizedLinear, weight_and_bias
from flash_experts.model.quantize.int4 import DEFAULT_INT4_GROUP_SIZE, Int4Linear, check_int4_shape
from flash_experts.model.quantize.int8 import Int8Linear


def quantize(model: nn.Module, scheme: str, group_size: int = DEFAULT_INT4_GROUP_SIZE) -> nn.Module:
    """Replace, in place, every Linear / Conv1D (the LM head included) and every MoE expert stack by its
    weight-only `scheme` ("int8" or "int4"; `group_size` is int4's) version, and return the model. Embeddings,
    norms and routers keep their dtype (the routers are tiny and pick the experts: a quantization error there
    would change which experts run). With int4 the LM head is int8, as llama.cpp's 4-bit files keep their output
    matrix at 8 bits or more: a small model's logits lose most from it (SmolLM2: BENCHMARKS.md). A shape the
    scheme cannot serve is a ConfigError before anything changes."""
    if scheme == "int8":
        make_linear = Int8Linear
    elif scheme == "int4":
        make_linear = partial(Int4Linear, group_size=group_size)
    else:
        raise ConfigError(f"unknown quantization {scheme!r}: use int8 or int4")

    def quantizable(module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, Conv1D, GroupedExperts))

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if quantizable(child)]
    if not targets:
        raise ConfigError("nothing to quantize: the model has no Linear, Conv1D or MoE expert layers")
    if scheme == "int4":  # every shape checked first: a refusal leaves the model as it was
        for _, name, child in targets:
            where = f"{type(child).__name__} {name!r}"
            if isinstance(child, GroupedExperts):
                check_int4_shape(child.w_down.shape[1], group_size, where)  # (E, ffn, D): the down projection's input
                check_int4_shape(child.w_up.shape[1], group_size, where)
            elif child is not head:
                check_int4_shape(weight_and_bias(child)[0].shape[1], group_size, where)

    kept = {id(p) for m in model.modules() if not quantizable(m) for p in m.parameters(recurse=False)}
    for parent, name, child in targets:
        if isinstance(child, GroupedExperts):
            setattr(parent, name, QuantizedGroupedExperts(child, make_linear))
        else:
            quantized = (Int8Linear if child is head else make_linear)(*weight_and_bias(child))
            quantized.copies_a_parameter = id(child.weight) in kept
            setattr(parent, name, quantized)
    model.requires_grad_(False)
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    """`quantize(model, "int8")`."""
    return quantize(model, "int8")


def quantized_parameter_counts(model: nn.Module) -> Iterator[tuple[str, int]]:
    """(name, count) of the float parameters that quantization turned into buffers (a weight's logical size,
    not its packed bytes): what a parameter count must still count."""
    for module_name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            count = module.parameter_count()
            if count:
                yield f"{module_name}.weight", count


def quantization_of(model: nn.Module) -> str | None:
    """"int8" / "int4" when the model holds quantized matrices (the first one found names it), else None."""
    return next((m.scheme for m in model.modules() if isinstance(m, QuantizedLinear)), None)


__all__ = ["DEFAULT_INT4_GROUP_SIZE", "QuantizedGroupedExperts", "QuantizedLinear", "Int4Linear",
           "Int8Linear", "quantize", "quantize_int8", "quantized_parameter_counts", "quantization_of"]
