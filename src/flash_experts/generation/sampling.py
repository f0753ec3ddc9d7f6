"""Logits processors: small composable steps that turn next-token logits into a sampling distribution.

Every processor is a callable `processor(logits_BV, input_ids_BT, attention_mask_BT) -> logits_BV`:
`logits_BV` are fp32 next-token logits, `input_ids_BT` the prompt + generated-so-far ids (left-padded),
and `attention_mask_BT` marks the real tokens (1) against the padding (0), so padding never counts as
"already seen". Processors may modify `logits_BV` in place and return it. Removing a token means setting
its logit to -inf.

The order follows Hugging Face's: penalties and filters first (they change *which* tokens are possible),
then temperature, top-k, top-p and min-p (they reshape the distribution). Temperature 0 means greedy.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from flash_experts.errors import ConfigError, UserError

LogitsProcessor = Callable[[Tensor, Tensor, Tensor], Tensor]

# Float rounding slack for top-p: a nucleus whose cumulative probability reaches p "up to rounding" is
# complete, so p=0.8 over probs [0.5, 0.3, ...] keeps exactly two tokens whatever the softmax rounding.
TOP_P_TOLERANCE = 1e-6


@dataclass
class SamplingConfig:
    """Every sampling control; the defaults leave the model's distribution untouched (plain sampling).

    temperature          0 = greedy (argmax after penalties and filters); otherwise logits / temperature
    top_k                keep the k most likely tokens (0 = off)
    top_p                nucleus: keep the smallest set whose cumulative probability >= top_p (1 = off)
    min_p                keep tokens with prob >= min_p * max prob (0 = off)
    repetition_penalty   CTRL/HF: divide positive, multiply negative logits of seen tokens (1 = off)
    no_repeat_ngram_size never repeat an n-gram of this size (0 = off)
    min_new_tokens       suppress EOS (and stop tokens) until this many tokens are generated
    banned_token_ids     never emit these ids
    banned_words         never emit these strings (each tokenised with and without a leading space)
    allowed_token_ids    emit only these ids (plus EOS and stop tokens)
    allowed_regex        emit only tokens whose decoded text fully matches this regex (plus EOS/stop)
    first_token_regex    the first generated token's decoded text must fully match this regex (so it is never
                         EOS or a stop token: at least one token comes out), e.g. a name starts with a capital
    min_letters          suppress EOS (and stop tokens) until the generated text holds this many letters, e.g.
                         a name is never a two-letter fragment ("Ca", "Po")
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_new_tokens: int = 0
    banned_token_ids: Sequence[int] = field(default_factory=tuple)
    banned_words: Sequence[str] = field(default_factory=tuple)
    allowed_token_ids: Sequence[int] | None = None
    allowed_regex: str | None = None
    first_token_regex: str | None = None
    min_letters: int = 0

    def __post_init__(self) -> None:
        finite = math.isfinite
        _check(self.temperature >= 0 and finite(self.temperature), "temperature", ">= 0 (0 = greedy)", self.temperature)
        _check(_is_count(self.top_k), "top_k", "an integer >= 0 (0 = off)", self.top_k)
        _check(0 < self.top_p <= 1, "top_p", "in (0, 1] (1 = off)", self.top_p)
        _check(0 <= self.min_p < 1, "min_p", "in [0, 1) (0 = off)", self.min_p)
        _check(self.repetition_penalty > 0 and finite(self.repetition_penalty), "repetition_penalty",
               "> 0 (1 = off)", self.repetition_penalty)
        _check(_is_count(self.no_repeat_ngram_size), "no_repeat_ngram_size", "an integer >= 0 (0 = off)",
               self.no_repeat_ngram_size)
        _check(_is_count(self.min_new_tokens), "min_new_tokens", "an integer >= 0", self.min_new_tokens)
        _check(_is_count(self.min_letters), "min_letters", "an integer >= 0", self.min_letters)
        _check(all(_is_count(i) for i in self.banned_token_ids), "banned_token_ids", "token ids (integers >= 0)",
               list(self.banned_token_ids))
        _check(all(isinstance(w, str) and w for w in self.banned_words), "banned_words", "non-empty strings",
               list(self.banned_words))
        if self.allowed_token_ids is not None:
            ids = list(self.allowed_token_ids)
            _check(bool(ids) and all(_is_count(i) for i in ids), "allowed_token_ids", "a non-empty list of token ids",
                   ids)
        for name in ("allowed_regex", "first_token_regex"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ConfigError(f"{name} must be a valid regular expression, got {pattern!r}: {error}") from None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _check(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {rule}, got {value!r}")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# ----------------------------------------------------------------------------- distribution warpers


def temperature(value: float) -> LogitsProcessor:
    def apply(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return logits.div_(value)
    return apply


def top_k(k: int) -> LogitsProcessor:
    """Keep the k largest logits (ties with the k-th are kept too, as in HF)."""
    def apply(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        kth_largest_B1 = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).values[:, -1:]
        return logits.masked_fill_(logits < kth_largest_B1, -math.inf)
    return apply


def top_p(p: float) -> LogitsProcessor:
    """Nucleus: keep the smallest set of most likely tokens whose cumulative probability reaches p."""
    def apply(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs_sorted = sorted_logits.softmax(dim=-1)
        mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted  # probability of the tokens ranked above
        remove_sorted = mass_before >= p - TOP_P_TOLERANCE  # the nucleus was already complete
        remove_sorted[:, 0] = False  # always keep at least the most likely token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        return logits.masked_fill_(remove, -math.inf)
    return apply


def min_p(value: float) -> LogitsProcessor:
    """Keep tokens whose probability is at least `value` times the most likely token's."""
    def apply(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        probs = logits.softmax(dim=-1)
        threshold_B1 = value * probs.amax(dim=-1, keepdim=True)
        return logits.masked_fill_(probs < threshold_B1, -math.inf)
    return apply


# ----------------------------------------------------------------------------- penalties


def repetition_penalty(penalty: float) -> LogitsProcessor:
    """CTRL / HF: every token already present (prompt or generated) has its logit divided by `penalty`
    when positive and multiplied when negative, so a penalty > 1 always makes it less likely."""
    def apply(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        seen_BV = _token_presence(input_ids, attention_mask.to(logits.dtype), logits.shape[-1]) > 0
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        return torch.where(seen_BV, penalized, logits)
    return apply


def no_repeat_ngram(n: int) -> LogitsProcessor:
    """Ban every token that would complete an n-gram already present in the sequence (HF semantics)."""
    def apply(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        length = input_ids.shape[1]
        if n == 1:  # every seen token is a 1-gram
            seen = _token_presence(input_ids, attention_mask.to(logits.dtype), logits.shape[-1]) > 0
            return logits.masked_fill_(seen, -math.inf)
        if length < n:  # no complete n-gram yet
            return logits
        windows_BWN = input_ids.unfold(1, n, 1)  # (B, T-n+1, n): every n-gram, oldest first
        window_valid_BW = attention_mask.unfold(1, n, 1).bool().all(dim=-1)  # no padding inside
        current_prefix_B1N = input_ids[:, length - n + 1:].unsqueeze(1)  # the last n-1 tokens
        match_BW = (windows_BWN[..., :-1] == current_prefix_B1N).all(dim=-1) & window_valid_BW
        banned = _token_presence(windows_BWN[..., -1], match_BW.to(logits.dtype), logits.shape[-1]) > 0
        return logits.masked_fill_(banned, -math.inf)
    return apply


def min_new_tokens(count: int, prompt_length: int, end_token_ids: Sequence[int]) -> LogitsProcessor:
    """Forbid EOS (and stop tokens) until `count` tokens have been generated after the prompt."""
    ban_end = ban_tokens(end_token_ids)

    def apply(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if input_ids.shape[1] - prompt_length < count:
            return ban_end(logits, input_ids, attention_mask)
        return logits
    return apply


def min_letters(count: int, letters_V: Tensor, prompt_length: int, end_token_ids: Sequence[int]) -> LogitsProcessor:
    """Forbid EOS (and stop tokens) in the rows whose generated text holds fewer than `count` letters
    (`letters_V`: the letters in each token's decoded text)."""
    ban_end = ban_tokens(end_token_ids)
    table = torch.cat([letters_V, letters_V.new_zeros(1)])  # the last entry: ids past the tokenizer, no letters

    def apply(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        generated_BT = input_ids[:, prompt_length:]
        letters_B = table.to(generated_BT.device)[generated_BT.clamp(max=letters_V.numel())].sum(1)
        short_B = letters_B < count
        if bool(short_B.any()):
            logits[short_B] = ban_end(logits[short_B], input_ids[short_B], attention_mask[short_B])
        return logits
    return apply


def first_token_only(allow: LogitsProcessor, prompt_length: int) -> LogitsProcessor:
    """Apply the filter `allow` to the first generated token only."""
    def apply(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if input_ids.shape[1] == prompt_length:
            return allow(logits, input_ids, attention_mask)
        return logits
    return apply


def _token_presence(ids_BT: Tensor, weights_BT: Tensor, vocab_size: int) -> Tensor:
    """(B, V) summed weights of each token id in each row (> 0 = present); ids >= vocab are ignored."""
    in_range = ids_BT < vocab_size
    counts = torch.zeros(ids_BT.shape[0], vocab_size, dtype=weights_BT.dtype, device=ids_BT.device)
    return counts.scatter_add_(1, ids_BT.clamp(max=vocab_size - 1), weights_BT * in_range)


# ----------------------------------------------------------------------------- token filters


def ban_tokens(token_ids: Iterable[int]) -> LogitsProcessor:
    """Never emit these ids (ids outside the model's vocabulary are ignored)."""
    token_ids = sorted({int(i) for i in token_ids})
    masks: dict[tuple[int, torch.device], Tensor] = {}  # built once per (vocab, device), sized by the vocab

    def apply(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        key = (logits.shape[-1], logits.device)
        if key not in masks:
            banned = torch.zeros(key[0], dtype=torch.bool)
            banned[[i for i in token_ids if i < key[0]]] = True
            masks[key] = banned.to(logits.device)
        return logits.masked_fill_(masks[key], -math.inf)
    return apply


def ban_sequences(sequences: Iterable[Sequence[int]]) -> LogitsProcessor:
    """Ban multi-token sequences: when the generated tail equals a sequence minus its last token, that
    last token is banned (single-token sequences are always banned). Sequences of one length are
    checked together, so the cost per step does not grow with the number of banned words."""
    by_length: dict[int, list[list[int]]] = {}
    for seq in {tuple(int(t) for t in s) for s in sequences if len(s) > 0}:
        by_length.setdefault(len(seq), []).append(list(seq))
    single = [seq[0] for seq in by_length.pop(1, [])]
    groups = [(length, torch.tensor(seqs, dtype=torch.long)) for length, seqs in sorted(by_length.items())]
    ban_single = ban_tokens(single) if single else None

    def apply(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if ban_single is not None:
            logits = ban_single(logits, input_ids, attention_mask)
        for index, (length, seqs_SL) in enumerate(groups):
            if input_ids.shape[1] < length - 1:
                continue
            if seqs_SL.device != logits.device:  # moved once, on first use
                seqs_SL = seqs_SL.to(logits.device)
                groups[index] = (length, seqs_SL)
            tail_B1L = input_ids[:, input_ids.shape[1] - length + 1:].unsqueeze(1)
            tail_real_B1 = attention_mask[:, attention_mask.shape[1] - length + 1:].bool().all(-1, keepdim=True)
            match_BS = (seqs_SL[:, :-1].unsqueeze(0) == tail_B1L).all(dim=-1) & tail_real_B1
            last_BS = seqs_SL[:, -1].expand(match_BS.shape[0], -1)
            banned = _token_presence(last_BS, match_BS.to(logits.dtype), logits.shape[-1]) > 0
            logits = logits.masked_fill_(banned, -math.inf)
        return logits
    return apply


def allow_only(allowed_mask_V: Tensor, default: bool = False) -> LogitsProcessor:
    """Keep only the token ids marked True in `allowed_mask_V`; ids beyond its end get `default`."""
    masks: dict[tuple[int, torch.device], Tensor] = {}  # built once per (vocab, device)

    def apply(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        key = (logits.shape[-1], logits.device)
        if key not in masks:
            banned = torch.full((key[0],), not default, dtype=torch.bool)
            size = min(key[0], allowed_mask_V.shape[0])
            banned[:size] = ~allowed_mask_V[:size].cpu()
            masks[key] = banned.to(logits.device)
        return logits.masked_fill_(masks[key], -math.inf)
    return apply


# per tokenizer: a regex pattern -> its token mask, and _LETTERS -> the letters per token
_VOCABULARY_CACHE: "weakref.WeakKeyDictionary[object, dict[object, Tensor]]" = weakref.WeakKeyDictionary()
_LETTERS = ("letters per token",)  # a key no pattern string can equal


def _tokenizer_cache(tokenizer) -> dict[object, Tensor]:
    try:
        return _VOCABULARY_CACHE.setdefault(tokenizer, {})
    except TypeError:  # an object that cannot be weakly referenced: just don't cache
        return {}


def tokens_matching_regex(tokenizer, pattern: str) -> Tensor:
    """(len(tokenizer),) bool: token ids whose decoded text fully matches `pattern`.

    Decoding the whole vocabulary takes a fraction of a second for GPT-2, so it is done once per
    (tokenizer, pattern) and cached. Special tokens never match (their text is markup, not content)."""
    per_tokenizer = _tokenizer_cache(tokenizer)
    if pattern not in per_tokenizer:
        regex = re.compile(pattern)
        allowed = [not special and text != "" and regex.fullmatch(text) is not None
                   for text, special in _decoded_vocabulary(tokenizer)]
        per_tokenizer[pattern] = torch.tensor(allowed, dtype=torch.bool)
    return per_tokenizer[pattern]


def letters_per_token(tokenizer) -> Tensor:
    """(len(tokenizer),) long: the letters in each token's decoded text (0 for special tokens); cached."""
    per_tokenizer = _tokenizer_cache(tokenizer)
    if _LETTERS not in per_tokenizer:
        per_tokenizer[_LETTERS] = torch.tensor(
            [0 if special else sum(ch.isalpha() for ch in text) for text, special in _decoded_vocabulary(tokenizer)],
            dtype=torch.long)
    return per_tokenizer[_LETTERS]


def _decoded_vocabulary(tokenizer) -> list[tuple[str, bool]]:
    """Each token id's decoded text and whether it is a special token."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    return [(text, i in special) for i, text in enumerate(texts)]


def word_token_sequences(tokenizer, words: Iterable[str]) -> list[list[int]]:
    """Token sequences for banned words: each word as written and with a leading space, since BPE
    tokenises " word" (inside a sentence) differently from "word" (at the start)."""
    sequences = []
    for word in words:
        for variant in {word, " " + word.lstrip()}:
            ids = tokenizer.encode(variant, add_special_tokens=False)
            if ids:
                sequences.append(list(ids))
    return sequences


# ----------------------------------------------------------------------------- assembling


def build_processors(
    config: SamplingConfig,
    *,
    tokenizer=None,
    prompt_length: int = 0,
    end_token_ids: Sequence[int] = (),
    vocab_size: int | None = None,
) -> list[LogitsProcessor]:
    """The processors `config` asks for, in application order.

    `end_token_ids`: EOS and single-token stop strings; they stay allowed by the allow-list filters (a
    name must be able to end) and are what `min_new_tokens` suppresses. `prompt_length` is the padded
    prompt width, so `min_new_tokens` can count generated tokens. `vocab_size` (the model's): token ids
    in the config must lie below it."""
    if vocab_size is not None:
        for name, ids in (("banned", config.banned_token_ids), ("allowed", config.allowed_token_ids or ())):
            outside = sorted({int(i) for i in ids if i >= vocab_size})
            if outside:
                raise UserError(f"{name} token id(s) {outside[:5]} outside the model's vocabulary of "
                                f"{vocab_size} tokens")
    processors: list[LogitsProcessor] = []
    if config.repetition_penalty != 1.0:
        processors.append(repetition_penalty(config.repetition_penalty))
    if config.no_repeat_ngram_size > 0:
        processors.append(no_repeat_ngram(config.no_repeat_ngram_size))
    if config.banned_token_ids:
        processors.append(ban_tokens(config.banned_token_ids))
    if config.banned_words:
        if tokenizer is None:
            raise UserError("banned_words needs a tokenizer to turn words into token ids")
        processors.append(ban_sequences(word_token_sequences(tokenizer, config.banned_words)))
    allowed_masks = []
    if config.allowed_token_ids is not None:
        size = max(max(config.allowed_token_ids), *end_token_ids, 0) + 1
        mask = torch.zeros(size, dtype=torch.bool)
        mask[list(config.allowed_token_ids)] = True
        allowed_masks.append(mask)
    if config.allowed_regex is not None:
        if tokenizer is None:
            raise UserError("allowed_regex needs a tokenizer to decode the vocabulary")
        mask = tokens_matching_regex(tokenizer, config.allowed_regex)
        if not mask.any():
            raise UserError(f"no token of the vocabulary matches allowed_regex {config.allowed_regex!r}")
        allowed_masks.append(mask)
    if allowed_masks:
        size = max(max(m.shape[0] for m in allowed_masks), max(end_token_ids, default=-1) + 1)
        combined = torch.ones(size, dtype=torch.bool)
        for mask in allowed_masks:  # several allow-lists: a token must pass all of them
            padded = torch.zeros(size, dtype=torch.bool)
            padded[: mask.shape[0]] = mask
            combined &= padded
        combined[list(end_token_ids)] = True  # generation must always be able to stop
        content = combined.clone()
        content[list(end_token_ids)] = False
        if config.min_new_tokens > 0 and not content.any():
            raise UserError("the allow-list leaves only end tokens, but min_new_tokens forbids ending")
        processors.append(allow_only(combined))
    if config.first_token_regex is not None:
        if tokenizer is None:
            raise UserError("first_token_regex needs a tokenizer to decode the vocabulary")
        first = tokens_matching_regex(tokenizer, config.first_token_regex)
        passes = first  # the allow-list's filter runs before this one: the first token must pass both
        if allowed_masks:
            size = min(first.shape[0], combined.shape[0])
            passes = first[:size] & combined[:size]
        if not passes.any():
            raise UserError(f"no token of the vocabulary matches first_token_regex {config.first_token_regex!r}"
                            + (" and the allow-list" if allowed_masks else ""))
        processors.append(first_token_only(allow_only(first), prompt_length))
    if config.min_new_tokens > 0:
        processors.append(min_new_tokens(config.min_new_tokens, prompt_length, end_token_ids))
    if config.min_letters > 0:
        if tokenizer is None:
            raise UserError("min_letters needs a tokenizer to count the letters of each token")
        processors.append(min_letters(config.min_letters, letters_per_token(tokenizer), prompt_length,
                                      end_token_ids))
    if config.greedy:  # the warpers cannot change the argmax
        return processors
    if config.temperature != 1.0:
        processors.append(temperature(config.temperature))
    if config.top_k > 0:
        processors.append(top_k(config.top_k))
    if config.top_p < 1.0:
        processors.append(top_p(config.top_p))
    if config.min_p > 0.0:
        processors.append(min_p(config.min_p))
    return processors


def apply_processors(processors: Sequence[LogitsProcessor], logits: Tensor, input_ids: Tensor,
                     attention_mask: Tensor) -> Tensor:
    for processor in processors:
        logits = processor(logits, input_ids, attention_mask)
    return logits


def choose_next_tokens(logits_BV: Tensor, config: SamplingConfig, generator: torch.Generator | None = None) -> Tensor:
    """(B,) next token ids: argmax when greedy, else a sample from softmax(processed logits)."""
    if config.greedy:
        return logits_BV.argmax(dim=-1)
    probs = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
