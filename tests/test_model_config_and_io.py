"""Config validation (clear ValueErrors naming the field) and save/load round trips (reference: the
model before saving)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from flash_experts.model import GPT2MoEConfig, GPT2MoEForCausalLM, upcycle

BASE = dict(n_layer=4, n_embd=32, n_head=4, vocab_size=128, n_positions=64)


@pytest.mark.parametrize("overrides,field", [
    (dict(num_experts=4, top_k=5), "top_k"),
    (dict(num_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(num_experts=0), "num_experts"),
    (dict(top_k=0), "top_k"),
    (dict(attention_implementation="fast"), "attention_implementation"),
    (dict(moe_layers=[1, 4]), "moe_layers"),
    (dict(moe_layers=[-1]), "moe_layers"),
    (dict(moe_layers="some"), "moe_layers"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(router_aux_loss_coef=-0.1), "router_aux_loss_coef"),
    (dict(router_jitter=1.5), "router_jitter"),
    (dict(n_head=5), "n_head"),
])
def test_invalid_settings_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        GPT2MoEConfig(**{**BASE, **overrides})


def test_moe_layer_selection():
    assert GPT2MoEConfig(**BASE, moe_layers="all").moe_layer_indices() == [0, 1, 2, 3]
    assert GPT2MoEConfig(**BASE, moe_layers="every_other").moe_layer_indices() == [1, 3]
    assert GPT2MoEConfig(**BASE, moe_layers=[2, 0]).moe_layer_indices() == [0, 2]
    assert GPT2MoEConfig(**BASE, moe_layers=[]).moe_layer_indices() == []


def test_save_pretrained_round_trip_gives_identical_logits(tmp_path, tiny_gpt2_dir):
    model = upcycle(str(tiny_gpt2_dir), num_experts=4, top_k=2, capacity_factor=1.25).eval()
    with torch.no_grad():  # make routers non-trivial so a lost router would show
        for layer in (1, 3):
            model.transformer.h[layer].mlp.router.weight.normal_()
            model.transformer.h[layer].mlp.experts.w_up[0].mul_(1.5)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        for loaded in (GPT2MoEForCausalLM.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
            assert isinstance(loaded, GPT2MoEForCausalLM)
            assert torch.equal(loaded.eval()(ids).logits, expected)
    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.num_experts, config.num_experts_per_tok, config.capacity_factor) == (4, 2, 1.25)
    assert config.moe_layer_indices() == [1, 3]


def test_tied_embeddings_stay_tied():
    model = GPT2MoEForCausalLM(GPT2MoEConfig(**BASE, bos_token_id=0, eos_token_id=0))
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_vocab_projection_equals_linear_and_follows_weight_changes():
    """Reference: F.linear with the same weight. The decode-time transposed copy must give the same logits,
    and must never go stale: in-place updates (an optimizer step), a dtype change and reloading all show."""
    import torch.nn.functional as F

    from flash_experts.model.common import VocabProjection

    torch.manual_seed(0)
    head = VocabProjection(24, 50, bias=False)
    one_row, many_rows = torch.randn(1, 1, 24), torch.randn(2, 20, 24)
    decode_batch, last_positions = torch.randn(3, 1, 24), torch.randn(3, 5, 24)[:, -1:]  # copy path, 3 rows
    with torch.no_grad():
        for x in (one_row, many_rows, decode_batch, last_positions):
            torch.testing.assert_close(head(x), F.linear(x, head.weight), rtol=1e-5, atol=1e-6)
        assert hasattr(head, "_weight_t")  # the one-row call took the copy path
        head.weight.add_(1.0)  # what an optimizer step does
        torch.testing.assert_close(head(one_row), F.linear(one_row, head.weight), rtol=1e-5, atol=1e-6)
        head.load_state_dict({"weight": torch.randn(50, 24)})
        torch.testing.assert_close(head(one_row), F.linear(one_row, head.weight), rtol=1e-5, atol=1e-6)
        head.to(torch.bfloat16)
        out = head(one_row.bfloat16())
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, F.linear(one_row.bfloat16(), head.weight), rtol=1e-2, atol=1e-2)
    # with gradients it is a plain nn.Linear (the copy would cut the graph)
    x = one_row.bfloat16().requires_grad_()
    head(x).sum().backward()
    assert head.weight.grad is not None and x.grad is not None
