"""Logits processors against Hugging Face's processors, hand-made distributions and plain loops."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from flash_experts.generation import sampling
from flash_experts.generation.sampling import SamplingConfig, apply_processors, build_processors, choose_next_tokens

VOCAB = 50


def _random_logits(seed: int, batch: int = 4, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def _random_ids(seed: int, batch: int = 4, length: int = 12, vocab: int = 8) -> torch.Tensor:
    """Ids from a small range so that repeats and repeated n-grams are common."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _run(processor, logits, ids, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    return processor(logits.clone(), ids, mask)


def _kept(logits: torch.Tensor) -> list[list[int]]:
    return [torch.nonzero(torch.isfinite(row)).flatten().tolist() for row in logits]


# ----------------------------------------------------------------------------- hand-made distributions


@pytest.mark.parametrize("p, expected",
                         [(0.8, [0, 1]), (0.81, [0, 1, 2]), (0.5, [0]), (0.3, [0]), (0.96, [0, 1, 2, 3])])
def test_top_p_keeps_exact_nucleus_hand_computed(p, expected):
    """Hand-computed: probs [0.5, 0.3, 0.15, 0.05]; the smallest set reaching p (at least one token)."""
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # shuffled, so sorting is exercised
    order = [1, 3, 0, 2]  # token ids by decreasing probability
    out = _run(sampling.top_p(p), probs.log(), torch.zeros(1, 1, dtype=torch.long))
    assert sorted(_kept(out)[0]) == sorted(order[: len(expected)])
    kept_probs = out.softmax(-1)[0, order[: len(expected)]]  # the kept tokens are renormalised
    torch.testing.assert_close(kept_probs, probs[0, order[: len(expected)]] / probs[0, order[: len(expected)]].sum())


def test_top_k_min_p_hand_computed():
    """Hand-computed: top-2 keeps the two largest; min-p 0.5 keeps probs >= 0.25 when the top is 0.5."""
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    ids = torch.zeros(1, 1, dtype=torch.long)
    assert _kept(_run(sampling.top_k(2), probs.log(), ids)) == [[1, 3]]
    assert _kept(_run(sampling.min_p(0.5), probs.log(), ids)) == [[1, 3]]
    assert _kept(_run(sampling.min_p(0.29), probs.log(), ids)) == [[0, 1, 3]]


def test_repetition_penalty_hand_computed():
    """Hand-computed CTRL rule: seen positive logits divided, seen negative multiplied, unseen kept."""
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    out = _run(sampling.repetition_penalty(2.0), logits, torch.tensor([[0, 1, 1]]))
    torch.testing.assert_close(out, torch.tensor([[1.0, -4.0, 2.0, -2.0]]))


# ----------------------------------------------------------------------------- Hugging Face references


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_matches_hf_TopPLogitsWarper(p):
    """HF TopPLogitsWarper on random logits keeps the same tokens."""
    logits, ids = _random_logits(1), _random_ids(1)
    ours = _run(sampling.top_p(p), logits, ids)
    theirs = TopPLogitsWarper(p)(ids, logits.clone())
    assert _kept(ours) == _kept(theirs)


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_matches_hf_MinPLogitsWarper(min_p):
    """HF MinPLogitsWarper on random logits keeps the same tokens."""
    logits, ids = _random_logits(2), _random_ids(2)
    assert _kept(_run(sampling.min_p(min_p), logits, ids)) == _kept(MinPLogitsWarper(min_p)(ids, logits.clone()))


@pytest.mark.parametrize("k", [1, 5, VOCAB + 10])
def test_top_k_matches_hf_TopKLogitsWarper(k):
    """HF TopKLogitsWarper (k larger than the vocabulary keeps everything)."""
    logits, ids = _random_logits(3), _random_ids(3)
    assert _kept(_run(sampling.top_k(k), logits, ids)) == _kept(TopKLogitsWarper(k)(ids, logits.clone()))


