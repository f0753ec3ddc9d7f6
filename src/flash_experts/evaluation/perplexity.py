"""Sliding-window perplexity over a flat token stream.

The method is the one in Hugging Face's "Perplexity of fixed-length models" guide: windows of `context`
tokens start every `stride` tokens; each window scores only the tokens that the previous window did not
score, so every scored token sees between `context - stride` and `context - 1` tokens of history. The
first token of the stream is never scored (nothing predicts it), and with `stride == context`
(non-overlapping windows) the first token of *every* window goes unscored, exactly as in a plain
chunked evaluation.

The NLL is computed here from `out.logits` with a float32 log-softmax, never taken from `out.loss`:
our MoE models add router auxiliary losses to `loss`, and scoring every model with the same code is the
only way dense, MoE and any Hugging Face causal LM get comparable numbers.

Token sources (all joined into one stream with no BOS/EOS added by us; GPT-2 has no BOS in its windows):
- WikiText-2 raw test split, `wiki.test.raw`: the file's text as is (its CRLF line ends read as "\\n"),
  tokenised in one piece; found by `flash_experts.data.text` when no path is given;
- a prepared data folder's split (`flash_experts.data.tokens.load_split`): the stored ids, documents
  already separated by EOS;
- any UTF-8 text file, tokenised in one piece.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flash_experts.data.text import read_text
from flash_experts.errors import NonFiniteOutput, UserError
from flash_experts.model.properties import model_device, model_max_positions, model_vocab_size, synchronize
from flash_experts.model.routing import SplitRouting, SplitRoutingTally, expert_distances


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, nats
    tokens_scored: int
    windows: int
    context: int
    stride: int
    seconds: float
    tokens_per_second: float  # scored tokens per second of model time (forwards + loss)
    precision: str  # "fp32" | "bf16"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"perplexity {self.perplexity:.4f} (NLL {self.nll:.4f} nats/token) over {self.tokens_scored:,} tokens, "
            f"{self.windows} windows of {self.context} (stride {self.stride}), {self.precision}, "
            f"{self.seconds:.1f}s, {self.tokens_per_second:,.0f} tokens/s"
        )


# ---------------------------------------------------------------------------------------------------
# Windows


@dataclass(frozen=True)
class Window:
    begin: int  # first token fed to the model
    end: int  # one past the last token fed
    first_scored: int  # first token whose prediction counts; tokens [first_scored, end) are scored

    @property
    def length(self) -> int:
        return self.end - self.begin


def sliding_windows(num_tokens: int, context: int, stride: int) -> list[Window]:
    """The HF-guide windows over a stream of `num_tokens` tokens.

    A window scores the tokens after the previous window's end (`prev_end`), but never its own first token
    (it has no history inside the window): first_scored = max(prev_end, begin + 1).
    """
    if context < 2:
        raise UserError(f"context must be at least 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise UserError(f"stride must be between 1 and the context ({context}), got {stride}")
    if num_tokens < 2:
        raise UserError(f"the evaluation stream needs at least 2 tokens, got {num_tokens}")
    windows = []
    prev_end = 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + context, num_tokens)
        first_scored = max(prev_end, begin + 1)
        if first_scored < end:
            windows.append(Window(begin, end, first_scored))
        prev_end = end
        if end == num_tokens:
            break
    return windows


# ---------------------------------------------------------------------------------------------------
# Model helpers


def resolve_context(model: torch.nn.Module, context: int | None) -> int:
    """`context` checked against the model's maximum; defaults to that maximum."""
    max_positions = model_max_positions(model)
    if context is None:
        if max_positions is None:
            raise UserError("the model's config names no maximum length (n_positions / max_position_embeddings): pass a context")
        return max_positions
    if max_positions is not None and context > max_positions:
        raise UserError(f"context {context} exceeds the model's maximum of {max_positions} positions")
    return context


