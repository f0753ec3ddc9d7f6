"""Our models as Hugging Face causal LMs: `generate` (greedy, sampling, beam search, left padding, our static
KV cache as a transformers `Cache`) and `pipeline("text-generation")`.

Reference: transformers' own `generate` / `pipeline` on the dense source model. Right after upcycling the MoE
model computes the dense model's function, so every decoding strategy must give the same tokens.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM, pipeline

from conftest import tiny_gpt2_config
from flash_experts.model import upcycle
from test_llama_moe import randomize, tiny_llama_config
from tiny_tokenizer import make_tokenizer

STRATEGIES = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.9),
    "beam search": dict(do_sample=False, num_beams=3),
    "beams, 2 returned": dict(do_sample=False, num_beams=3, num_return_sequences=2),
}


def dense_model(family: str, vocab: int = 256) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "llama":
        return randomize(LlamaForCausalLM(tiny_llama_config(vocab_size=vocab)))
    return randomize(GPT2LMHeadModel(tiny_gpt2_config(vocab_size=vocab)))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request):
    dense = dense_model(request.param)
    return dense, upcycle(dense, num_experts=4, top_k=2).eval()


def left_padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(2, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 1, 0  # row 0: three pad tokens on the left
    return ids, mask


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_generate_equals_hf_generate_on_the_dense_source(pair, strategy):
    dense, moe = pair
    ids, mask = left_padded_prompts()
    settings = dict(max_new_tokens=12, pad_token_id=1, eos_token_id=None, **STRATEGIES[strategy])
    torch.manual_seed(7)
    expected = dense.generate(ids, attention_mask=mask, **settings)
    torch.manual_seed(7)
    got = moe.generate(ids, attention_mask=mask, **settings)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("strategy", ["greedy", "beam search"])
def test_generate_with_our_static_cache_equals_hf_generate(pair, strategy):
    """Our preallocated `KVCache` passed to `generate` (beam search reorders it in place)."""
    dense, moe = pair
    ids, mask = left_padded_prompts()
    settings = dict(max_new_tokens=12, pad_token_id=1, eos_token_id=None, **STRATEGIES[strategy])
    expected = dense.generate(ids, attention_mask=mask, **settings)
    rows = ids.shape[0] * settings.get("num_beams", 1)
    cache = moe.make_cache(rows, ids.shape[1] + 12)
    got = moe.generate(ids, attention_mask=mask, cache=cache, **settings)
    assert torch.equal(got, expected)
    assert cache.get_seq_length() == ids.shape[1] + 11  # the last token is sampled, never fed back


def test_pipeline_text_generation_from_a_saved_folder_equals_the_dense_pipeline(tmp_path):
    tokenizer = make_tokenizer()
    dense = dense_model("llama", vocab=len(tokenizer))
    dense.config.eos_token_id = dense.config.bos_token_id = tokenizer.eos_token_id
    dense.generation_config.eos_token_id = tokenizer.eos_token_id
    moe = upcycle(dense, num_experts=4, top_k=2)
    moe.save_pretrained(tmp_path / "moe")
    tokenizer.save_pretrained(tmp_path / "moe")

    import flash_experts  # noqa: F401  (a plain package import is enough for the Auto classes)

    ours = pipeline("text-generation", model=str(tmp_path / "moe"))
    reference = pipeline("text-generation", model=dense, tokenizer=tokenizer)
    prompt = "Llanowar"
    settings = dict(max_new_tokens=10, do_sample=False)
    got = ours(prompt, **settings)[0]["generated_text"]
    assert got == reference(prompt, **settings)[0]["generated_text"]
    assert got.startswith(prompt) and len(got) > len(prompt)