@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_hf_RepetitionPenaltyLogitsProcessor(penalty):
    """HF RepetitionPenaltyLogitsProcessor on random logits (positive and negative) and repeated ids."""
    logits, ids = _random_logits(4), _random_ids(4)
    ours = _run(sampling.repetition_penalty(penalty), logits, ids)
    torch.testing.assert_close(ours, RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone()))


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_hf_NoRepeatNGramLogitsProcessor(n):
    """HF NoRepeatNGramLogitsProcessor bans the same tokens, at every sequence length."""
    ids = _random_ids(5, length=16, vocab=4)
    for length in range(1, ids.shape[1] + 1):
        logits = _random_logits(length)
        ours = _run(sampling.no_repeat_ngram(n), logits, ids[:, :length])
        theirs = NoRepeatNGramLogitsProcessor(n)(ids[:, :length], logits.clone())
        assert _kept(ours) == _kept(theirs), f"length {length}"


def test_ban_sequences_matches_hf_NoBadWordsLogitsProcessor():
    """HF NoBadWordsLogitsProcessor: single tokens always banned, multi-token ones when the prefix matches."""
    bad = [[7], [1, 2], [3, 1, 2], [2, 2, 5], [0, 4]]
    ids = _random_ids(6, batch=6, length=10, vocab=8)
    ids[0, -1], ids[1, -2:], ids[2, -2:] = 1, torch.tensor([3, 1]), torch.tensor([2, 2])  # make prefixes match
    for length in range(1, ids.shape[1] + 1):
        logits = _random_logits(10 + length, batch=6)
        ours = _run(sampling.ban_sequences(bad), logits, ids[:, :length])
        theirs = NoBadWordsLogitsProcessor(bad, eos_token_id=49)(ids[:, :length], logits.clone())
        assert _kept(ours) == _kept(theirs), f"length {length}"


def test_min_new_tokens_matches_hf_MinNewTokensLengthLogitsProcessor():
    """HF MinNewTokensLengthLogitsProcessor: EOS suppressed until min_new_tokens were generated."""
    prompt_length, eos = 5, 3
    ids = _random_ids(7, length=12)
    for length in range(prompt_length, ids.shape[1] + 1):
        logits = _random_logits(length)
        ours = _run(sampling.min_new_tokens(4, prompt_length, [eos]), logits, ids[:, :length])
        theirs = MinNewTokensLengthLogitsProcessor(prompt_length, 4, eos)(ids[:, :length], logits.clone())
        assert _kept(ours) == _kept(theirs)


def test_warper_chain_matches_hf_chain():
    """HF temperature -> top-k -> top-p -> min-p, in that order, gives identical processed logits."""
    config = SamplingConfig(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05)
    logits, ids = _random_logits(8), _random_ids(8)
    ours = apply_processors(build_processors(config), logits.clone(), ids, torch.ones_like(ids))
    theirs = logits.clone()
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)):
        theirs = warper(ids, theirs)
    torch.testing.assert_close(ours, theirs)


def test_padding_is_never_seen_unpadded_reference():
    """Plain reference: a left-padded row is processed exactly like the same row without padding."""
    ids = torch.tensor([[4, 1, 2, 1, 2]])
    padded = torch.tensor([[0, 0, 0, 4, 1, 2, 1, 2]])  # pad id 0 must not count as "seen"
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    logits = _random_logits(9, batch=1)
    for processor in (sampling.repetition_penalty(1.5), sampling.no_repeat_ngram(2), sampling.no_repeat_ngram(1),
                      sampling.ban_sequences([[0, 1], [2, 3], [0, 0, 4]])):
        torch.testing.assert_close(_run(processor, logits, padded, mask), _run(processor, logits, ids))


# ----------------------------------------------------------------------------- filters and selection