def as_token_tensor(tokens: Any, max_tokens: int | None = None) -> torch.Tensor:
    """A flat int64 CPU tensor from a tensor / numpy array (memmaps included) / list of ints."""
    if isinstance(tokens, torch.Tensor):
        stream = tokens.detach().to("cpu").reshape(-1)
    else:
        array = np.asarray(tokens[:max_tokens] if max_tokens is not None else tokens)
        stream = torch.from_numpy(array.astype(np.int64, copy=True).reshape(-1))
    if max_tokens is not None:
        if max_tokens < 2:
            raise UserError(f"max_tokens must be at least 2, got {max_tokens}")
        stream = stream[:max_tokens]
    return stream.long()


def forward_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> Any:
    """One forward pass without labels (so no loss and no router aux loss is computed) and without a cache."""
    return model(input_ids=input_ids, use_cache=False)


# ---------------------------------------------------------------------------------------------------
# Perplexity


@torch.inference_mode()
def evaluate_perplexity(
    model: torch.nn.Module,
    tokens: Any,
    *,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    bf16: bool = False,
    max_tokens: int | None = None,
    quiet: bool = False,
    router_stats: SplitRoutingTally | None = None,
) -> PerplexityResult:
    """Sliding-window perplexity of `model` on the token stream `tokens` (see the module docstring).

    context: window length (default: the model's maximum positions); stride: how far windows move
    (default: `context`, non-overlapping); batch_size: windows per forward; bf16: bfloat16 autocast
    (the log-softmax stays float32); max_tokens: evaluate only the stream's first N tokens;
    router_stats: an accumulator fed with `out.router_stats` of every forward (MoE models).
    """
    stream = as_token_tensor(tokens, max_tokens)
    context = resolve_context(model, context)
    stride = context if stride is None else stride
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    if stream.numel() and (int(stream.min()) < 0 or (model_vocab_size(model) or 2**63) <= int(stream.max())):
        raise UserError(
            f"token ids range over [{int(stream.min())}, {int(stream.max())}] but the model's vocabulary has "
            f"{model_vocab_size(model)} entries: the tokens were made with another tokenizer"
        )
    windows = sliding_windows(stream.numel(), context, stride)

    device = model_device(model)
    was_training = model.training
    model.eval()
    nll_sum = 0.0  # float64 on the host: 1e6 tokens of float32 partial sums lose digits
    scored = 0
    progress = tqdm(total=len(windows), desc="perplexity", unit="window", disable=quiet, leave=False)
    synchronize(device)
    start = time.perf_counter()
    try:
        for batch in _batches_of_equal_length(windows, batch_size):
            input_ids_BT = torch.stack([stream[w.begin : w.end] for w in batch]).to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                out = forward_logits(model, input_ids_BT)
            batch_nll = _scored_nll_sum(out.logits, input_ids_BT, batch)
            if not math.isfinite(batch_nll):
                raise NonFiniteOutput(model, "logits")
            nll_sum += batch_nll
            scored += sum(w.end - w.first_scored for w in batch)
            if router_stats is not None:
                router_stats.add(getattr(out, "router_stats", None), num_tokens=input_ids_BT.numel())
            progress.update(len(batch))
        synchronize(device)
    finally:
        progress.close()
        model.train(was_training)
    seconds = time.perf_counter() - start
    mean_nll = nll_sum / scored
    return PerplexityResult(
        perplexity=math.exp(mean_nll),
        nll=mean_nll,
        tokens_scored=scored,
        windows=len(windows),
        context=context,
        stride=stride,
        seconds=seconds,
        tokens_per_second=scored / seconds if seconds > 0 else float("inf"),
        precision="bf16" if bf16 else "fp32",
    )


@torch.inference_mode()
def collect_router_stats(
    model: torch.nn.Module,
    tokens: Any,
    *,
    context: int | None = None,
    batch_size: int = 4,
    bf16: bool = False,
    max_tokens: int | None = None,
    quiet: bool = False,
) -> SplitRouting:
    """Route the stream through `model` in non-overlapping windows (each token once) and aggregate."""
    accumulator = SplitRoutingTally()
    evaluate_perplexity(
        model, tokens, context=context, stride=None, batch_size=batch_size, bf16=bf16,
        max_tokens=max_tokens, quiet=quiet, router_stats=accumulator,
    )
    return accumulator.result(expert_distances(model))


