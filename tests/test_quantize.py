"""Weight-only int8 and int4 quantization, held to plain PyTorch math on the dequantized weights (float64 / fp32).

The reference for a quantized model is the same model with every quantized matrix replaced by its
dequantized value (int8 * scale; (q - 8) * scale + zero per int4 group) and run unchanged in fp32: the only
differences left are the bf16 rounding of the activations the kernels multiply with.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

from conftest import tiny_gpt2_config
from flash_experts.model import upcycle_gpt2
from flash_experts.model.moe import GroupedExperts, Router
from flash_experts.model.quantize import QuantizedGroupedExperts, quantize, quantize_int8
from flash_experts.model.quantize.int4 import Int4Linear, dequantize_int4, quantize_weight_int4
from flash_experts.model.quantize.int8 import (
    INT8_KERNEL_MAX_ROWS,
    Int8Linear,
    int8_linear,
    int8_product,
    quantize_weight_int8,
)

SCHEMES = ["int8", "int4"]


def dequantized(w_OI: torch.Tensor, scheme: str = "int8") -> torch.Tensor:
    if scheme == "int4":
        return dequantize_int4(*quantize_weight_int4(w_OI), torch.float64).float()
    w_int8, scales = quantize_weight_int8(w_OI)
    return w_int8.float() * scales[:, None]


def fake_quantized(model: nn.Module, scheme: str = "int8") -> nn.Module:
    """A copy whose quantizable weights hold their dequantized values, everything else untouched."""
    model = copy.deepcopy(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    with torch.no_grad():
        for module in model.modules():
            if module is head:  # int4 keeps the LM head at 8 bits
                # A head tied to the input embedding: quantization leaves the embedding as it was, so untie.
                module.weight = nn.Parameter(dequantized(module.weight, "int8"))
            elif isinstance(module, nn.Linear):
                module.weight.copy_(dequantized(module.weight, scheme))
            elif isinstance(module, Conv1D):
                module.weight.copy_(dequantized(module.weight.t(), scheme).t())
            elif isinstance(module, GroupedExperts):
                for w in (module.w_gate, module.w_up, module.w_down):
                    if w is not None:
                        for e in range(w.shape[0]):
                            w[e].copy_(dequantized(w[e].t(), scheme).t())
    return model


def test_quantized_weight_is_within_half_a_step_of_the_original():
    torch.manual_seed(0)
    w = torch.randn(48, 80)
    w[3, 7] = 40.0  # an outlier sets its row's scale, and only its row's
    w[5] = 0.0  # an all-zero row must not divide by zero
    w_int8, scales = quantize_weight_int8(w)
    assert w_int8.dtype == torch.int8 and scales.shape == (48,)
    assert int(w_int8.abs().max()) == 127
    error = (w_int8.float() * scales[:, None] - w).abs()
    assert bool((error <= scales[:, None] / 2 + 1e-6).all())
    assert bool((w_int8[5] == 0).all()) and torch.isfinite(scales).all()
    assert scales[3] == pytest.approx(40.0 / 127) and bool((scales[torch.arange(48) != 3] < 0.05).all())


@pytest.mark.parametrize("rows", [1, 5, INT8_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS + 1, 40])
@pytest.mark.parametrize("in_features", [64, 24])  # 24: not a multiple of 16, the kernel's limit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int8_linear_equals_float64_math_on_the_dequantized_weight(rows, in_features, dtype, with_bias, monkeypatch):
    torch.manual_seed(rows + in_features)
    w_int8, scales = quantize_weight_int8(torch.randn(72, in_features))
    bias = torch.randn(72) if with_bias else None
    x = torch.randn(2, rows, in_features).to(dtype)

    kernel_calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: kernel_calls.append(1) or kernel(*a))
    y = int8_linear(x, w_int8, scales, bias)

    w_deq = w_int8.double() * scales.double()[:, None]
    reference = x.double() @ w_deq.t()
    if bias is not None:
        reference = reference + bias.double()
    assert y.shape == (2, rows, 72) and y.dtype == dtype
    # The product runs on bf16 x, its sum rounded to bf16, the scale fp32 (`int8_product`): each rounding is at
    # most 2^-8 relative, of |x| |w| summed (x), of the product (the sum; a bf16 result once more).
    bound = 2**-8 * (x.double().abs() @ w_deq.abs().t()) + 2 * 2**-8 * reference.abs() + 1e-6
    assert bool(((y.double() - reference).abs() <= bound).all())
    uses_kernel = 2 * rows <= INT8_KERNEL_MAX_ROWS and in_features % 16 == 0
    assert bool(kernel_calls) == uses_kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_int8_path_computes_int8_product(dtype, monkeypatch):
    """One int8 arithmetic (int8.py): the CPU kernel (few rows) and the dequantized product (many rows) compute
    `int8_product`, rounding where it rounds, so they differ by the order of their fp32 sums at most: one bf16 step
    of the result. The compiled step's multiply-and-sum (one row) is the precise one: float64 math on x as it is,
    to fp32 rounding, and within the bf16 rounding of x and of the sum of the others."""
    torch.manual_seed(3)
    module = Int8Linear(torch.randn(96, 64) * 0.05, None)
    w_int8, scales = module.weight_int8, module.scales
    x = torch.randn(INT8_KERNEL_MAX_ROWS + 8, 64).to(dtype)
    want = int8_product(x, w_int8, scales).double()

    def close(got: torch.Tensor, rows: slice) -> bool:
        return bool(((got.double() - want[rows]).abs() <= 2**-8 * want[rows].abs() + 1e-7).all())

    kernel_calls = []
    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: kernel_calls.append(1) or kernel(*a))
    few, many = slice(0, 3), slice(None)
    assert close(int8_linear(x[few], w_int8, scales), few) and kernel_calls  # the kernel's path
    calls = len(kernel_calls)
    assert close(int8_linear(x, w_int8, scales), many) and len(kernel_calls) == calls  # the dequantized product
    with monkeypatch.context() as patch, torch.no_grad():
        patch.setattr(torch.compiler, "is_compiling", lambda: True)
        compiled = module(x[:1]).double()  # the compiled step's multiply-and-sum
    w = w_int8.double() * scales.double()[:, None]
    exact = x[:1].double() @ w.t()
    output_rounding = 1e-5 if dtype == torch.float32 else 2**-8  # a bf16 model's output is bf16
    assert torch.allclose(compiled, exact, rtol=output_rounding, atol=1e-6 * float(exact.abs().max()))
    bf16_rounding = 2**-8 * (x[:1].double().abs() @ w.abs().t()) + 2**-7 * exact.abs()
    assert bool(((compiled - want[:1]).abs() <= bf16_rounding).all())


def test_the_int8_kernel_path_has_no_bias_per_output_channel():
    """Rounding errors of the products are random and average out over rows; a scale rounded to bf16 is not: it
    moves every row of its channel by the same factor, up to 2^-8 (what eager int8 decoding did until the fp32
    scale came after the kernel). Per channel, the mean relative error of the kernel path against float64 math
    (on the same bf16 x) over 1,024 rows must stay under 2^-10 (measured: ~2^-12); the same kernel given bf16
    scales must fail that (measured: ~2^-8)."""
    torch.manual_seed(5)
    w_int8, scales = quantize_weight_int8(torch.randn(96, 64) * 0.05)
    x = torch.randn(1024, 64)
    want = x.to(torch.bfloat16).double() @ (w_int8.double() * scales.double()[:, None]).t()

    def worst_channel_bias(y: torch.Tensor) -> float:
        counted = want.abs() > 0.5 * want.abs().mean(0)  # rows where a relative error means something
        relative = torch.where(counted, (y.double() - want) / want, torch.zeros_like(want))
        return float((relative.sum(0) / counted.sum(0)).abs().max())

    rows = range(0, 1024, INT8_KERNEL_MAX_ROWS)
    ours = torch.cat([int8_linear(x[r:r + INT8_KERNEL_MAX_ROWS], w_int8, scales) for r in rows])
    rounded_scales = torch.cat([torch._weight_int8pack_mm(x[r:r + INT8_KERNEL_MAX_ROWS].to(torch.bfloat16), w_int8,
                                                          scales.to(torch.bfloat16)) for r in rows])
    assert worst_channel_bias(ours) < 2**-10
    assert worst_channel_bias(rounded_scales) > 2**-10


@pytest.mark.parametrize("kind", [nn.Linear, Conv1D])
def test_int8_linear_module_replaces_linear_and_conv1d(kind):
    torch.manual_seed(0)
    module = nn.Linear(32, 48) if kind is nn.Linear else Conv1D(48, 32)
    quantized = Int8Linear.from_module(module)
    x = torch.randn(3, 32)
    with torch.no_grad():
        reference = fake_quantized(module)(x)
        original = module(x)
    assert torch.allclose(quantized(x), reference, rtol=0, atol=0.02 * reference.abs().mean())
    assert (quantized(x) - original).abs().max() < 0.05 * original.abs().mean()  # quantization error stays small
    assert not list(quantized.parameters())


def tiny_moe_gpt2(num_experts: int = 4) -> nn.Module:
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(tiny_gpt2_config(n_layer=4, n_embd=64)).eval()
    model = upcycle_gpt2(hf, num_experts=num_experts, top_k=2, moe_layers="every_other").eval()
    with torch.no_grad():  # experts made different, so routing decides the output
        for module in model.modules():
            if isinstance(module, GroupedExperts):
                module.w_up.add_(0.02 * torch.randn_like(module.w_up))
            if isinstance(module, Router):
                module.weight.normal_(0.0, 0.5)
    return model


def assert_quantized_model_matches(quantized: nn.Module, reference: nn.Module, ids: torch.Tensor) -> None:
    """The products see bf16 activations, so the yardstick is the reference itself under bf16 autocast: most
    positions must be as close as it is. A token whose top-2 experts nearly tie may route differently in one
    layer (seen: 1 position in 48), so a few positions may differ more, boundedly."""
    with torch.no_grad():
        want = reference(ids).logits
        got = quantized(ids).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_error = (reference(ids).logits.float() - want).abs().max()
    assert got.dtype == want.dtype
    error_per_position = (got - want).abs().amax(-1)
    assert (error_per_position <= 2 * bf16_error).float().mean() >= 0.9
    assert error_per_position.max() <= 0.1 * want.abs().max()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_gpt2_moe_equals_its_dequantized_fp32_reference(scheme):
    model = tiny_moe_gpt2()
    reference = fake_quantized(model, scheme)
    quantized = quantize(copy.deepcopy(model), scheme)
    kinds = {type(m) for m in quantized.modules()}
    assert not kinds & {nn.Linear, Conv1D, GroupedExperts}
    assert {Int8Linear if scheme == "int8" else Int4Linear, QuantizedGroupedExperts, Router} <= kinds
    assert not any(p.requires_grad for p in quantized.parameters())
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    assert_quantized_model_matches(quantized, reference, ids)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_hf_gpt2_equals_its_dequantized_reference(scheme):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(tiny_gpt2_config()).eval()
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(2))
    assert_quantized_model_matches(quantize(copy.deepcopy(hf), scheme), fake_quantized(hf, scheme), ids)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_llama_moe_with_gated_experts_equals_its_reference(scheme):
    from transformers import LlamaConfig, LlamaForCausalLM

    from flash_experts.model import upcycle

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    model = upcycle(dense, num_experts=4, top_k=2, moe_layers="all").eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    assert_quantized_model_matches(quantize(copy.deepcopy(model), scheme), fake_quantized(model, scheme), ids)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantized_model_decodes_with_the_kv_cache_like_its_reference(scheme):
    """Greedy decoding through our generate loop (static cache, one row at a time: the kernel path)."""
    from flash_experts.generation import SamplingConfig, generate

    model = tiny_moe_gpt2()
    prompt = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(4))
    greedy = SamplingConfig(temperature=0.0)
    got = generate(quantize(copy.deepcopy(model), scheme), None, prompt, greedy, 12, eos_token_id=-1).token_ids[0]
    want = generate(fake_quantized(model, scheme), None, prompt, greedy, 12, eos_token_id=-1).token_ids[0]
    assert len(got) == 12
    assert sum(a == b for a, b in zip(got, want)) >= 10


def test_nothing_to_quantize_is_an_error():
    with pytest.raises(ValueError, match="nothing to quantize"):
        quantize_int8(nn.Sequential(nn.LayerNorm(4)))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_of_a_quantized_model_equals_the_original(tied, scheme):
    """Reference: the unquantized model's count. Quantized weights are buffers but still the model's parameters;
    a tied LM head's int8 copy is not a second parameter."""
    from flash_experts.evaluation import count_parameters

    model = tiny_moe_gpt2()
    if not tied:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    want = count_parameters(model)
    got = count_parameters(quantize(copy.deepcopy(model), scheme))
    assert (got.total, got.active, got.expert) == (want.total, want.active, want.expert)
    assert want.expert > 0


