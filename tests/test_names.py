"""Name metrics on hand-made lists with hand-counted validity, uniqueness and novelty."""

from __future__ import annotations

import pytest

from flash_experts.errors import UserError
from flash_experts.mtg.names import evaluate_names, novelty, read_reference_names, uniqueness

REAL = ["Llanowar Elves", "Sword of Fire and Ice", "Séance", "Jace, the Mind Sculptor"]


def test_evaluate_names_hand_counted():
    """Hand-counted: 8 samples, 6 valid, 4 distinct, 2 of them real -> 75%, 66.7%, 50%."""
    raw = [
        " llanowar elves",  # valid, real (case-insensitive)
        "Grove Warden<|endoftext|>",  # valid, new
        "Grove Warden",  # valid, duplicate
        "SEANCE",  # valid, real (accent-insensitive match with "Séance")
        "123 !!",  # invalid
        "Thornweald Archer",  # valid, new
        "",  # invalid
        "GROVE WARDEN",  # valid, duplicate
    ]
    metrics = evaluate_names(raw, REAL)
    assert (metrics.total, metrics.valid, metrics.distinct, metrics.novel) == (8, 6, 4, 2)
    assert metrics.validity == pytest.approx(6 / 8)
    assert metrics.uniqueness == pytest.approx(4 / 6)
    assert metrics.novelty == pytest.approx(2 / 4)
    marks = [(s.name, s.is_new) for s in metrics.unique_names()]
    assert marks == [("Llanowar Elves", False), ("Grove Warden", True), ("Seance", False), ("Thornweald Archer", True)]
    assert metrics.samples[4].name is None and metrics.samples[4].is_new is None
    assert "validity 75.0% (6/8)" in metrics.summary() and "novelty 50.0% (2/4)" in metrics.summary()


def test_metrics_without_reference_and_empty_hand_made():
    """Hand-made edge cases: no reference list means novelty unknown; no samples means zeros."""
    metrics = evaluate_names(["Grove Warden", "grove warden"])
    assert metrics.novelty is None and metrics.novel is None and metrics.uniqueness == 0.5
    assert metrics.unique_names()[0].is_new is None and "n/a" in metrics.summary()
    empty = evaluate_names([], REAL)
    assert (empty.validity, empty.uniqueness, empty.novelty) == (0.0, 0.0, 0.0)


def test_plain_uniqueness_and_novelty_hand_counted():
    """Hand-counted on clean names: 3 of 4 distinct; of those, 1 of 3 is new."""
    names = ["Llanowar Elves", "Séance", "seance", "Grove Warden"]
    assert uniqueness(names) == pytest.approx(3 / 4)
    assert novelty(names, REAL) == pytest.approx(1 / 3)


def test_read_reference_names_file_formats(tmp_path):
    """Hand-made files: plain names and conditioned lines; missing or empty files are UserErrors."""
    path = tmp_path / "names.txt"
    path.write_text("Llanowar Elves\n\nCreature — Elf Druid | G | Fyndhorn Elves\n", encoding="utf-8")
    assert read_reference_names(path) == ["Llanowar Elves", "Fyndhorn Elves"]
    with pytest.raises(UserError, match="not found"):
        read_reference_names(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UserError, match="no names"):
        read_reference_names(tmp_path / "empty.txt")


