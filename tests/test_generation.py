"""The decode loop against references: recompute-everything greedy, HF `generate`, one-by-one prompts."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from flash_experts.errors import UserError
from flash_experts.generation.generate import generate
from flash_experts.generation.sampling import SamplingConfig
from tiny_tokenizer import make_tokenizer  # noqa: E402

GREEDY = SamplingConfig(temperature=0)
PROMPTS = ["Sword of", "Jace, the Mind Sculptor", "the"]

def make_hf_model(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    # A wide init (0.3, not GPT-2's 0.02) so greedy output varies instead of repeating one token.
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab_size, n_positions=64,
                        initializer_range=0.3, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_hf_model(len(tokenizer))


def greedy_without_cache(model, prompt_ids: list[int], steps: int, eos: int | None = None) -> list[int]:
    """The reference: recompute the whole sequence every step and take the argmax."""
    ids = list(prompt_ids)
    new = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([ids])).logits[0, -1]
            token = int(logits.argmax())
            new.append(token)
            ids.append(token)
            if token == eos:
                break
    return new


def first_new_token(sequence: list[int], min_index: int = 2) -> tuple[int, int]:
    """(token, index): the first token of `sequence` that does not occur before `min_index`."""
    for index, token in enumerate(sequence):
        if index >= min_index and token not in sequence[:index]:
            return token, index
    raise AssertionError(f"greedy output too repetitive for the test: {sequence}")


def test_greedy_kv_cache_equals_recompute_without_cache(model, tokenizer):
    """Reference: greedy decoding that recomputes the full sequence each step (no cache)."""
    for prompt in PROMPTS:
        result = generate(model, tokenizer, [prompt], GREEDY, max_new_tokens=12, eos_token_id=[])
        assert result.token_ids[0] == greedy_without_cache(model, tokenizer.encode(prompt), 12)
        assert result.finish_reasons == ["length"]


def test_greedy_equals_hf_generate(model, tokenizer):
    """Reference: HF `model.generate(do_sample=False)` on the same weights, EOS included."""
    eos, index = first_new_token(greedy_without_cache(model, tokenizer.encode(PROMPTS[0]), 10))
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=10,
                                  eos_token_id=eos, pad_token_id=eos)[0, ids.shape[1]:].tolist()
        if eos in expected:  # HF pads after EOS; we report the tokens up to and including EOS
            expected = expected[: expected.index(eos) + 1]
        result = generate(model, tokenizer, [prompt], GREEDY, max_new_tokens=10, eos_token_id=eos)
        assert result.token_ids[0] == expected
    assert result.finish_reasons  # the loop ran
    first = generate(model, tokenizer, [PROMPTS[0]], GREEDY, max_new_tokens=10, eos_token_id=eos)
    assert first.finish_reasons == ["eos"] and first.num_new_tokens == [index + 1]
    assert first.texts[0] == tokenizer.decode(first.token_ids[0][:-1])  # EOS is not part of the text


def test_batched_left_padding_equals_one_by_one(model, tokenizer):
    """Reference: each prompt generated alone (greedy), against one left-padded batch."""
    alone = [generate(model, tokenizer, [p], GREEDY, max_new_tokens=10, eos_token_id=[]).token_ids[0] for p in PROMPTS]
    batched = generate(model, tokenizer, PROMPTS, GREEDY, max_new_tokens=10, eos_token_id=[])
    assert batched.token_ids == alone
    assert batched.prompt_lengths == [len(tokenizer.encode(p)) for p in PROMPTS]


def test_batched_rows_finish_independently_one_by_one_reference(model, tokenizer):
    """Reference: one-by-one generation; a row that hits EOS stops while the others go on."""
    eos, index = first_new_token(greedy_without_cache(model, tokenizer.encode(PROMPTS[1]), 8))
    alone = [generate(model, tokenizer, [p], GREEDY, max_new_tokens=8, eos_token_id=eos) for p in PROMPTS]
    batched = generate(model, tokenizer, PROMPTS, GREEDY, max_new_tokens=8, eos_token_id=eos)
    assert batched.token_ids == [r.token_ids[0] for r in alone]
    assert batched.finish_reasons == [r.finish_reasons[0] for r in alone]
    assert batched.finish_reasons[1] == "eos" and batched.num_new_tokens[1] == index + 1


def test_top_k_1_sampling_equals_greedy(model, tokenizer):
    """Reference: greedy decoding; top-k=1 sampling at any temperature can only pick the argmax."""
    greedy = generate(model, tokenizer, PROMPTS, GREEDY, max_new_tokens=10, eos_token_id=[])
    sampled = generate(model, tokenizer, PROMPTS, SamplingConfig(temperature=1.7, top_k=1), max_new_tokens=10,
                       seed=3, eos_token_id=[])
    assert sampled.token_ids == greedy.token_ids


def test_first_token_frequencies_follow_tempered_softmax(model, tokenizer):
    """Reference: softmax(logits / T) from one plain forward pass vs 4000 sampled first tokens."""
    prompt = tokenizer.encode(PROMPTS[0])
    with torch.no_grad():
        probs = (model(torch.tensor([prompt])).logits[0, -1] / 0.5).softmax(-1)
    result = generate(model, tokenizer, torch.tensor([prompt] * 4000), SamplingConfig(temperature=0.5),
                      max_new_tokens=1, seed=0, eos_token_id=[])
    counts = torch.bincount(torch.tensor([ids[0] for ids in result.token_ids]), minlength=probs.shape[0])
    top = probs.topk(5).indices
    torch.testing.assert_close(counts[top].float() / 4000, probs[top], atol=0.03, rtol=0)


def test_seed_reproducible_and_rows_differ(model, tokenizer):
    """Plain reference: the same seed repeats exactly; another seed (or another row) differs."""
    config = SamplingConfig(temperature=1.0, top_p=0.95)
    a = generate(model, tokenizer, [PROMPTS[0]] * 4, config, max_new_tokens=12, seed=7)
    b = generate(model, tokenizer, [PROMPTS[0]] * 4, config, max_new_tokens=12, seed=7)
    c = generate(model, tokenizer, [PROMPTS[0]] * 4, config, max_new_tokens=12, seed=8)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    assert len({tuple(ids) for ids in a.token_ids}) > 1


def test_stop_string_cuts_text_and_finishes_row(model, tokenizer):
    """Reference: the unstopped greedy text; with a stop string from its middle, the text is cut there."""
    full = generate(model, tokenizer, PROMPTS, GREEDY, max_new_tokens=12, eos_token_id=[])
    text = full.texts[0]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    pieces: list[list[str]] = []
    stopped = generate(model, tokenizer, PROMPTS, GREEDY, max_new_tokens=12, eos_token_id=[], stop_strings=[stop],
                       stream=pieces.append)
    assert stopped.texts[0] == text[: text.index(stop)]
    assert stopped.finish_reasons[0] == "stop"
    assert stopped.token_ids[0] == full.token_ids[0][: stopped.num_new_tokens[0]]
    for row in range(len(PROMPTS)):  # streamed pieces add up to the final text, stop string held back
        assert "".join(step[row] for step in pieces) == stopped.texts[row]
        expected = full.texts[row]
        if stop in expected:
            expected = expected[: expected.index(stop)]
        assert stopped.texts[row] == expected


def test_streaming_pieces_concatenate_to_texts(model, tokenizer):
    """Reference: the final decoded texts; streamed pieces per row add up to them."""
    pieces: list[list[str]] = []
    result = generate(model, tokenizer, PROMPTS, SamplingConfig(temperature=1.0), max_new_tokens=10, seed=1,
                      stream=pieces.append)
    for row in range(len(PROMPTS)):
        assert "".join(step[row] for step in pieces) == result.texts[row]


def test_min_new_tokens_and_filters_inside_the_loop(model, tokenizer):
    """Plain reference: the greedy first token made EOS; min_new_tokens forbids it, a ban removes a token."""
    first = greedy_without_cache(model, tokenizer.encode(PROMPTS[0]), 1)[0]
    ended = generate(model, tokenizer, [PROMPTS[0]], GREEDY, max_new_tokens=5, eos_token_id=first)
    assert ended.num_new_tokens == [1] and ended.finish_reasons == ["eos"]
    forced = generate(model, tokenizer, [PROMPTS[0]], SamplingConfig(temperature=0, min_new_tokens=3),
                      max_new_tokens=5, eos_token_id=first)
    assert first not in forced.token_ids[0][:3] and forced.num_new_tokens[0] >= 3
    banned = generate(model, tokenizer, [PROMPTS[0]] * 8, SamplingConfig(temperature=1.0, banned_token_ids=[first]),
                      max_new_tokens=10, seed=0, eos_token_id=[])
    assert all(first not in ids for ids in banned.token_ids)


def test_banned_word_never_generated(model, tokenizer):
    """Plain reference: a word the model produces greedily is absent once banned."""
    greedy = generate(model, tokenizer, [PROMPTS[2]], GREEDY, max_new_tokens=12, eos_token_id=[])
    word = tokenizer.decode(greedy.token_ids[0][:1]).strip() or "the"
    ban = SamplingConfig(temperature=0, banned_words=[word])
    result = generate(model, tokenizer, [PROMPTS[2]], ban, max_new_tokens=12, eos_token_id=[])
    sequences = [tokenizer.encode(v) for v in (word, " " + word)]
    ids = result.token_ids[0]
    for seq in sequences:
        assert not any(ids[i:i + len(seq)] == seq for i in range(len(ids)))


def test_empty_prompt_starts_from_eos_reference(model, tokenizer):
    """Reference: an empty prompt is the same as the prompt [EOS] (GPT-2's unconditional start)."""
    a = generate(model, tokenizer, [""], GREEDY, max_new_tokens=6, eos_token_id=[])
    b = generate(model, tokenizer, torch.tensor([[tokenizer.eos_token_id]]), GREEDY, max_new_tokens=6, eos_token_id=[])
    assert a.token_ids == b.token_ids


def test_absurd_arguments_are_one_line_errors(model, tokenizer):
    """Hand-listed misuse: positions beyond the model, zero tokens, empty prompt lists."""
    with pytest.raises(UserError, match="exceeds the model's 64 positions"):
        generate(model, tokenizer, ["the"], GREEDY, max_new_tokens=64)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, tokenizer, ["the"], GREEDY, max_new_tokens=0)
    with pytest.raises(ValueError, match="no prompts"):
        generate(model, tokenizer, [], GREEDY)