def perplexity_with_routing(
    model: torch.nn.Module,
    tokens: Any,
    *,
    context: int | None = None,
    stride: int | None = None,
    batch_size: int = 4,
    bf16: bool = False,
    quiet: bool = False,
) -> tuple[PerplexityResult, SplitRouting]:
    """Perplexity and router statistics of one evaluation stream. Overlapping windows (stride < context)
    route most tokens several times, so routing then gets its own non-overlapping pass: every token of the
    evaluation set counts exactly once in the statistics."""
    overlapping = stride is not None and stride < resolve_context(model, context)
    accumulator = None if overlapping else SplitRoutingTally()
    result = evaluate_perplexity(model, tokens, context=context, stride=stride, batch_size=batch_size, bf16=bf16,
                                 quiet=quiet, router_stats=accumulator)
    routing = accumulator.result(expert_distances(model)) if accumulator is not None else collect_router_stats(
        model, tokens, context=result.context, batch_size=batch_size, bf16=bf16, quiet=quiet)
    return result, routing


def bits_per_character(model: torch.nn.Module, tokens: Any, characters: int, *, context: int,
                       start_token_id: int, batch_size: int = 4) -> float:
    """Bits per character of the text `tokens` encode, every token scored: the stream is preceded by
    `start_token_id` (the separator the model saw before every document in training, so the first token is
    predicted too) and windows overlap by one token, so no window's first token goes unscored. Summed NLL
    (nats) / ln 2 / `characters`: comparable across tokenizers, unlike perplexity."""
    if characters < 1:
        raise UserError(f"bits per character needs at least one character, got {characters}")
    stream = torch.cat([torch.tensor([start_token_id]), as_token_tensor(tokens)])
    context = max(2, context)
    result = evaluate_perplexity(model, stream, context=context, stride=context - 1, batch_size=batch_size,
                                 quiet=True)
    return result.nll * result.tokens_scored / math.log(2) / characters


def split_bits_per_character(model: torch.nn.Module, data_dir: str | Path, split: str, documents: Sequence[str],
                             context: int) -> float:
    """`bits_per_character` of a prepared data folder's split, whose `documents` each count their characters
    plus one for the newline the EOS after each stands for."""
    from flash_experts.data.tokens import load_meta, load_split

    meta = load_meta(data_dir)
    tokens = load_split(data_dir, split, model_vocab_size(model))
    return bits_per_character(model, np.asarray(tokens, dtype=np.int64), sum(len(doc) + 1 for doc in documents),
                              context=context, start_token_id=int(meta["eos_token_id"]))


