"""Upcycled GPT-2 MoE vs the Hugging Face GPT2LMHeadModel it came from (the reference)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from flash_experts.errors import ConfigError
from flash_experts.model import GPT2MoEForCausalLM, upcycle
from greedy import greedy_reference, greedy_with_cache  # noqa: E402

IMPLEMENTATIONS = ["sdpa", "eager", "flash"]


@pytest.fixture(scope="module")
def dense(tiny_gpt2_dir):
    return GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_upcycled_equals_hf_gpt2_logits(tiny_gpt2_dir, dense, implementation):
    moe = upcycle(str(tiny_gpt2_dir), num_experts=4, top_k=2, moe_layers="every_other",
                  attention_implementation=implementation).eval()
    assert isinstance(moe, GPT2MoEForCausalLM)
    assert moe.config.moe_layer_indices() == [1, 3]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for batch, length in [(1, 1), (2, 17), (3, 64), (2, 128)]:
            ids = torch.randint(0, 512, (batch, length), generator=generator)
            diff = (moe(ids).logits - dense(ids).logits).abs().max().item()
            assert diff <= 1e-4, (implementation, batch, length, diff)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_upcycled_greedy_20_tokens_equal_hf(tiny_gpt2_dir, dense, implementation):
    moe = upcycle(str(tiny_gpt2_dir), num_experts=4, top_k=2, moe_layers="all",
                  attention_implementation=implementation).eval()
    prompt = torch.tensor([[5, 17, 300, 42, 9]])
    with torch.no_grad():
        expected = greedy_reference(dense, prompt, 20)
        assert torch.equal(greedy_reference(moe, prompt, 20), expected)
        assert torch.equal(greedy_with_cache(moe, prompt, 20), expected)


@pytest.mark.parametrize("top_k,num_experts", [(1, 1), (2, 8), (8, 8)])
def test_upcycled_exact_for_other_layouts(tiny_gpt2_dir, dense, top_k, num_experts):
    moe = upcycle(str(tiny_gpt2_dir), num_experts=num_experts, top_k=top_k, moe_layers=[0, 2]).eval()
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (moe(ids).logits - dense(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("setting", [dict(moe_intermediate_size=8), dict(shared_expert_intermediate_size=8)])
def test_upcycling_refuses_experts_that_cannot_be_copies_of_the_mlp(dense, setting):
    with pytest.raises(ConfigError, match="copies of the model's MLP"):
        upcycle(dense, num_experts=2, top_k=1, **setting)


def test_upcycle_accepts_a_module_and_keeps_hf_weight_names(dense):
    moe = upcycle(dense, num_experts=2, top_k=1, moe_layers=[1])
    names = set(moe.state_dict())
    assert "transformer.h.0.mlp.c_fc.weight" in names  # dense layer keeps HF names
    assert {"transformer.h.1.mlp.router.weight", "transformer.h.1.mlp.experts.w_up"} <= names
    w_up = moe.state_dict()["transformer.h.1.mlp.experts.w_up"]
    for expert in range(2):  # each expert is an exact copy of the MLP it replaced (Conv1D layout)
        assert torch.equal(w_up[expert], dense.state_dict()["transformer.h.1.mlp.c_fc.weight"])


def test_padded_batch_equals_each_prompt_alone(tiny_gpt2_dir, dense):
    """Left padding + attention_mask gives what HF gives for each unpadded prompt (reference: HF dense)."""
    moe = upcycle(str(tiny_gpt2_dir), num_experts=4, top_k=2).eval()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10], [11]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    for implementation in IMPLEMENTATIONS:
        moe.config.attention_implementation = implementation
        with torch.no_grad():
            logits = moe(ids, attention_mask=mask).logits
            for row, prompt in enumerate(prompts):
                alone = dense(torch.tensor([prompt])).logits[0]
                diff = (logits[row, width - len(prompt):] - alone).abs().max().item()
                assert diff <= 1e-4, (implementation, row, diff)
                assert torch.isfinite(logits[row]).all()


def test_kv_cache_incremental_equals_full_sequence(tiny_gpt2_dir):
    moe = upcycle(str(tiny_gpt2_dir), num_experts=4, top_k=2, moe_layers="all").eval()
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = moe(ids).logits
        cache = moe.make_cache(2, 30)
        pieces = [moe(ids[:, :10], past_key_values=cache, use_cache=True).logits]
        for t in range(10, 30, 5):
            pieces.append(moe(ids[:, t:t + 5], past_key_values=cache, use_cache=True).logits)
    assert (torch.cat(pieces, dim=1) - full).abs().max().item() <= 1e-5


def test_hf_dynamic_cache_also_works(tiny_gpt2_dir):
    from transformers import DynamicCache

    moe = upcycle(str(tiny_gpt2_dir), num_experts=4, top_k=2).eval()
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = moe(ids).logits
        cache = DynamicCache()
        first = moe(ids[:, :8], past_key_values=cache, use_cache=True).logits
        rest = moe(ids[:, 8:], past_key_values=cache, use_cache=True).logits
    assert (torch.cat([first, rest], 1) - full).abs().max().item() <= 1e-5


def test_loss_is_lm_loss_plus_weighted_router_losses(tiny_gpt2_dir, dense):
    moe = upcycle(str(tiny_gpt2_dir), num_experts=4, top_k=2, router_aux_loss_coef=0.5,
                  router_z_loss_coef=0.25).eval()
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = moe(ids, labels=ids)
        reference = dense(ids, labels=ids).loss  # HF's own shifted cross entropy
    assert abs(out.lm_loss.item() - reference.item()) <= 1e-5
    expected_aux = sum(0.5 * s.load_balancing_loss + 0.25 * s.z_loss for s in out.router_stats)
    assert torch.allclose(out.aux_loss, expected_aux)
    assert torch.allclose(out.loss, out.lm_loss + out.aux_loss)
    assert [s.layer for s in out.router_stats] == [1, 3]
    assert all(int(s.tokens_per_expert.sum()) == 2 * 20 * 2 for s in out.router_stats)


def test_too_long_input_is_a_clear_error(tiny_gpt2_dir):
    moe = upcycle(str(tiny_gpt2_dir), num_experts=2, top_k=1)
    with pytest.raises(ValueError, match="longer than the model's 128 positions"):
        moe(torch.zeros(1, 129, dtype=torch.long))