def test_a_wrong_int8_kernel_is_caught_and_bypassed(monkeypatch):
    """The fused kernel is internal and CPU-specific: one that computes a wrong product for an inner size must
    fail its one-time check and leave the dequantized product (reference: float64 math) in charge."""
    import flash_experts.model.quantize.int8 as quantize

    kernel = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda x, w, s: kernel(x, w, s) * 1.1)
    monkeypatch.setattr(quantize, "_KERNEL_CORRECT", {})
    w_int8, scales = quantize_weight_int8(torch.randn(40, 32))
    x = torch.randn(1, 32)
    y = int8_linear(x, w_int8, scales)
    assert quantize._KERNEL_CORRECT == {32: False}
    reference = x.double() @ (w_int8.double() * scales.double()[:, None]).t()
    assert torch.allclose(y.double(), reference, rtol=0.02, atol=0.02 * reference.abs().mean())
    monkeypatch.setattr(torch, "_weight_int8pack_mm", kernel)
    monkeypatch.setattr(quantize, "_KERNEL_CORRECT", {})
    int8_linear(x, w_int8, scales)
    assert quantize._KERNEL_CORRECT == {32: True}  # the real kernel passes its check here


# ------------------------------------------------------------------------------------------------------ int4


def test_int4_weight_is_within_half_a_step_of_the_original_per_group():
    """Reference: each group's scale and zero computed in float64 from its range ((hi - lo) / 15, lo + 8 scale):
    every weight lies within half the stored step, plus what rounding scale and zero to bf16 moved the grid."""
    torch.manual_seed(0)
    w = torch.randn(24, 128)
    w[3, 7] = 40.0  # an outlier sets its own group's scale only
    w[5, :32] = 0.0  # an all-zero group must not divide by zero
    w[6, 32:64] = 10.0 + 0.01 * torch.randn(32)  # a narrow group far from zero: bf16 rounding of zero shows
    q, scales, zeros = quantize_weight_int4(w, group_size=32)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scales.shape == zeros.shape == (24, 4)
    assert scales.dtype == zeros.dtype == torch.bfloat16

    groups = w.double().reshape(24, 4, 32)
    lo, hi = groups.amin(-1), groups.amax(-1)
    exact_scale = (hi - lo) / 15
    exact_zero = lo + 8 * exact_scale
    error = (dequantize_int4(q, scales, zeros, torch.float64).reshape(24, 4, 32) - groups).abs()
    grid_shift = (zeros.double() - exact_zero).abs() + 8 * (scales.double() - exact_scale).abs()
    bound = scales.double() / 2 + grid_shift
    assert bool((error <= bound[..., None] + 1e-7).all())
    assert bool((error[5, 0] == 0).all())
    assert bool((scales[torch.arange(24) != 3] < 1).all()) and float(scales[3, 0]) > 2  # the outlier's group only
    ordinary = torch.ones(24, 4, dtype=torch.bool)
    ordinary[6, 1] = False
    assert bool((error.amax(-1)[ordinary] <= scales.double()[ordinary] / 2 * 1.02 + 1e-7).all())