def _batches_of_equal_length(windows: Sequence[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows grouped by length (only the last window can be shorter), so no padding is needed."""
    batches: list[list[Window]] = []
    for window in windows:
        if batches and len(batches[-1]) < batch_size and batches[-1][0].length == window.length:
            batches[-1].append(window)
        else:
            batches.append([window])
    return batches


def _scored_nll_sum(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, batch: Sequence[Window]) -> float:
    """Summed NLL of each window's scored tokens; logit t predicts token t + 1."""
    total = 0.0
    for row, window in enumerate(batch):
        first = window.first_scored - window.begin  # position of the first scored token inside the window
        logits_SV = logits_BTV[row, first - 1 : window.length - 1].float()
        targets_S = input_ids_BT[row, first:]
        total += F.cross_entropy(logits_SV, targets_S, reduction="sum").item()
    return total


# ---------------------------------------------------------------------------------------------------
# Token sources


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's content (universal newlines: CRLF becomes "\\n"), with a clear error if missing."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a text file")
    if not path.is_file():
        raise UserError(f"text file not found: {path}")
    return read_text(path)


def tokenize_text(text: str, tokenizer: Any) -> torch.Tensor:
    """One flat stream of token ids for `text`, no special tokens added (no BOS/EOS)."""
    if not text.strip():
        raise UserError("the evaluation text is empty")
    if hasattr(tokenizer, "model_max_length"):
        # The whole text is one stream that windows cut later; silence the "sequence too long" warning.
        saved = tokenizer.model_max_length
        tokenizer.model_max_length = int(1e30)
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        if hasattr(tokenizer, "model_max_length"):
            tokenizer.model_max_length = saved
    return torch.tensor(ids, dtype=torch.long)


def wikitext_test_text(path: str | Path | None = None) -> str:
    """The raw WikiText-2 test split's text, whole: `path` (the wiki.test.raw file or a folder holding it),
    else wherever `flash_experts.data.text` finds WikiText-2 (env var, the dev checkout's shared data,
    the datasets cache or the hub)."""
    from flash_experts.data.text import find_wikitext_dir, wikitext_documents

    if path is not None and Path(path).is_file():
        return read_text_file(path)
    if path is not None and not Path(path).exists():
        raise UserError(f"WikiText-2 test file not found: {path} (expected the raw test split, wiki.test.raw)")
    folder = find_wikitext_dir(path)
    if folder is not None:
        for name in ("wiki.test.raw", "wiki.test.tokens"):
            if (folder / name).is_file():
                return read_text_file(folder / name)
        raise UserError(f"{folder} holds no WikiText-2 test split (wiki.test.raw)")
    # The articles of the datasets copy, joined back: they are consecutive slices of the split's text.
    return "".join(wikitext_documents(None)["test"])


def check_data_tokenizer(data_dir: str | Path, tokenizer: Any) -> None:
    """A prepared folder's ids mean something only under the tokenizer that made them: refuse a folder whose
    meta.json names another vocabulary size or EOS id than `tokenizer` (ids could be in range yet wrong)."""
    from flash_experts.data.tokens import load_meta

    meta = load_meta(data_dir)
    if tokenizer is None:
        return
    ours = {"vocab_size": len(tokenizer), "eos_token_id": getattr(tokenizer, "eos_token_id", None)}
    differing = [f"{key} {meta[key]} vs {value}" for key, value in ours.items()
                 if value is not None and meta.get(key) is not None and meta[key] != value]
    if differing:
        raise UserError(f"{data_dir} was tokenised with another tokenizer than the model's ({', '.join(differing)}); "
                        "prepare the data with the model's tokenizer (prepare-data --tokenizer)")


def load_eval_text(wikitext: str | Path | bool | None = None, text_file: str | Path | None = None) -> str:
    """The evaluation text: WikiText-2 test (a path, or True to find it) or a text file."""
    return wikitext_test_text(None if wikitext is True else wikitext) if wikitext is not None else read_text_file(text_file)


def load_eval_tokens(
    tokenizer: Any,
    *,
    wikitext: str | Path | bool | None = None,
    data_dir: str | Path | None = None,
    split: str = "val",
    text_file: str | Path | None = None,
    text: str | None = None,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """The evaluation stream from exactly one source: WikiText-2 test (a path, or True to find it), a
    prepared data split, a text file, or a text already read (`load_eval_text`)."""
    sources = (("wikitext", wikitext), ("data", data_dir), ("text", text_file), ("text already read", text))
    chosen = [name for name, value in sources if value is not None]
    if len(chosen) != 1:
        raise UserError(f"choose exactly one evaluation source (WikiText-2 file, data folder or text file), got {chosen or 'none'}")
    if data_dir is not None:
        from flash_experts.data.tokens import load_split

        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise UserError(f"data folder not found: {data_dir}")
        check_data_tokenizer(data_dir, tokenizer)
        return as_token_tensor(load_split(data_dir, split), max_tokens)
    if text is None:
        text = load_eval_text(wikitext, text_file)
    if max_tokens is not None:
        # Tokenising 1 MB to keep 500 tokens is wasteful; ~4 characters per token on average, with margin.
        text = text[: max(64, max_tokens * 16)]
    return as_token_tensor(tokenize_text(text, tokenizer), max_tokens)
