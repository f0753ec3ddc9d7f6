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
    (dict(moe_intermediate_size=0), "moe_intermediate_size"),
    (dict(moe_intermediate_size=2.5), "moe_intermediate_size"),
    (dict(shared_expert_intermediate_size=-1), "shared_expert_intermediate_size"),
    (dict(n_head=5), "n_head"),
    (dict(top_k=1, renormalize_through_sum=True), "renormalize_through_sum"),  # top-1: p / p, no gradient
    (dict(top_k=2, normalize_top_k=False, renormalize_through_sum=True), "renormalize_through_sum"),
    (dict(top_k=2, renormalize_through_sum=1), "renormalize_through_sum"),
])
def test_invalid_settings_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        GPT2MoEConfig(**{**BASE, **overrides})


def test_moe_layer_selection():
    assert GPT2MoEConfig(**BASE, moe_layers="all").moe_layer_indices() == [0, 1, 2, 3]
    assert GPT2MoEConfig(**BASE, moe_layers="every_other").moe_layer_indices() == [1, 3]
    assert GPT2MoEConfig(**BASE, moe_layers=[2, 0]).moe_layer_indices() == [0, 2]
    assert GPT2MoEConfig(**BASE, moe_layers=[]).moe_layer_indices() == []


def test_a_from_scratch_recipe_round_trips_through_save_pretrained(tmp_path):
    """Reference: the model before saving. Experts of their own size, dense MLPs of another, a shared expert:
    all of it in config.json and the weights, so that from_pretrained rebuilds the same function."""
    config = GPT2MoEConfig(**{**BASE, "moe_layers": "every_other"}, n_inner=64, moe_intermediate_size=16,
                           shared_expert_intermediate_size=24, num_experts=4, top_k=2)
    torch.manual_seed(0)
    model = GPT2MoEForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = GPT2MoEForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.transformer.h[1].mlp.experts.w_up.shape[-1] == 16
    assert loaded.transformer.h[1].mlp.shared_expert.w_up.shape[-1] == 24
    assert loaded.transformer.h[0].mlp.c_fc.nf == 64
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


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


def test_decode_head_equals_linear_and_leaves_the_model_as_it_was():
    """Reference: F.linear with the same weight. The decode loop's head takes the transposed copy for
    decode-sized calls and gives the same logits; training-sized calls and gradients take nn.Linear's path;
    the model's head stays a plain nn.Linear, untouched."""
    import torch.nn.functional as F

    from flash_experts.generation.decode_head import decode_head

    torch.manual_seed(0)
    model = GPT2MoEForCausalLM(GPT2MoEConfig(**BASE, bos_token_id=0, eos_token_id=0)).eval()
    head = model.lm_head
    width = head.in_features
    one_row, many_rows = torch.randn(1, 1, width), torch.randn(2, 20, width)
    decode_batch, last_positions = torch.randn(3, 1, width), torch.randn(3, 5, width)[:, -1:]
    logits = decode_head(model)
    assert logits is not head  # CPU, no bias, a plain nn.Linear: the transposed copy
    with torch.no_grad():
        for x in (one_row, many_rows, decode_batch, last_positions):
            torch.testing.assert_close(logits(x), F.linear(x, head.weight), rtol=1e-5, atol=1e-6)
    x = one_row.clone().requires_grad_()
    logits(x).sum().backward()  # with gradients it is nn.Linear (the copy would cut the graph)
    assert head.weight.grad is not None and x.grad is not None
    assert type(model.lm_head) is torch.nn.Linear and "forward" not in vars(model.lm_head)


def test_generate_uses_the_decode_head_and_gives_the_plain_heads_tokens(monkeypatch):
    """Reference: greedy decoding with the model's own nn.Linear head."""
    import importlib

    from flash_experts.generation.sampling import SamplingConfig

    generate_module = importlib.import_module("flash_experts.generation.generate")  # the package exports the function

    torch.manual_seed(0)
    model = GPT2MoEForCausalLM(GPT2MoEConfig(**BASE, bos_token_id=0, eos_token_id=0)).eval()
    used = []
    real = generate_module.decode_head

    def recording(m):
        used.append(m)
        return real(m)

    prompt = torch.tensor([[3, 5, 7], [2, 4, 6]])
    greedy = SamplingConfig(temperature=0.0)
    monkeypatch.setattr(generate_module, "decode_head", recording)
    fast = generate_module.generate(model, None, prompt, greedy, max_new_tokens=12).token_ids
    assert used == [model]
    monkeypatch.setattr(generate_module, "decode_head", lambda m: m.lm_head)
    plain = generate_module.generate(model, None, prompt, greedy, max_new_tokens=12).token_ids
    assert fast == plain


def test_forward_refuses_a_misspelled_keyword_and_accepts_transformers_own():
    """Reference: the forward without the ignored arguments. A misspelled `attention_mask` used to vanish into
    **unused and run unmasked; now it is a TypeError naming it, in both families (one shared forward)."""
    from flash_experts.model import LlamaMoEConfig, LlamaMoEForCausalLM

    torch.manual_seed(0)
    gpt2 = GPT2MoEForCausalLM(GPT2MoEConfig(**BASE, bos_token_id=0, eos_token_id=0)).eval()
    llama = LlamaMoEForCausalLM(LlamaMoEConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               num_experts=2, num_experts_per_tok=1, moe_layers=[1])).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    for model in (gpt2, llama):
        with pytest.raises(TypeError, match="attenton_mask"):
            model(input_ids=ids, attenton_mask=torch.ones_like(ids))
        with torch.no_grad():
            plain = model(input_ids=ids).logits
            with_hf = model(input_ids=ids, return_dict=True, output_attentions=False, cache_position=None).logits
        assert torch.equal(plain, with_hf)
