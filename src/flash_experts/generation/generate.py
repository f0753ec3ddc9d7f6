"""The decode loop: batched, left-padded prompts, a KV cache, sampling controls, stop strings, streaming.

Works for our MoE models (a static cache from `model.make_cache`) and for any Hugging Face causal LM (a
`DynamicCache`). Both are called the same way, with positions we compute ourselves so the two behave
identically on padded batches:

    step 0:  the whole left-padded prompt          input_ids (B, P), attention_mask (B, P)
    step t:  the token chosen at step t-1          input_ids (B, 1), attention_mask (B, P + t)

Rows that finish (EOS or a stop string) keep receiving the pad token and are ignored; the loop ends when
every row is done or `max_new_tokens` is reached.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from flash_experts.errors import ConfigError, NonFiniteOutput, UserError
from flash_experts.generation.decode_head import transposed_lm_head
from flash_experts.generation.sampling import SamplingConfig, apply_processors, build_processors, choose_next_tokens
from flash_experts.model.properties import model_device, model_max_positions, model_vocab_size

# stream(pieces): one new piece of text per row ("" where that row produced nothing printable yet).
StreamCallback = Callable[[list[str]], None]

# Without streaming or stop strings nothing needs the host each step, so "is every row done?" (a device
# sync) is asked only every few steps; a batch that finished early wastes at most this many steps.
DONE_CHECK_EVERY = 4


@dataclass
class GenerationResult:
    texts: list[str]  # the new text per row: special tokens dropped, cut before any stop string
    token_ids: list[list[int]]  # the new token ids per row, including the EOS / stop-completing token
    num_new_tokens: list[int]  # len(token_ids[i])
    finish_reasons: list[str]  # "eos" | "stop" | "length"
    prompt_lengths: list[int]  # prompt tokens per row (without padding)
    # compile=True: seconds of the decode step's first (compiling) call; None when nothing was compiled
    compile_seconds: float | None = None


def generate(
    model,
    tokenizer,
    prompts: Sequence[str] | str | Tensor,
    config: SamplingConfig | None = None,
    max_new_tokens: int = 64,
    *,
    stop_strings: Sequence[str] = (),
    seed: int | None = None,
    stream: StreamCallback | None = None,
    attention_mask: Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    compile: bool = False,
) -> GenerationResult:
    """Continue each prompt by up to `max_new_tokens` tokens, sampled according to `config`.

    prompts: strings, or a (B, T) / (T,) tensor of token ids (then `attention_mask` marks real tokens
    when the rows are padded). `tokenizer` may be None only for tensor prompts without stop strings,
    streaming or word filters. `seed` makes sampling reproducible (a private torch.Generator).
    `compile`: run the one-token steps through torch.compile (`generation/compiled.py`; our models only; the
    first call compiles; anything that cannot compile decodes eagerly, with a warning).
    """
    config = config or SamplingConfig()
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    if any(not s for s in stop_strings):
        raise ConfigError("stop strings must be non-empty")
    if (stop_strings or stream is not None) and tokenizer is None:
        raise UserError("stop strings and streaming need a tokenizer")
    device = model_device(model)

    rows = _prompt_rows(tokenizer, prompts, attention_mask)
    batch, prompt_width = len(rows), max(len(r) for r in rows)
    total_length = prompt_width + max_new_tokens
    max_positions = model_max_positions(model)
    if max_positions is not None and total_length > max_positions:
        raise UserError(
            f"prompt ({prompt_width} tokens) + max_new_tokens ({max_new_tokens}) = {total_length} exceeds the "
            f"model's {max_positions} positions; lower max_new_tokens or shorten the prompt"
        )

    vocab_size = model_vocab_size(model)
    too_large = max((max(row) for row in rows if row), default=-1)
    if vocab_size is not None and too_large >= vocab_size:
        raise UserError(
            f"the prompt has token id {too_large} but the model's vocabulary has {vocab_size} entries: the tokenizer "
            "does not belong to this model"
        )
    eos_ids = _eos_ids(model, tokenizer, eos_token_id)
    pad_id = _pad_id(tokenizer, eos_ids)
    stop_token_ids = [ids[0] for s in stop_strings if len(ids := tokenizer.encode(s, add_special_tokens=False)) == 1]
    processors = build_processors(config, tokenizer=tokenizer, prompt_length=prompt_width,
                                  end_token_ids=sorted(set(eos_ids) | set(stop_token_ids)),
                                  vocab_size=vocab_size)

    # One preallocated buffer for prompt + generated ids, filled left to right (no per-step concatenation).
    ids_BL = torch.full((batch, total_length), pad_id, dtype=torch.long)
    mask_BL = torch.zeros(batch, total_length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids_BL[i, prompt_width - len(row):prompt_width] = torch.tensor(row, dtype=torch.long)
        mask_BL[i, prompt_width - len(row):prompt_width] = 1
    ids_BL, mask_BL = ids_BL.to(device), mask_BL.to(device)
    eos_tensor = torch.tensor(eos_ids or [-1], dtype=torch.long, device=device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

    texts = [_RowText(tokenizer, row, stop_strings) for row in rows] if (stop_strings or stream) else None
    finished_B = torch.zeros(batch, dtype=torch.bool, device=device)
    nonfinite_B = torch.zeros(batch, dtype=torch.bool, device=device)
    new_counts_B = torch.zeros(batch, dtype=torch.long, device=device)
    hit_stop = [False] * batch
    was_training = model.training
    model.eval()
    try:
        # compile: the compiled step's own few-row products replace the transposed head (generation/compiled.py)
        faster_products = _compiled_products(model) if compile else transposed_lm_head(model)
        with torch.inference_mode(), faster_products:
            decoder = key_mask_BC = None
            if compile and not hasattr(model, "make_cache"):
                warnings.warn(f"compile: {type(model).__name__} is not one of our models; decoding eagerly",
                              stacklevel=2)
            elif compile:
                from flash_experts.generation.compiled import CompiledDecoder, bucketed_length

                cache_length = bucketed_length(total_length, max_positions)
                cache = model.make_cache(batch, cache_length)
                decoder = CompiledDecoder(model, cache)
                key_mask_BC = torch.zeros(batch, cache_length, dtype=torch.bool, device=device)
                key_mask_BC[:, :prompt_width] = mask_BL[:, :prompt_width].bool()
            if decoder is None:
                cache = model.make_cache(batch, total_length) if hasattr(model, "make_cache") else _dynamic_cache()
            extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
            # transformers >= 5.24 renamed the cache argument `past_key_values` -> `cache`.
            cache_argument = "cache" if _accepts(model, "cache") else "past_key_values"
            step_ids = ids_BL[:, :prompt_width]
            positions = (mask_BL[:, :prompt_width].cumsum(-1) - 1).clamp(min=0)
            # Without padding the mask stays all ones (finished rows are fed pads marked real), so the
            # model is given none: that spares it a per-step "is anything padded?" check (a device sync).
            padded = any(len(row) < prompt_width for row in rows)
            for step in range(max_new_tokens):
                length = prompt_width + step
                if decoder is not None and step > 0:
                    key_mask_BC[:, length - 1] = True
                    logits_BV = decoder(step_ids, positions, length - 1, key_mask_BC)[:, -1, :].float()
                else:
                    out = model(input_ids=step_ids, attention_mask=mask_BL[:, :length] if padded else None,
                                position_ids=positions, use_cache=True, **{cache_argument: cache}, **extra)
                    returned_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
                    if returned_cache is not None:
                        cache = returned_cache
                    logits_BV = out.logits[:, -1, :].float()
                # NaN weights give NaN logits: sampling would then fail inside torch, argmax pick garbage. On
                # CPU the check costs nothing; on a GPU it would sync every step, so there the first step
                # (where damaged weights show) is checked and later ones are caught by the final check.
                nonfinite_B |= ~torch.isfinite(logits_BV).all(dim=-1)
                if (step == 0 or device.type == "cpu") and bool(nonfinite_B.any()):
                    raise NonFiniteOutput(model, "logits")
                logits_BV = apply_processors(processors, logits_BV, ids_BL[:, :length], mask_BL[:, :length])
                next_B = choose_next_tokens(logits_BV, config, generator)
                next_B = torch.where(finished_B, torch.full_like(next_B, pad_id), next_B)
                ids_BL[:, length] = next_B
                mask_BL[:, length] = 1
                new_counts_B += ~finished_B
                finished_B |= torch.isin(next_B, eos_tensor)
                step_ids, positions = next_B[:, None], positions[:, -1:] + 1

                if texts is not None:  # host-side work: incremental detokenising, stop strings, streaming
                    done = finished_B.tolist()
                    pieces = []
                    for i, token in enumerate(next_B.tolist()):
                        piece, stopped = texts[i].add(token) if not texts[i].closed else ("", False)
                        if stopped:
                            hit_stop[i] = done[i] = True
                        if done[i] and not texts[i].closed:  # EOS: flush what was held back
                            piece += texts[i].close()
                        pieces.append(piece)
                    if stream is not None and any(pieces):
                        stream(pieces)
                    if any(hit_stop):
                        finished_B |= torch.tensor(hit_stop, device=device)
                    if all(done):
                        break
                elif step % DONE_CHECK_EVERY == DONE_CHECK_EVERY - 1 and bool(finished_B.all()):
                    break
    finally:
        model.train(was_training)
    if bool(nonfinite_B.any()):
        raise NonFiniteOutput(model, "logits")

    if texts is not None and stream is not None:  # rows that ran out of tokens: flush held-back text
        tail = [t.close() if not t.closed else "" for t in texts]
        if any(tail):
            stream(tail)
    result = _result(tokenizer, ids_BL[:, prompt_width:].cpu(), new_counts_B.cpu(), eos_ids, hit_stop, stop_strings,
                     [len(r) for r in rows])
    if decoder is not None and decoder.failure is None:
        result.compile_seconds = decoder.compile_seconds
    return result


def _result(tokenizer, new_ids_BN: Tensor, counts_B: Tensor, eos_ids: list[int], hit_stop: list[bool],
            stop_strings: list[str], prompt_lengths: list[int]) -> GenerationResult:
    token_ids, texts, reasons = [], [], []
    eos = set(eos_ids)
    for i, count in enumerate(counts_B.tolist()):
        ids = new_ids_BN[i, :count].tolist()
        ended_by_eos = bool(ids) and ids[-1] in eos and not hit_stop[i]
        content = ids[:-1] if ended_by_eos else ids
        text = _decode(tokenizer, content) if tokenizer is not None else ""
        cut = _first_stop(text, stop_strings)  # also catches a stop completed by the very last token
        if cut is not None:
            text = text[:cut]
        token_ids.append(ids)
        texts.append(text)
        reasons.append("stop" if hit_stop[i] or cut is not None else "eos" if ended_by_eos else "length")
    return GenerationResult(texts, token_ids, [len(t) for t in token_ids], reasons, prompt_lengths)


class _RowText:
    """Incremental detokenising of one row (vLLM's prefix/read offsets), with stop-string detection.

    Decoding the few tokens before the new one and taking the character difference gets word-initial
    spaces right for SentencePiece tokenizers and holds back incomplete UTF-8 sequences ("\ufffd"). Text
    that could be the beginning of a stop string is held back until it is known not to be one."""

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer, prompt_ids: list[int], stop_strings: list[str]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-self.CONTEXT_TOKENS:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.stop_strings = stop_strings
        self.hold = max((len(s) for s in stop_strings), default=1) - 1
        self.text, self.emitted, self.closed = "", 0, False

    def add(self, token: int) -> tuple[str, bool]:
        """(printable new text, whether a stop string is now complete)."""
        self.ids.append(token)
        before = _decode(self.tokenizer, self.ids[self.prefix_offset:self.read_offset])
        after = _decode(self.tokenizer, self.ids[self.prefix_offset:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return "", False
        search_from = max(0, len(self.text) - self.hold)
        self.text += after[len(before):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        cut = _first_stop(self.text, self.stop_strings, search_from)
        if cut is not None:
            self.text = self.text[:cut]
            return self.close(stopped=True), True
        safe_end = len(self.text) - self.hold
        if safe_end <= self.emitted:
            return "", False
        piece, self.emitted = self.text[self.emitted:safe_end], safe_end
        return piece, False

    def close(self, stopped: bool = False) -> str:
        """The rest of the text; when the row ended without a stop string, that includes tokens held
        back as incomplete characters (decoded as "\ufffd", as the final text has them)."""
        if not stopped:
            before = _decode(self.tokenizer, self.ids[self.prefix_offset:self.read_offset])
            after = _decode(self.tokenizer, self.ids[self.prefix_offset:])
            self.text += after[len(before):]
            self.prefix_offset = self.read_offset = len(self.ids)
            cut = _first_stop(self.text, self.stop_strings)
            self.text = self.text if cut is None else self.text[:cut]
        self.closed = True
        piece, self.emitted = self.text[self.emitted:], len(self.text)
        return piece


def _first_stop(text: str, stop_strings: list[str], start: int = 0) -> int | None:
    found = [i for s in stop_strings if (i := text.find(s, start)) >= 0]
    return min(found) if found else None


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _prompt_rows(tokenizer, prompts, attention_mask: Tensor | None) -> list[list[int]]:
    """Token id lists, one per prompt, without padding. An empty prompt starts from BOS (else EOS), as
    GPT-2 does for unconditional samples."""
    if isinstance(prompts, Tensor):
        ids = prompts if prompts.dim() == 2 else prompts.unsqueeze(0)
        mask = attention_mask if attention_mask is not None else torch.ones_like(ids)
        if mask.shape != ids.shape:
            raise ConfigError(f"attention_mask shape {tuple(mask.shape)} does not match prompts {tuple(ids.shape)}")
        rows = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu(), strict=True)]
    else:
        texts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not texts:
            raise ConfigError("no prompts given")
        if tokenizer is None:
            raise UserError("text prompts need a tokenizer")
        rows = [tokenizer.encode(t, add_special_tokens=True) for t in texts]
    if not rows:
        raise ConfigError("no prompts given")
    start = None
    if tokenizer is not None:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if any(not r for r in rows) and start is None:
        raise UserError("an empty prompt needs a tokenizer with a BOS or EOS token to start from")
    return [r if r else [start] for r in rows]


def _eos_ids(model, tokenizer, eos_token_id) -> list[int]:
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eos_token_id
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]


def _pad_id(tokenizer, eos_ids: list[int]) -> int:
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    return pad if pad is not None else (eos_ids[0] if eos_ids else 0)


def _accepts(model, argument: str) -> bool:
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _compiled_products(model):
    from flash_experts.generation.compiled import decode_products

    return decode_products(model)


def _dynamic_cache():
    from transformers import DynamicCache

    return DynamicCache()