def test_our_gpt2_moe_greedy_matches_hf_dense_reference(model, tokenizer):
    """Reference: HF GPT-2 greedy; our upcycled MoE (static cache) decodes the same tokens, batched."""
    pytest.importorskip("flash_experts.model.upcycle")
    from flash_experts.model import upcycle_gpt2

    ours = upcycle_gpt2(model, num_experts=4, top_k=2).eval()
    assert hasattr(ours, "make_cache")
    expected = generate(model, tokenizer, PROMPTS, GREEDY, max_new_tokens=10, eos_token_id=[])
    got = generate(ours, tokenizer, PROMPTS, GREEDY, max_new_tokens=10, eos_token_id=[])
    assert got.token_ids == expected.token_ids
    assert got.token_ids[0] == greedy_without_cache(ours, tokenizer.encode(PROMPTS[0]), 10)


def test_moe_with_distinct_experts_static_cache_equals_recompute_one_by_one(model, tokenizer):
    """Reference: full-recompute greedy (no cache) of each prompt alone, on an MoE whose experts differ.

    Expert noise makes routing change the logits, so the static cache, left padding and routing of
    padded rows are all exercised (an exact upcycle would hide routing mistakes)."""
    from flash_experts.model import upcycle_gpt2

    ours = upcycle_gpt2(model, num_experts=4, top_k=2, moe_layers="all", expert_noise=0.5, seed=0).eval()
    ids = torch.tensor([tokenizer.encode(PROMPTS[1])])
    with torch.no_grad():
        assert not torch.allclose(ours(ids).logits, model(ids).logits, atol=1e-3)  # routing matters
    batched = generate(ours, tokenizer, PROMPTS, GREEDY, max_new_tokens=10, eos_token_id=[])
    for prompt, got in zip(PROMPTS, batched.token_ids, strict=True):
        assert got == greedy_without_cache(ours, tokenizer.encode(prompt), 10)