@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "dequantized"])
@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("out_features", [48, 37])  # 37: the kernel's rows are padded to a multiple of 16
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_int4_linear_equals_float64_math_on_the_dequantized_weight(kernel, rows, out_features, dtype, with_bias):
    torch.manual_seed(rows + out_features)
    weight = torch.randn(out_features, 96)
    bias = torch.randn(out_features) if with_bias else None
    module = Int4Linear(weight, bias, group_size=32, kernel=kernel)
    assert module.kernel is kernel
    x = torch.randn(2, rows, 96).to(dtype)
    y = module(x)

    w_deq = dequantize_int4(*quantize_weight_int4(weight, 32), torch.float64)
    reference = x.double() @ w_deq.t()
    if bias is not None:
        reference = reference + bias.double()
    assert y.shape == (2, rows, out_features) and y.dtype == dtype
    # bf16 x, bf16 dequantized weights on the portable path, bf16 (or fp32) result: each rounding at most 2^-8
    bound = 2 * 2**-8 * (x.double().abs() @ w_deq.abs().t()) + 2 * 2**-8 * reference.abs() + 1e-6
    assert bool(((y.double() - reference).abs() <= bound).all())
    assert not list(module.parameters())


def test_int4_keeps_the_lm_head_at_int8():
    """Reference: llama.cpp's 4-bit files, which keep the output matrix at 8 bits or more."""
    quantized = quantize(tiny_moe_gpt2(), "int4")
    assert type(quantized.lm_head) is Int8Linear
    assert isinstance(quantized.transformer.h[0].attn.c_attn, Int4Linear)


