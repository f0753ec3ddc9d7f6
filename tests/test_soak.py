"""Soak test (off by default, `pytest -m soak`): 1,000 generation calls with random valid arguments in one process.

Reference: the contract that every valid argument combination works (no exception) and that the process does
not accumulate memory: resident memory and the number of live tensors after 1,000 calls stay within a bound of
what they were after a warm-up. The model is a tiny random MoE model (our code path: KV cache, routing, the
logits processors) and each call is a few tokens, so the whole run takes a minute or two on a laptop CPU.
"""

from __future__ import annotations

import gc
import os
import random
import resource
import sys
import warnings

import pytest
import torch

from flash_experts.generation import SamplingConfig, generate
from flash_experts.model import GPT2MoEConfig, GPT2MoEForCausalLM
from tiny_tokenizer import make_tokenizer as _make_tokenizer  # noqa: E402

pytestmark = pytest.mark.soak

CALLS, WARMUP = 1000, 50
RSS_GROWTH_LIMIT = 64 * 2**20  # bytes; a leaked KV cache per call would be ~100 MB over the run
TENSOR_GROWTH_LIMIT = 16
WORDS = ["Llanowar", "Elves", "Sword", "of", "Fire", "and", "Ice", "Jace,", "the", "Mind", "Sculptor", "—", "|", "G"]


def resident_bytes() -> int:
    """Current resident set size (Linux /proc); elsewhere the peak, which bounds growth just as well."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some gc'd module objects trips deprecation shims
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def random_call(rng: random.Random, tokenizer) -> dict:
    """Keyword arguments of one generate() call, drawn from the valid ranges of every control."""
    prompts = [" ".join(rng.choices(WORDS, k=rng.randint(0, 6))) for _ in range(rng.randint(1, 3))]
    config = SamplingConfig(
        temperature=rng.choice([0.0, 0.2, 0.7, 1.0, 1.8]),
        top_k=rng.choice([0, 1, 5, 50]),
        top_p=rng.choice([1.0, 0.9, 0.5, 0.05]),
        min_p=rng.choice([0.0, 0.05, 0.5]),
        repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
        no_repeat_ngram_size=rng.choice([0, 0, 2, 3]),
        min_new_tokens=rng.choice([0, 0, 2]),
        banned_token_ids=tuple(rng.sample(range(len(tokenizer)), rng.choice([0, 0, 3]))),
        banned_words=tuple(rng.sample(WORDS[:11], rng.choice([0, 0, 2]))),
        allowed_regex=rng.choice([None, None, "[A-Za-z ,']+"]),
    )
    pieces: list[str] = []
    return {
        "prompts": prompts, "config": config, "max_new_tokens": rng.randint(1, 8),
        "stop_strings": rng.choice([(), (), ("Ice",), ("|", "the")]), "seed": rng.choice([None, rng.randrange(2**31)]),
        "stream": rng.choice([None, pieces.append]),
    }


def test_thousand_random_generate_calls_no_error_no_memory_growth():
    """Reference: the contract (valid arguments never fail) and a warm-up baseline of memory and live tensors."""
    torch.manual_seed(0)
    tokenizer = _make_tokenizer([" ".join(WORDS)])
    config = GPT2MoEConfig(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
                           num_experts=4, num_experts_per_tok=2, moe_layers="all", bos_token_id=0, eos_token_id=0)
    model = GPT2MoEForCausalLM(config).eval()
    rng = random.Random(1234)

    for call in range(CALLS):
        if call == WARMUP:
            baseline_tensors, baseline_rss = live_tensors(), resident_bytes()
        kwargs = random_call(rng, tokenizer)
        prompts = kwargs.pop("prompts")
        result = generate(model, tokenizer, prompts, **kwargs)
        assert len(result.texts) == len(prompts), (call, kwargs)
        assert all(1 <= n <= kwargs["max_new_tokens"] for n in result.num_new_tokens), (call, kwargs)
        assert set(result.finish_reasons) <= {"eos", "stop", "length"}

    tensor_growth = live_tensors() - baseline_tensors
    rss_growth = resident_bytes() - baseline_rss
    assert tensor_growth <= TENSOR_GROWTH_LIMIT, f"{tensor_growth} more live tensors after {CALLS - WARMUP} calls"
    assert rss_growth <= RSS_GROWTH_LIMIT, f"resident memory grew by {rss_growth / 2**20:.1f} MiB"
