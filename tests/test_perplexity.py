"""Sliding-window perplexity against independent references: HF's own `labels=` loss, a hand loop."""

from __future__ import annotations

import math
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(min(2, torch.get_num_threads()))

from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from flash_experts.errors import UserError  # noqa: E402
from flash_experts.evaluation.perplexity import (  # noqa: E402
    evaluate_perplexity,
    load_eval_tokens,
    sliding_windows,
)

VOCAB = 101
N_POSITIONS = 64

@pytest.fixture(scope="module")
def tiny_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    # A large init std makes predictions sharp and context-dependent, so window overlap changes the number.
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=N_POSITIONS, initializer_range=0.3)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def stream() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (300,), generator=generator)


def hf_guide_perplexity(model, encodings: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """The loop of HF's "Perplexity of fixed-length models" guide, using the model's own `labels=` loss."""
    seq_len = encodings.size(0)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = encodings[begin_loc:end_loc].unsqueeze(0)
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            neg_log_likelihood = model(input_ids, labels=target_ids).loss
        # The loss averages over valid labels after the internal shift: one fewer than the unmasked labels.
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += neg_log_likelihood.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("stride, batch_size", [(24, 3), (40, 1), (1 + N_POSITIONS // 2, 8)])
def test_sliding_window_matches_hf_guide_labels_loss(tiny_gpt2, stream, stride, batch_size):
    """Reference: HF guide loop with the model's own labels= loss, weighted by scored tokens."""
    expected_ppl, expected_tokens = hf_guide_perplexity(tiny_gpt2, stream, N_POSITIONS, stride)
    result = evaluate_perplexity(tiny_gpt2, stream, stride=stride, batch_size=batch_size, quiet=True)
    assert result.context == N_POSITIONS  # defaults to config.n_positions
    assert result.windows > 3
    assert result.tokens_scored == expected_tokens == stream.numel() - 1
    assert result.perplexity == pytest.approx(expected_ppl, rel=1e-3)
    assert result.nll == pytest.approx(math.log(expected_ppl), rel=1e-3)


def test_non_overlapping_matches_hand_chunk_loop(tiny_gpt2, stream):
    """Reference: hand loop over disjoint chunks with a plain log-softmax; each chunk's first token unscored."""
    context = 50
    nll_sum, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, stream.numel(), context):
            chunk = stream[begin : begin + context]
            if chunk.numel() < 2:
                continue
            log_probs = torch.log_softmax(tiny_gpt2(chunk[None]).logits[0].double(), dim=-1)
            for t in range(chunk.numel() - 1):
                nll_sum -= log_probs[t, chunk[t + 1]].item()
                count += 1
    result = evaluate_perplexity(tiny_gpt2, stream, context=context, stride=context, batch_size=2, quiet=True)
    assert result.tokens_scored == count
    assert result.perplexity == pytest.approx(math.exp(nll_sum / count), rel=1e-3)


def test_overlap_changes_the_number(tiny_gpt2, stream):
    """Reference: the non-overlapping result; more history per token must give a different perplexity."""
    disjoint = evaluate_perplexity(tiny_gpt2, stream, stride=N_POSITIONS, quiet=True)
    sliding = evaluate_perplexity(tiny_gpt2, stream, stride=8, quiet=True)
    assert abs(sliding.perplexity - disjoint.perplexity) / disjoint.perplexity > 1e-3


@pytest.mark.parametrize("num_tokens", [2, 3, 63, 64, 65, 200])
@pytest.mark.parametrize("context, stride", [(8, 1), (8, 3), (8, 8), (5, 4), (2, 2)])
def test_windows_score_every_token_once_set_reference(num_tokens, context, stride):
    """Reference: set arithmetic; overlapping windows score 1..n-1 exactly once, disjoint ones skip window starts."""
    windows = sliding_windows(num_tokens, context, stride)
    scored = [t for w in windows for t in range(w.first_scored, w.end)]
    assert len(scored) == len(set(scored))
    assert all(w.end - w.begin <= context and w.begin < w.first_scored for w in windows)
    if stride < context:
        assert sorted(scored) == list(range(1, num_tokens))
    else:
        assert sorted(scored) == [t for t in range(1, num_tokens) if t % context != 0]


def test_bf16_autocast_close_to_fp32(tiny_gpt2, stream):
    """Reference: the fp32 result; bf16 autocast should agree to a few percent."""
    fp32 = evaluate_perplexity(tiny_gpt2, stream, stride=32, quiet=True)
    bf16 = evaluate_perplexity(tiny_gpt2, stream, stride=32, bf16=True, quiet=True)
    assert bf16.precision == "bf16" and fp32.precision == "fp32"
    assert bf16.perplexity == pytest.approx(fp32.perplexity, rel=0.05)


def test_bad_arguments_raise_user_error(tiny_gpt2, stream):
    """Reference: the model's n_positions and vocabulary size bound what may be asked."""
    with pytest.raises(UserError, match="exceeds the model's maximum"):
        evaluate_perplexity(tiny_gpt2, stream, context=N_POSITIONS + 1, quiet=True)
    with pytest.raises(UserError, match="stride"):
        evaluate_perplexity(tiny_gpt2, stream, context=16, stride=17, quiet=True)
    with pytest.raises(UserError, match="another tokenizer"):
        evaluate_perplexity(tiny_gpt2, torch.tensor([1, 2, VOCAB]), quiet=True)
    with pytest.raises(UserError, match="at least 2 tokens"):
        evaluate_perplexity(tiny_gpt2, torch.tensor([1]), quiet=True)


def test_max_tokens_equals_truncated_stream(tiny_gpt2, stream):
    """Reference: the same evaluation on the stream sliced by hand."""
    limited = evaluate_perplexity(tiny_gpt2, stream.numpy(), max_tokens=120, stride=16, quiet=True)
    sliced = evaluate_perplexity(tiny_gpt2, stream[:120].tolist(), stride=16, quiet=True)
    assert limited.tokens_scored == 119
    assert limited.nll == pytest.approx(sliced.nll, rel=1e-6)


class _CharTokenizer:
    """Ord-based stand-in tokenizer: the reference ids are computed by hand from the text."""

    model_max_length = 64

    def __call__(self, text, add_special_tokens=True):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) % VOCAB for c in text]}