def test_int4_refuses_a_shape_it_cannot_serve_and_leaves_the_model_unchanged():
    from flash_experts.errors import ConfigError

    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 48), nn.Linear(48, 8))  # 48 inputs: not a multiple of 32
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="48 input features are not a multiple of the group size 32"):
        quantize(model, "int4")
    assert all(isinstance(m, nn.Linear) for m in model) and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ConfigError, match="group size must be one of"):
        quantize(model, "int4", group_size=48)


def test_a_wrong_int4_kernel_is_caught_and_bypassed(monkeypatch):
    """Like the int8 kernel: one that computes a wrong product fails its one-time check, and the layer keeps
    the portable dequantized product (reference: float64 math)."""
    import flash_experts.model.quantize.int4 as int4

    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu

    class WrongOps:
        def __getattr__(self, name):
            if name == "_weight_int4pack_mm_for_cpu":
                return lambda *a: kernel(*a) * 1.1
            return getattr(torch.ops.aten, name)

    monkeypatch.setattr(int4.torch.ops, "aten", WrongOps())
    monkeypatch.setattr(int4, "_KERNEL_CORRECT", {})
    weight = torch.randn(40, 64)
    module = Int4Linear(weight, None)
    assert int4._KERNEL_CORRECT == {(64, 32): False} and not module.kernel
    monkeypatch.undo()
    monkeypatch.setattr(int4, "_KERNEL_CORRECT", {})
    assert Int4Linear(weight, None).kernel and int4._KERNEL_CORRECT == {(64, 32): True}