def test_select_name_sampling_applies_its_rule_to_the_pooled_selection_samples(monkeypatch):
    """The rule by hand: per setting, every seed's samples pooled; a setting's margin is how far it clears
    the nearest target (validity 95%, uniqueness 95%, novelty 90%); settings below a target are out; of the
    rest the widest margin wins, ties to the higher temperature. The sampler is replaced by hand-made samples
    per (temperature, seed), so the counts below are exact."""
    from types import SimpleNamespace

    import flash_experts.mtg.names as names

    new = [f"{a} {b}" for a in ("Goblin", "Ember", "Frost", "Mire", "Thorn")  # 40 distinct new names
           for b in ("Warden", "Oracle", "Herald", "Lancer", "Shaman", "Rider", "Sentry", "Whelp")]
    samples = {  # temperature -> per seed: 20 raw samples (40 pooled)
        0.5: lambda seed: ["Llanowar Elves"] * 4 + new[20 * seed: 20 * seed + 16],  # 100% valid, 89% novel: out
        0.6: lambda seed: new[20 * seed: 20 * seed + 20],  # all valid, distinct, new: margin 5% (validity, uniq.)
        0.7: lambda seed: new[20 * seed: 20 * seed + 19] + ["x1"],  # 95% valid: margin 0, in but narrowest
        0.8: lambda seed: new[20 * seed: 20 * seed + 20],  # the same as 0.6: the tie goes to 0.8
        0.9: lambda seed: new[:20],  # 100% valid but every name twice over the two seeds: 50% unique, out
        1.0: lambda seed: ["x1"] * 3 + new[20 * seed: 20 * seed + 17],  # 85% valid: out
    }
    calls = []

    def fake_generate(model, tokenizer, count, *, config, seed, max_rounds, batch_size):
        calls.append((config.temperature, config.top_p, seed, count))
        return names.evaluate_names(samples[config.temperature](seed))

    monkeypatch.setattr(names, "generate_card_names", fake_generate)
    chosen, trials = names.select_name_sampling(SimpleNamespace(), None, REAL, temperatures=samples, count=20,
                                                seeds=(0, 1))
    assert [(t.temperature, t.metrics.total) for t in trials] == [(t, 40) for t in samples]
    assert {t.temperature: t.qualifies for t in trials} == {0.5: False, 0.6: True, 0.7: True, 0.8: True, 0.9: False,
                                                            1.0: False}
    assert {t.temperature: round(t.margin, 4) for t in trials if t.qualifies} == {0.6: 0.05, 0.7: 0.0, 0.8: 0.05}
    assert chosen.temperature == 0.8
    assert {seed for *_, seed, _ in calls} == {0, 1} and len(calls) == 12
    none, _ = names.select_name_sampling(SimpleNamespace(), None, REAL, temperatures=(0.5, 0.9, 1.0), count=20,
                                         seeds=(0, 1))
    assert none is None


def _tiny_model_and_tokenizer():
    import torch

    from flash_experts.model import GPT2MoEConfig, GPT2MoEForCausalLM
    from tiny_tokenizer import make_tokenizer

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    model = GPT2MoEForCausalLM(GPT2MoEConfig(vocab_size=len(tokenizer), n_positions=32, n_embd=16, n_layer=1,
                                             n_head=2, num_experts=2, num_experts_per_tok=1,
                                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id))
    return model.eval(), tokenizer


def test_held_out_name_bits_are_scored_from_the_document_start():
    """Reference: a loop, one name at a time, in float64 from the model's own logits: -log2 p of each of the
    name's tokens and its EOS after "\\n", EOS, summed over the names, over their characters plus one each."""
    import math

    import torch

    from flash_experts.mtg.names import name_bits_per_character

    model, tokenizer = _tiny_model_and_tokenizer()
    names = ["Llanowar Elves", "Sword of Fire and Ice", "Elf", "Jace, the Mind Sculptor"]
    def reference(start: list[int]) -> float:
        bits = 0.0
        for name in names:
            ids = start + tokenizer.encode(name, add_special_tokens=False) + [tokenizer.eos_token_id]
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
            bits -= sum(logp[t - 1, ids[t]].item() for t in range(len(start), len(ids))) / math.log(2)
        return bits / sum(len(n) + 1 for n in names)

    document_start = tokenizer.encode("\n", add_special_tokens=False) + [tokenizer.eos_token_id]
    ours = name_bits_per_character(model, tokenizer, names)
    assert ours == pytest.approx(reference(document_start), rel=1e-9)
    # the reference can tell the start apart: from EOS alone the same names cost other bits
    assert ours != pytest.approx(reference([tokenizer.eos_token_id]), rel=1e-4)


def test_sampled_names_start_where_documents_start(monkeypatch):
    """Reference: the prompt the sampler is handed, recorded — "\\n", EOS (then the conditioned prefix), never
    the tokenizer's BOS alone."""
    import flash_experts.mtg.names as names_module

    model, tokenizer = _tiny_model_and_tokenizer()
    seen = []

    def recording_generate(model, tokenizer, prompts, *args, **kwargs):
        seen.append(prompts.tolist())
        return type("R", (), {"texts": ["Grove Warden"] * len(prompts)})()

    monkeypatch.setattr(names_module, "generate", recording_generate)
    start = tokenizer.encode("\n", add_special_tokens=False) + [tokenizer.eos_token_id]
    names_module.generate_card_names(model, tokenizer, 1, max_rounds=1, batch_size=2)
    assert seen[-1] == [start, start]
    names_module.generate_card_names(model, tokenizer, 1, type_line="Creature — Elf", colors="G", max_rounds=1,
                                     batch_size=1)
    assert seen[-1] == [start + tokenizer.encode("Creature — Elf | G |", add_special_tokens=False)]
