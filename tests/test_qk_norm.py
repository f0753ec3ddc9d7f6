"""QK-norm in our GPT-2 attention (`GPT2MoEConfig.qk_norm`), held to plain float64 math written out here: the
layer norm of each head's queries and keys by its formula, then causal softmax attention, then the projection."""

from __future__ import annotations

import math

import torch

from flash_experts.model import GPT2MoEConfig, GPT2MoEForCausalLM


def tiny(qk_norm: bool) -> GPT2MoEForCausalLM:
    config = GPT2MoEConfig(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, moe_layers=[],
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                           qk_norm=qk_norm)
    torch.manual_seed(0)
    return GPT2MoEForCausalLM(config).eval()


def layer_norm_by_formula(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    variance = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(variance + eps) * weight + bias


def test_qk_norm_attention_equals_float64_math():
    model = tiny(qk_norm=True).double()
    attn = model.transformer.h[0].attn
    with torch.no_grad():  # gains and shifts away from (1, 0), so that a missing or misplaced norm shows
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.copy_(torch.rand(norm.weight.shape, dtype=torch.float64) * 4 + 0.5)
            norm.bias.copy_(torch.randn(norm.bias.shape, dtype=torch.float64))
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    got = attn(x, None, None)

    B, T, D, H = 2, 9, 32, 4
    hd = D // H
    q, k, v = (x @ attn.c_attn.weight + attn.c_attn.bias).split(D, dim=2)
    q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in (q, k, v))
    eps = model.config.layer_norm_epsilon
    q = layer_norm_by_formula(q, attn.q_norm.weight, attn.q_norm.bias, eps)
    k = layer_norm_by_formula(k, attn.k_norm.weight, attn.k_norm.bias, eps)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D)
    want = y @ attn.c_proj.weight + attn.c_proj.bias
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_qk_norm_bounds_the_attention_logits_that_grow_without_it():
    """With the norm (unit gains) a logit is at most sqrt(head_dim) whatever the weights; without it, queries and
    keys grown large give logits as large as they are (the instability the race's traces showed)."""
    for qk_norm, bounded in ((True, True), (False, False)):
        model = tiny(qk_norm)
        attn = model.transformer.h[0].attn
        with torch.no_grad():
            attn.c_attn.weight.mul_(100.0)
        found = []
        hook = attn.register_forward_hook(lambda module, inputs, output, found=found: found.append(inputs[0]))
        model(input_ids=torch.randint(0, 64, (1, 12)))
        hook.remove()
        x = found[0]
        q, k, _ = attn.c_attn(x).split(32, dim=2)
        q, k = (t.view(1, 12, 4, 8).transpose(1, 2) for t in (q, k))
        if qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        largest = float((q @ k.transpose(-1, -2) * attn.scale).abs().max().detach())
        assert (largest <= math.sqrt(8) + 1e-4) == bounded, (qk_norm, largest)


def test_without_qk_norm_the_model_has_no_norm_parameters_and_checkpoints_round_trip(tmp_path):
    plain = tiny(qk_norm=False)
    assert not any("q_norm" in name or "k_norm" in name for name, _ in plain.named_parameters())
    normed = tiny(qk_norm=True)
    normed.save_pretrained(tmp_path)
    loaded = GPT2MoEForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.qk_norm
    ids = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(loaded(input_ids=ids).logits, normed(input_ids=ids).logits, rtol=0, atol=0)