def test_llama_moe_static_cache_greedy_equals_recompute_without_cache():
    """Reference: full-recompute greedy (no cache) on a tiny random Llama-family MoE, batched with padding."""
    from flash_experts.model import LlamaMoEConfig
    from flash_experts.model.llama_moe import LlamaMoEForCausalLM

    torch.manual_seed(0)
    config = LlamaMoEConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            num_experts=4, num_experts_per_tok=2, moe_layers="all", bos_token_id=0, eos_token_id=1)
    llama = LlamaMoEForCausalLM(config).eval()
    with torch.no_grad():  # larger-than-init weights so greedy output varies with the context
        for parameter in llama.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.3)
    prompts = [[5, 17, 33, 2, 9], [40], [7, 7, 60]]
    padded = torch.zeros(3, 5, dtype=torch.long)
    mask = torch.zeros(3, 5, dtype=torch.long)
    for i, row in enumerate(prompts):
        padded[i, 5 - len(row):], mask[i, 5 - len(row):] = torch.tensor(row), 1
    result = generate(llama, None, padded, GREEDY, max_new_tokens=8, attention_mask=mask, eos_token_id=[])
    assert result.token_ids == [greedy_without_cache(llama, row, 8) for row in prompts]
    assert result.prompt_lengths == [5, 1, 3]


