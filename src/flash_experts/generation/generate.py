"""The decode loop: batched, left-padded prompts, a KV cache, sampling controls, stop strings, streaming.

Works for our MoE models (a static cache from `model.make_cache`) and for any Hugging Face causal LM (a
`DynamicCache`). Both are called the same way, with positions we compute ourselves so the two behave
identically on padded batches:

    prefill:  the whole left-padded prompt         input_ids (B, P), attention_mask (B, P)
    step t:   the token chosen at step t-1         input_ids (B, 1), attention_mask (B, P + t)

`generate` checks the request and runs the loop; `_ModelSteps` runs the model (prefill, one step), and
`_Stopping` says which rows are done (EOS or a stop string: such rows keep receiving the pad token and are
ignored) and streams their text; the loop ends when every row is done or `max_new_tokens` is reached.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from flash_experts.errors import ConfigError, NonFiniteOutput, UserError
from flash_experts.generation.decode_head import decode_head
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
    prompt_width = max(len(r) for r in rows)
    _check_fits(model, rows, prompt_width, max_new_tokens)
    eos_ids = _eos_ids(model, tokenizer, eos_token_id)
    pad_id = _pad_id(tokenizer, eos_ids)
    stop_token_ids = [ids[0] for s in stop_strings if len(ids := tokenizer.encode(s, add_special_tokens=False)) == 1]
    processors = build_processors(config, tokenizer=tokenizer, prompt_length=prompt_width,
                                  end_token_ids=sorted(set(eos_ids) | set(stop_token_ids)),
                                  vocab_size=model_vocab_size(model))
    ids_BL, mask_BL = _prompt_buffers(rows, prompt_width + max_new_tokens, pad_id, device)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    stopping = _Stopping(tokenizer, rows, stop_strings, stream, eos_ids, device)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            steps = _ModelSteps(model, mask_BL, prompt_width, any(len(r) < prompt_width for r in rows), compile)
            logits_BV = steps.prefill(ids_BL[:, :prompt_width])
            for step in range(max_new_tokens):
                length = prompt_width + step
                if step > 0:
                    logits_BV = steps.step(ids_BL[:, length - 1:length], length)
                # NaN weights give NaN logits: sampling would then fail inside torch, argmax pick garbage. On
                # CPU the check costs nothing; on a GPU it would sync every step, so there the first step
                # (where damaged weights show) is checked and later ones are caught by the final check.
                stopping.nonfinite_B |= ~torch.isfinite(logits_BV).all(dim=-1)
                if (step == 0 or device.type == "cpu") and bool(stopping.nonfinite_B.any()):
                    raise NonFiniteOutput(model, "logits")
                logits_BV = apply_processors(processors, logits_BV, ids_BL[:, :length], mask_BL[:, :length])
                next_B = choose_next_tokens(logits_BV, config, generator)
                next_B = torch.where(stopping.finished_B, torch.full_like(next_B, pad_id), next_B)
                ids_BL[:, length] = next_B
                mask_BL[:, length] = 1
                if stopping.add(next_B, step):
                    break
    finally:
        model.train(was_training)
    if bool(stopping.nonfinite_B.any()):
        raise NonFiniteOutput(model, "logits")
    stopping.flush()
    result = _result(tokenizer, ids_BL[:, prompt_width:].cpu(), stopping.new_counts_B.cpu(), eos_ids,
                     stopping.hit_stop, stop_strings, [len(r) for r in rows])
    if steps.compiled is not None and steps.compiled.failure is None:
        result.compile_seconds = steps.compiled.compile_seconds
    return result


class _ModelSteps:
    """How the model is run: the whole left-padded prompt (prefill), then one token per row (a step), each
    returning the last position's logits (B, V) in fp32.

    Our models decode against their static cache, the logits from the decode loop's own head
    (generation/decode_head.py) or, with `compile`, through the compiled step (generation/compiled.py). Any
    other causal LM runs its own forward against a transformers DynamicCache."""

    def __init__(self, model, mask_BL: Tensor, prompt_width: int, padded: bool, compile: bool):
        self.model, self.mask_BL = model, mask_BL
        batch, total_length = mask_BL.shape
        self.ours = hasattr(model, "make_cache") and hasattr(model, "hidden_states")
        # Without padding (`padded`: a prompt shorter than the widest) the mask stays all ones (finished rows are
        # fed pads marked real), so the model is given none: that spares it a per-step "is anything padded?"
        # check (a device sync).
        self.padded = padded
        self.compiled = None
        if compile and not self.ours:
            warnings.warn(f"compile: {type(model).__name__} is not one of our models; decoding eagerly", stacklevel=3)
        elif compile:
            from flash_experts.generation.compiled import CompiledDecoder, bucketed_length

            cache_length = bucketed_length(total_length, model_max_positions(model))
            self.cache = model.make_cache(batch, cache_length)
            self.compiled = CompiledDecoder(model, self.cache)
            self.key_mask_BC = torch.zeros(batch, cache_length, dtype=torch.bool, device=mask_BL.device)
            self.key_mask_BC[:, :prompt_width] = mask_BL[:, :prompt_width].bool()
        if self.compiled is None:
            self.cache = model.make_cache(batch, total_length) if hasattr(model, "make_cache") else _dynamic_cache()
        # compile: the compiled step's own few-row products; the prompt takes the model's head
        self.head = decode_head(model) if self.ours and not compile else None
        self.positions_B1: Tensor | None = None
        self.extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        # transformers >= 5.24 renamed the cache argument `past_key_values` -> `cache`.
        self.cache_argument = "cache" if _accepts(model, "cache") else "past_key_values"

    def prefill(self, ids_BP: Tensor) -> Tensor:
        positions_BP = (self.mask_BL[:, :ids_BP.shape[1]].cumsum(-1) - 1).clamp(min=0)
        self.positions_B1 = positions_BP[:, -1:]
        return self._forward(ids_BP, positions_BP, ids_BP.shape[1])

    def step(self, ids_B1: Tensor, length: int) -> Tensor:
        """Logits after the tokens `ids_B1`, at position `length - 1` of the buffers."""
        self.positions_B1 = self.positions_B1 + 1
        if self.compiled is not None:
            self.key_mask_BC[:, length - 1] = True
            return self.compiled(ids_B1, self.positions_B1, length - 1, self.key_mask_BC)[:, -1, :].float()
        return self._forward(ids_B1, self.positions_B1, length)

    def _forward(self, ids_BT: Tensor, positions_BT: Tensor, length: int) -> Tensor:
        """Logits after `ids_BT`, whose last token sits at slot `length - 1`."""
        mask = self.mask_BL[:, :length] if self.padded else None
        if self.head is not None:
            hidden_BTD, _ = self.model.hidden_states(ids_BT, mask, positions_BT, self.cache)
            return self.head(hidden_BTD[:, -1:])[:, -1, :].float()
        out = self.model(input_ids=ids_BT, attention_mask=mask, position_ids=positions_BT, use_cache=True,
                         **{self.cache_argument: self.cache}, **self.extra)
        returned_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if returned_cache is not None:
            self.cache = returned_cache
        return out.logits[:, -1, :].float()


class _Stopping:
    """Which rows are done (EOS, a stop string) and the text streamed so far. Rows that finish keep receiving
    the pad token and are ignored; `add` says when every row is done."""

    def __init__(self, tokenizer, rows: list[list[int]], stop_strings: list[str], stream: StreamCallback | None,
                 eos_ids: list[int], device: torch.device):
        batch = len(rows)
        self.texts = [_RowText(tokenizer, row, stop_strings) for row in rows] if (stop_strings or stream) else None
        self.stream = stream
        self.eos_B = torch.tensor(eos_ids or [-1], dtype=torch.long, device=device)
        self.finished_B = torch.zeros(batch, dtype=torch.bool, device=device)
        self.nonfinite_B = torch.zeros(batch, dtype=torch.bool, device=device)
        self.new_counts_B = torch.zeros(batch, dtype=torch.long, device=device)
        self.hit_stop = [False] * batch

    def add(self, next_B: Tensor, step: int) -> bool:
        """Take the tokens chosen at `step`; True when every row is done."""
        self.new_counts_B += ~self.finished_B
        self.finished_B |= torch.isin(next_B, self.eos_B)
        if self.texts is None:
            # Without streaming or stop strings nothing needs the host each step: "is every row done?" (a device
            # sync) is asked every DONE_CHECK_EVERY steps.
            return step % DONE_CHECK_EVERY == DONE_CHECK_EVERY - 1 and bool(self.finished_B.all())
        done = self.finished_B.tolist()  # host-side work: incremental detokenising, stop strings, streaming
        pieces = []
        for i, token in enumerate(next_B.tolist()):
            text = self.texts[i]
            piece, stopped = text.add(token) if not text.closed else ("", False)
            if stopped:
                self.hit_stop[i] = done[i] = True
            if done[i] and not text.closed:  # EOS: flush what was held back
                piece += text.close()
            pieces.append(piece)
        if self.stream is not None and any(pieces):
            self.stream(pieces)
        if any(self.hit_stop):
            self.finished_B |= torch.tensor(self.hit_stop, device=self.finished_B.device)
        return all(done)

    def flush(self) -> None:
        """Stream what rows that ran out of tokens held back."""
        if self.texts is not None and self.stream is not None:
            tail = [t.close() if not t.closed else "" for t in self.texts]
            if any(tail):
                self.stream(tail)


def _check_fits(model, rows: list[list[int]], prompt_width: int, max_new_tokens: int) -> None:
    """The prompt and the new tokens fit the model's positions, and the prompt's ids its vocabulary."""
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


def _prompt_buffers(rows: list[list[int]], total_length: int, pad_id: int, device: torch.device
                    ) -> tuple[Tensor, Tensor]:
    """One preallocated buffer for prompt + generated ids (left-padded prompts, filled left to right: no
    per-step concatenation) and its mask of real tokens."""
    batch, prompt_width = len(rows), max(len(r) for r in rows)
    ids_BL = torch.full((batch, total_length), pad_id, dtype=torch.long)
    mask_BL = torch.zeros(batch, total_length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids_BL[i, prompt_width - len(row):prompt_width] = torch.tensor(row, dtype=torch.long)
        mask_BL[i, prompt_width - len(row):prompt_width] = 1
    return ids_BL.to(device), mask_BL.to(device)


def _result(tokenizer, new_ids_BN: Tensor, counts_B: Tensor, eos_ids: list[int], hit_stop: list[bool],
            stop_strings: list[str], prompt_lengths: list[int]) -> GenerationResult:
    token_ids, texts, reasons = [], [], []
    eos = set(eos_ids)
    for i, count in enumerate(counts_B.tolist()):
        ids = new_ids_BN[i, :count].tolist()
        ended_by_eos = bool(ids) and ids[-1] in eos and not hit_stop[i]
        content = ids[:-1] if ended_by_eos else ids
        text = _text_of(tokenizer, content) if tokenizer is not None else ""
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
        before = _text_of(self.tokenizer, self.ids[self.prefix_offset:self.read_offset])
        after = _text_of(self.tokenizer, self.ids[self.prefix_offset:])
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
            before = _text_of(self.tokenizer, self.ids[self.prefix_offset:self.read_offset])
            after = _text_of(self.tokenizer, self.ids[self.prefix_offset:])
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


def _text_of(tokenizer, ids: list[int]) -> str:
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


def _dynamic_cache():
    from transformers import DynamicCache

    return DynamicCache()