def test_banned_and_allowed_tokens_never_emitted_even_when_most_likely():
    """Plain count over many sampled steps: a banned top token and non-allowed tokens never appear."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(256, VOCAB, generator=generator)
    logits[:, 13] = 20.0  # the banned token is by far the most likely
    ids = torch.zeros(256, 1, dtype=torch.long)
    config = SamplingConfig(temperature=1.5, banned_token_ids=[13])
    processors = build_processors(config, end_token_ids=[0])
    seen = set()
    for _ in range(20):
        out = apply_processors(processors, logits.clone(), ids, torch.ones_like(ids))
        seen |= set(choose_next_tokens(out, config, generator).tolist())
    assert 13 not in seen and len(seen) > 10

    allowed = [2, 5, 8]
    config = SamplingConfig(temperature=2.0, allowed_token_ids=allowed)
    processors = build_processors(config, end_token_ids=[0])
    out = apply_processors(processors, logits.clone(), ids, torch.ones_like(ids))
    samples = set(choose_next_tokens(out, config, generator).tolist())
    assert samples <= {0, 2, 5, 8} and 0 in _kept(out)[0]  # EOS stays allowed


def test_greedy_picks_argmax_of_penalised_logits_plain_reference():
    """Plain reference: temperature 0 is the argmax after the penalty, and ignores the warpers."""
    logits = torch.tensor([[3.0, 2.9, -1.0]])
    ids = torch.tensor([[0]])
    config = SamplingConfig(temperature=0, repetition_penalty=2.0, top_k=1)
    out = apply_processors(build_processors(config), logits.clone(), ids, torch.ones_like(ids))
    assert choose_next_tokens(out, config).tolist() == [1]  # 3.0 / 2 = 1.5 < 2.9


class _CharTokenizer:
    """A hand-made vocabulary: decoding token i gives VOCAB_TEXT[i]."""

    VOCAB_TEXT = ["<eos>", "Elf", " of", "'s", "-", ",", "1", "!", " the", "é", "\n", "a b", ""]
    all_special_ids = [0]

    def __len__(self):
        return len(self.VOCAB_TEXT)

    def batch_decode(self, ids, **kwargs):
        return ["".join(self.VOCAB_TEXT[i] for i in row) for row in ids]


def test_regex_allow_list_hand_checked():
    """Hand-checked: which of a known vocabulary's tokens are card-name characters."""
    mask = sampling.tokens_matching_regex(_CharTokenizer(), r"[A-Za-z ',\-]+")
    assert torch.nonzero(mask).flatten().tolist() == [1, 2, 3, 4, 5, 8, 11]
    processors = build_processors(SamplingConfig(allowed_regex=r"[A-Za-z ',\-]+"), tokenizer=_CharTokenizer(),
                                  end_token_ids=[0, 10])
    out = apply_processors(processors, torch.zeros(1, 13), torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1))
    assert _kept(out) == [[0, 1, 2, 3, 4, 5, 8, 10, 11]]  # plus EOS (0) and the stop token "\n" (10)


def test_first_token_regex_filters_only_the_first_generated_token_hand_checked():
    """Hand-checked on the known vocabulary: at the first generated position only the tokens starting with a
    capital ("Elf") are kept, never EOS or the stop token; from the second position on the filter is gone (the
    allow-list, when given, still applies)."""
    first = r" ?[A-Z][A-Za-z',\-]*"
    processors = build_processors(SamplingConfig(first_token_regex=first), tokenizer=_CharTokenizer(),
                                  prompt_length=2, end_token_ids=[0, 10])
    prompt = torch.ones(1, 2, dtype=torch.long)
    assert _kept(apply_processors(processors, torch.zeros(1, 13), prompt, torch.ones(1, 2))) == [[1]]
    later = torch.ones(1, 3, dtype=torch.long)
    assert _kept(apply_processors(processors, torch.zeros(1, 13), later, torch.ones(1, 3))) == [list(range(13))]
    both = build_processors(SamplingConfig(allowed_regex=r"[A-Za-z ',\-]+", first_token_regex=first),
                            tokenizer=_CharTokenizer(), prompt_length=2, end_token_ids=[0, 10])
    assert _kept(apply_processors(both, torch.zeros(1, 13), prompt, torch.ones(1, 2))) == [[1]]
    assert _kept(apply_processors(both, torch.zeros(1, 13), later, torch.ones(1, 3))) == [[0, 1, 2, 3, 4, 5, 8, 10, 11]]