def test_out_of_vocabulary_token_ids_are_one_line_errors(model, tokenizer):
    """Hand-made: the model has len(tokenizer) logits; ids at or beyond that are rejected, huge ones too."""
    vocab = model.config.vocab_size
    for config in (SamplingConfig(banned_token_ids=[vocab]), SamplingConfig(allowed_token_ids=[1, 10**11])):
        with pytest.raises(UserError, match=f"outside the model's vocabulary of {vocab}"):
            generate(model, tokenizer, ["the"], config, max_new_tokens=2)
    last = generate(model, tokenizer, ["the"] * 4, SamplingConfig(banned_token_ids=[vocab - 1]), max_new_tokens=8,
                    seed=0, eos_token_id=[])
    assert all(vocab - 1 not in ids for ids in last.token_ids)


def test_card_name_allow_list_every_token_matches_plain_regex(model, tokenizer):
    """Reference: re.fullmatch of each emitted token's own text against CARD_NAME_REGEX (EOS and the "\\n" stop
    token excepted), over 16 hot samples that would otherwise wander over the whole vocabulary."""
    import re

    from flash_experts.mtg.names import CARD_NAME_REGEX

    config = SamplingConfig(temperature=2.0, allowed_regex=CARD_NAME_REGEX)
    result = generate(model, tokenizer, ["the"] * 16, config, max_new_tokens=12, seed=0, stop_strings=["\n"])
    emitted = [t for ids in result.token_ids for t in ids]
    assert len(emitted) > 16
    for token in emitted:
        text = tokenizer.decode([token])
        assert token == tokenizer.eos_token_id or text == "\n" or re.fullmatch(CARD_NAME_REGEX, text), repr(text)
    free = generate(model, tokenizer, ["the"] * 16, SamplingConfig(temperature=2.0), max_new_tokens=12, seed=0)
    assert any(not re.fullmatch(CARD_NAME_REGEX, tokenizer.decode([t]))  # without the filter some would not
               for ids in free.token_ids for t in ids if t != tokenizer.eos_token_id)


def test_card_name_sampling_starts_every_sample_with_a_capital(model, tokenizer):
    """Reference: re.fullmatch of each sample's first token against CARD_NAME_FIRST_TOKEN_REGEX, and no empty
    sample (the first token can be neither EOS nor the stop token), over 16 hot samples from the start token."""
    import re

    from flash_experts.mtg.names import CARD_NAME_FIRST_TOKEN_REGEX, name_sampling_config

    result = generate(model, tokenizer, [""] * 16, name_sampling_config(temperature=2.0), max_new_tokens=6, seed=0,
                      stop_strings=["\n"])
    for ids in result.token_ids:
        assert ids and re.fullmatch(CARD_NAME_FIRST_TOKEN_REGEX, tokenizer.decode([ids[0]])), ids


def test_hf_llama_left_padded_batch_equals_hf_generate_per_row():
    """Reference: HF `LlamaForCausalLM.generate(do_sample=False)` on each prompt alone (RoPE, GQA and the
    HF DynamicCache path of our loop, with left padding)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         bos_token_id=0, eos_token_id=1, initializer_range=0.3)).eval()
    prompts = [[5, 17, 33, 2, 9], [40], [7, 7, 60]]
    padded = torch.zeros(3, 5, dtype=torch.long)
    mask = torch.zeros(3, 5, dtype=torch.long)
    for i, row in enumerate(prompts):
        padded[i, 5 - len(row):], mask[i, 5 - len(row):] = torch.tensor(row), 1
    result = generate(llama, None, padded, GREEDY, max_new_tokens=8, attention_mask=mask, eos_token_id=[])
    for row, got in zip(prompts, result.token_ids, strict=True):
        ids = torch.tensor([row])
        expected = llama.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                  eos_token_id=None, pad_token_id=0)[0, len(row):].tolist()
        assert got == expected
