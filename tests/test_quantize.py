"""Weight-only int8 quantization, held to plain PyTorch math on the dequantized weights (float64 / fp32).

The reference for a quantized model is the same model with every quantized matrix replaced by its
dequantized value (int8 * scale) and run unchanged in fp32: the only differences left are the bf16 rounding
of the activations the int8 kernel multiplies with.
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
from flash_experts.model.quantize import (
    INT8_KERNEL_MAX_ROWS,
    Int8GroupedExperts,
    Int8Linear,
    int8_linear,
    quantize_int8,
    quantize_weight_int8,
)


def dequantized(w_OI: torch.Tensor) -> torch.Tensor:
    w_int8, scales = quantize_weight_int8(w_OI)
    return w_int8.float() * scales[:, None]


def fake_quantized(model: nn.Module) -> nn.Module:
    """A copy whose quantizable weights hold their dequantized values, everything else untouched."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(dequantized(module.weight))
            elif isinstance(module, Conv1D):
                module.weight.copy_(dequantized(module.weight.t()).t())
            elif isinstance(module, GroupedExperts):
                for w in (module.w_gate, module.w_up, module.w_down):
                    if w is not None:
                        for e in range(w.shape[0]):
                            w[e].copy_(dequantized(w[e].t()).t())
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
    # The product runs on bf16 x with bf16 scales and a bf16 (or fp32) result: each rounding is at most
    # 2^-8 relative, of |x| |w| summed (x), of the product (scales, result).
    bound = 2**-8 * (x.double().abs() @ w_deq.abs().t()) + 2 * 2**-8 * reference.abs() + 1e-6
    assert bool(((y.double() - reference).abs() <= bound).all())
    uses_kernel = 2 * rows <= INT8_KERNEL_MAX_ROWS and in_features % 16 == 0
    assert bool(kernel_calls) == uses_kernel


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


def test_quantized_gpt2_moe_equals_its_dequantized_fp32_reference():
    model = tiny_moe_gpt2()
    reference = fake_quantized(model)
    quantized = quantize_int8(copy.deepcopy(model))
    kinds = {type(m) for m in quantized.modules()}
    assert not kinds & {nn.Linear, Conv1D, GroupedExperts}
    assert {Int8Linear, Int8GroupedExperts, Router} <= kinds
    assert not any(p.requires_grad for p in quantized.parameters())
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    assert_quantized_model_matches(quantized, reference, ids)


def test_quantized_hf_gpt2_equals_its_dequantized_reference():
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(tiny_gpt2_config()).eval()
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(2))
    assert_quantized_model_matches(quantize_int8(copy.deepcopy(hf)), fake_quantized(hf), ids)


def test_quantized_llama_moe_with_gated_experts_equals_its_reference():
    from transformers import LlamaConfig, LlamaForCausalLM

    from flash_experts.model import upcycle

    torch.manual_seed(0)
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    model = upcycle(dense, num_experts=4, top_k=2, moe_layers="all").eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    assert_quantized_model_matches(quantize_int8(copy.deepcopy(model)), fake_quantized(model), ids)


def test_quantized_model_decodes_with_the_kv_cache_like_its_reference():
    """Greedy decoding through our generate loop (static cache, one row at a time: the int8 kernel path)."""
    from flash_experts.generation import SamplingConfig, generate

    model = tiny_moe_gpt2()
    prompt = torch.randint(0, 512, (1, 8), generator=torch.Generator().manual_seed(4))
    greedy = SamplingConfig(temperature=0.0)
    got = generate(quantize_int8(copy.deepcopy(model)), None, prompt, greedy, 12, eos_token_id=-1).token_ids[0]
    want = generate(fake_quantized(model), None, prompt, greedy, 12, eos_token_id=-1).token_ids[0]
    assert len(got) == 12
    assert sum(a == b for a, b in zip(got, want)) >= 10


def test_nothing_to_quantize_is_an_error():
    with pytest.raises(ValueError, match="nothing to quantize"):
        quantize_int8(nn.Sequential(nn.LayerNorm(4)))


@pytest.mark.parametrize("tied", [True, False])
def test_parameter_count_of_a_quantized_model_equals_the_original(tied):
    """Reference: the unquantized model's count. Quantized weights are buffers but still the model's parameters;
    a tied LM head's int8 copy is not a second parameter."""
    from flash_experts.evaluation import count_parameters

    model = tiny_moe_gpt2()
    if not tied:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    want = count_parameters(model)
    got = count_parameters(quantize_int8(copy.deepcopy(model)))
    assert (got.total, got.active, got.expert) == (want.total, want.active, want.expert)
    assert want.expert > 0


def test_a_wrong_int8_kernel_is_caught_and_bypassed(monkeypatch):
    """The fused kernel is internal and CPU-specific: one that computes a wrong product for an inner size must
    fail its one-time check and leave the dequantized product (reference: float64 math) in charge."""
    import flash_experts.model.quantize as quantize

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