def test_min_letters_bans_the_end_until_the_generated_text_holds_that_many_letters():
    """Reference: the generated text of each row decoded and its letters counted by hand (the prompt's letters
    do not count, "é" is a letter, digits and punctuation are not); a row may end (EOS 0, stop token 10) only
    once it holds 3 letters. Other tokens are never touched."""
    tokenizer = _CharTokenizer()
    processors = build_processors(SamplingConfig(min_letters=3), tokenizer=tokenizer, prompt_length=2,
                                  end_token_ids=[0, 10])
    rows = [[1, 1],  # nothing generated yet: 0 letters
            [1, 1, 4, 6],  # "-1": 0 letters
            [1, 1, 9, 11],  # "éa b": 3 letters
            [8, 8, 2, 5],  # " of,": 2 letters (the prompt's " the the" does not count)
            [1, 1, 1, 7]]  # "Elf!": 3 letters
    for row in rows:
        ids = torch.tensor([row], dtype=torch.long)
        letters = sum(ch.isalpha() for ch in tokenizer.batch_decode([row[2:]])[0])
        kept = _kept(apply_processors(processors, torch.zeros(1, 13), ids, torch.ones_like(ids)))[0]
        assert kept == (list(range(13)) if letters >= 3 else [i for i in range(13) if i not in (0, 10)]), row
    # the rows of one batch are judged one by one
    batch = torch.tensor([rows[1], rows[2], rows[3], rows[4]], dtype=torch.long)
    kept = _kept(apply_processors(processors, torch.zeros(4, 13), batch, torch.ones_like(batch)))
    assert [0 in k for k in kept] == [False, True, False, True]
    # ids past the tokenizer (a model's padded vocabulary) hold no letters, whatever the last token holds
    past = sampling.min_letters(3, torch.tensor([0, 3, 2]), prompt_length=0, end_token_ids=[0])
    assert _kept(past(torch.zeros(1, 8), torch.tensor([[5, 7]]), torch.ones(1, 2))) == [list(range(1, 8))]
    from flash_experts.errors import ConfigError

    with pytest.raises(ConfigError, match="min_letters must be an integer >= 0"):
        SamplingConfig(min_letters=-1)


def test_first_token_regex_that_nothing_passes_is_one_error():
    from flash_experts.errors import UserError

    # "Elf" starts names, but the allow-list keeps only "a b": no first token can pass both
    with pytest.raises(UserError, match="no token of the vocabulary matches first_token_regex .* and the allow-list"):
        build_processors(SamplingConfig(allowed_regex="[a-z ]+", first_token_regex="E[a-z]+"),
                         tokenizer=_CharTokenizer(), end_token_ids=[0])


@pytest.mark.parametrize(
    "field, value",
    [("temperature", -0.1), ("temperature", math.inf), ("top_k", -1), ("top_p", 0.0), ("top_p", 1.5),
     ("min_p", 1.0), ("min_p", -0.1), ("repetition_penalty", 0.0), ("no_repeat_ngram_size", -1),
     ("min_new_tokens", -2), ("banned_token_ids", [-1]), ("banned_words", [""]), ("allowed_token_ids", []),
     ("allowed_regex", "[unclosed"), ("first_token_regex", "(")],
)
def test_sampling_config_rejects_absurd_values_naming_the_field(field, value):
    """Hand-listed absurd values: each is a ValueError whose message starts with the field name."""
    with pytest.raises(ValueError, match=f"^{field}"):
        SamplingConfig(**{field: value})


def test_sampling_config_defaults_are_plain_sampling():
    """Plain reference: the default config adds no processor, so logits are the model's own."""
    assert build_processors(SamplingConfig()) == []
    assert SamplingConfig(temperature=0).greedy and not SamplingConfig().greedy


def test_ban_tokens_ignores_ids_beyond_the_vocabulary_hand_made():
    """Hand-made: banning [3, 10**12] on a 50-token vocabulary removes token 3 only (and allocates no
    10**12-entry mask); the same processor works for a second vocabulary size."""
    processor = sampling.ban_tokens([3, 10**12])
    ids = torch.zeros(1, 1, dtype=torch.long)
    assert _kept(_run(processor, torch.zeros(1, VOCAB), ids)) == [[i for i in range(VOCAB) if i != 3]]
    assert _kept(_run(processor, torch.zeros(2, 5), ids.expand(2, 1))) == [[0, 1, 2, 4]] * 2
    assert _kept(_run(sampling.ban_tokens([]), torch.zeros(1, 4), ids)) == [[0, 1, 2, 3]]
