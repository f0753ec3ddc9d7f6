"""Model comparison: a dense HF GPT-2 against our MoE GPT-2, checked against direct computations."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(min(2, torch.get_num_threads()))

from PIL import Image  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

from flash_experts.errors import UserError  # noqa: E402
from flash_experts.evaluation.compare import (  # noqa: E402
    ModelEntry,
    compare_models,
    count_parameters,
    report_markdown,
)
from flash_experts.generation.sampling import SamplingConfig  # noqa: E402
from flash_experts.model.config import GPT2MoEConfig  # noqa: E402
from flash_experts.model.gpt2_moe import GPT2MoEForCausalLM  # noqa: E402

N_POSITIONS = 64
EVAL_TEXT = "the cat sat on the mat. the dog sat on the log.\n"  # shorter than the context: one window

@pytest.fixture(scope="module")
def char_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def entries(char_tokenizer) -> list[ModelEntry]:
    torch.manual_seed(0)
    vocab = len(char_tokenizer)
    dense = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab, n_positions=N_POSITIONS,
                                       eos_token_id=0, bos_token_id=0)).eval()
    moe = GPT2MoEForCausalLM(GPT2MoEConfig(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab, n_positions=N_POSITIONS,
                                           eos_token_id=0, bos_token_id=0, num_experts=4, top_k=2,
                                           moe_layers="all")).eval()
    with torch.no_grad():  # our own init of the MoE weights, so this test does not depend on the model's
        for name, parameter in moe.named_parameters():
            if ".mlp." in name:
                parameter.normal_(0.0, 0.02)
    return [ModelEntry("dense-gpt2", dense, char_tokenizer), ModelEntry("moe-gpt2", moe, char_tokenizer)]


def test_active_parameters_match_hand_formula(entries):
    """Reference: expert parameter count from the config's shapes; dense active == sum(p.numel())."""
    dense, moe = entries[0].model, entries[1].model
    dense_count = count_parameters(dense)
    assert dense_count.total == dense_count.active == sum(p.numel() for p in dense.parameters())
    # Tied embeddings count once: the state dict lists lm_head.weight and transformer.wte.weight separately.
    assert dense_count.total < sum(t.numel() for t in dense.state_dict().values())

    d, f, E, k = 32, 4 * 32, 4, 2
    per_layer = E * (d * f + f + f * d + d)  # w_up, b_up, w_down, b_down
    moe_count = count_parameters(moe)
    assert moe_count.total == sum(p.numel() for p in moe.parameters())
    assert moe_count.expert == 2 * per_layer
    assert moe_count.active == moe_count.total - 2 * per_layer + 2 * per_layer * k // E


def test_comparison_report_files_match_direct_computation(entries, tmp_path):
    """Reference: exp(HF labels= loss) / exp(our lm_loss) on the one window, sum(p.numel()) for sizes."""
    prompts, seeds = ["the cat", "a dog"], [0, 1]
    result = compare_models(
        entries, prompts=prompts, seeds=seeds, sampling=SamplingConfig(temperature=0.8, top_k=20),
        max_new_tokens=6, eval_text=EVAL_TEXT, eval_source="a test sentence", speed_batch_size=2,
        speed_seq_len=16, speed_iterations=1, out_dir=tmp_path, quiet=True,
    )

    ids = entries[0].tokenizer(EVAL_TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = [
            math.exp(entries[0].model(ids, labels=ids).loss.item()),
            math.exp(entries[1].model(ids, labels=ids).lm_loss.item()),
        ]
    report_md = (tmp_path / "report.md").read_text()
    for entry, model_report, ppl in zip(entries, result.models, expected):
        assert model_report.perplexity.perplexity == pytest.approx(ppl, rel=1e-4)
        assert model_report.perplexity.tokens_scored == ids.numel() - 1
        assert entry.name in report_md
        assert f"{sum(p.numel() for p in entry.model.parameters()):,}" in report_md
        assert f"{model_report.perplexity.perplexity:.3f}" in report_md
        assert model_report.forward_tokens_per_second > 0 and model_report.generation_tokens_per_second > 0
        assert [(g.prompt, g.seed) for g in model_report.generations] == [(p, s) for s in seeds for p in prompts]
        assert all(0 < g.new_tokens <= 6 for g in model_report.generations)
    assert result.models[0].routing.is_empty and not result.models[1].routing.is_empty
    assert "## Routing: moe-gpt2" in report_md and "## Routing: dense-gpt2" not in report_md
    assert all(f"{p!r} (seed {s})" in report_md for p in prompts for s in seeds)

    for name in ("perplexity.png", "throughput.png", "parameters.png"):
        path = tmp_path / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.size[0] > 100 and image.size[1] > 100
        assert f"]({name})" in report_md
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"][1]["parameters"]["total"] == sum(p.numel() for p in entries[1].model.parameters())


def test_same_seed_generations_match_direct_generate(entries):
    """Reference: flash_experts.generation.generate called directly with the same prompt, config and seed."""
    from flash_experts.generation.generate import generate

    sampling = SamplingConfig(temperature=1.0, top_k=10)
    result = compare_models(entries, prompts=["the"], seeds=[3], sampling=sampling, max_new_tokens=5,
                            speed_batch_size=1, speed_seq_len=8, speed_iterations=1, quiet=True)
    for entry, model_report in zip(entries, result.models):
        direct = generate(entry.model, entry.tokenizer, ["the"], sampling, 5, seed=3)
        assert model_report.generations[0].text == direct.texts[0]
        assert model_report.perplexity is None
    assert any("perplexity was not measured" in note for note in result.notes)


def test_bad_comparisons_raise_user_error(entries):
    """Reference: the documented preconditions (2+ distinct models, a context within every model)."""
    with pytest.raises(UserError, match="at least 2"):
        compare_models(entries[:1], quiet=True)
    with pytest.raises(UserError, match="names must differ"):
        compare_models([entries[0], entries[0]], quiet=True)
    with pytest.raises(UserError, match="exceeds"):
        compare_models(entries, eval_text=EVAL_TEXT, context=N_POSITIONS + 1, quiet=True)


def test_routing_counts_each_token_once_with_overlapping_windows(entries):
    """Plain arithmetic reference: with stride < context every evaluation token is still routed once, so each
    layer saw len(tokens) tokens and len(tokens) * top_k assignments (not the overlapping windows' total)."""
    ids = entries[0].tokenizer(EVAL_TEXT, add_special_tokens=False)["input_ids"]
    result = compare_models(entries, eval_text=EVAL_TEXT, context=16, stride=4, speed_batch_size=1, speed_seq_len=8,
                            speed_iterations=1, quiet=True)
    moe_report = result.models[1]
    assert moe_report.perplexity.windows > len(ids) // 16 + 1  # the perplexity windows do overlap
    assert [layer.tokens for layer in moe_report.routing.layers] == [len(ids)] * 2
    assert [sum(layer.tokens_per_expert) for layer in moe_report.routing.layers] == [2 * len(ids)] * 2
    assert "routed once" in report_markdown(result)


@pytest.mark.parametrize("argument", ["speed_seq_len", "speed_batch_size", "speed_iterations", "eval_batch_size",
                                      "max_eval_tokens"])
def test_absurd_sizes_raise_user_error_naming_them(entries, argument):
    """Hand-listed absurd values (0 or negative sizes): a UserError naming the argument, before any work."""
    with pytest.raises(UserError, match=argument):
        value = -5 if argument == "max_eval_tokens" else 0
        compare_models(entries, eval_text=EVAL_TEXT, quiet=True, **{argument: value})