def test_text_file_source_reads_crlf_as_newlines(tmp_path):
    """Reference: ids computed by hand from the text with CRLF normalised to LF."""
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(b" = Title = \r\n Some text .\r\n")
    expected = [ord(c) % VOCAB for c in " = Title = \n Some text .\n"]
    assert load_eval_tokens(_CharTokenizer(), text_file=path).tolist() == expected
    assert load_eval_tokens(_CharTokenizer(), wikitext=tmp_path).tolist() == expected  # a folder holding it
    assert load_eval_tokens(_CharTokenizer(), text_file=path, max_tokens=5).tolist() == expected[:5]
    with pytest.raises(UserError, match="not found"):
        load_eval_tokens(_CharTokenizer(), text_file=tmp_path / "missing.txt")
    with pytest.raises(UserError, match="exactly one"):
        load_eval_tokens(_CharTokenizer(), text_file=path, wikitext=path)



def _char_tokenizer(extra: str = ""):
    """A real (fast) character-level tokenizer: id 0 = EOS, then one id per printable ASCII character."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    vocab.update({c: len(vocab) + i for i, c in enumerate(extra)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def test_prepared_data_split_source_and_tokenizer_mismatch(tmp_path):
    """Reference: ids of hand-made documents computed by hand (ord(c) - 31, EOS 0 after each document);
    a folder prepared with another vocabulary is refused rather than silently mis-scored."""
    from flash_experts.data.tokens import prepare_token_splits

    prepare_token_splits({"train": ["ab"], "val": ["Elf", "Ox"]}, _char_tokenizer(), tmp_path / "data")
    expected = [ord(c) - 31 for c in "Elf"] + [0] + [ord(c) - 31 for c in "Ox"] + [0]
    assert load_eval_tokens(_char_tokenizer(), data_dir=tmp_path / "data", split="val").tolist() == expected
    with pytest.raises(UserError, match="another tokenizer"):
        load_eval_tokens(_char_tokenizer(extra="\n\t"), data_dir=tmp_path / "data", split="val")
