"""Generation tokens/s at batch 1 and 16: our decode loop vs Hugging Face `generate`, on the same weights.

    python benchmarks/bench_generate.py            # GPT-2 small size (random init), 32-token prompts, 32 new
    python benchmarks/bench_generate.py --quick    # tiny model, a check that everything runs

One dense GPT-2 (HF `GPT2LMHeadModel`, sdpa attention, seed 0) is the source of every contender's weights:
- HF generate: that model, `model.generate(..., use_cache=True)`, greedy, with HF's default dynamic
  cache and with `cache_implementation="static"`; the faster of the two is the reference.
- ours, dense: the same weights in our GPT2MoEForCausalLM with no MoE layers (`moe_layers=[]`), decoded by
  `flash_experts.generation.generate` (static KV cache, no per-token host sync).
- ours, MoE: the same weights upcycled to 8 experts, top-2, every other layer (the same function, twice
  the MLP work in those layers).
- int8 weights (leave out with --no-int8): ours, dense and MoE, after `quantize_int8` (weight-only int8 with
  per-channel scales, `--quantize int8` of our CLI): not the same weights any more, so the target line is
  still the fp32 row's, and the "tokens equal" column shows how far the quantized model's tokens drift.
- bf16 weights (leave out with --no-bf16): HF (static cache) and ours, dense, on the same weights cast to bf16,
  as `flash-experts generate --dtype bf16` runs them; the ratio column still compares with HF's best fp32.
Every contender gets the same prompt tokens and generates exactly --new-tokens tokens per row greedily
(EOS never ends a row early), and the generated tokens are compared with HF's. tokens/s counts generated
tokens (batch x new tokens) over the whole call, prefill included. Contenders run interleaved, one call
each per round; the table reports the median over rounds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_description, markdown_table  # noqa: E402

HF_NAME = "HF generate"
BF16_HF = "HF generate, bf16 weights (static cache)"
BF16_OURS = "ours, dense, bf16 weights"
INT8_OURS = "ours, dense, int8 weight-only"


def build_models(layers: int, embd: int, heads: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    from flash_experts.model import upcycle_gpt2

    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers, n_embd=embd, n_head=heads, attn_implementation="sdpa")
    hf = GPT2LMHeadModel(config).eval()
    assert hf.config._attn_implementation == "sdpa"
    ours_dense = upcycle_gpt2(hf, moe_layers=[]).eval()
    ours_moe = upcycle_gpt2(hf, num_experts=8, top_k=2, moe_layers="every_other").eval()
    return hf, ours_dense, ours_moe


def prompts(batch: int, length: int, vocab: int) -> torch.Tensor:
    """(batch, length) prompt ids: real text when the GPT-2 tokenizer and WikiText are here, else random."""
    try:
        from flash_experts.data.text import find_wikitext_dir
        from flash_experts.data.tokenizer import load_tokenizer

        folder = find_wikitext_dir()
        text = sorted(folder.glob("wiki.*.raw"))[-1].read_text(encoding="utf-8")[:200_000]
        ids = torch.tensor(load_tokenizer().encode(text), dtype=torch.long)
        ids = ids[ids < vocab]
        return torch.stack([ids[i * length:(i + 1) * length] for i in range(batch)])
    except Exception:  # noqa: BLE001 - no tokenizer or text offline: the timing does not depend on it
        return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def hf_call(model, cache_implementation: str | None):
    def run(ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        extra = {"cache_implementation": cache_implementation} if cache_implementation else {}
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=model.config.eos_token_id, **extra)
        return out[:, ids.shape[1]:]
    return run


def ours_call(model):
    from flash_experts.generation import SamplingConfig, generate

    greedy = SamplingConfig(temperature=0.0)

    def run(ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        # eos_token_id=-1: no token ends a row, so exactly `new_tokens` come out, as HF's min_new_tokens does
        result = generate(model, None, ids, greedy, new_tokens, eos_token_id=-1)
        return torch.tensor(result.token_ids)
    return run


def measure(contenders: dict, ids: torch.Tensor, new_tokens: int, rounds: int) -> tuple[dict, dict]:
    outputs = {name: run(ids, new_tokens) for name, run in contenders.items()}  # warm-up + the tokens
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            start = time.perf_counter()
            run(ids, new_tokens)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few tokens: a smoke test")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-bf16", action="store_true", help="leave out the bf16-weights contenders")
    parser.add_argument("--no-int8", action="store_true", help="leave out the int8-weights contenders")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.embd, args.heads, args.new_tokens, args.rounds = 2, 64, 2, 8, 1

    hf, ours_dense, ours_moe = build_models(args.layers, args.embd, args.heads)
    contenders = {
        f"{HF_NAME} (dynamic cache)": hf_call(hf, None),
        f"{HF_NAME} (static cache)": hf_call(hf, "static"),
        "ours, dense (same weights)": ours_call(ours_dense),
        "ours, MoE 8x top-2 (upcycled)": ours_call(ours_moe),
    }
    if not args.no_int8:
        from flash_experts.model.quantize import quantize_int8

        contenders[INT8_OURS] = ours_call(quantize_int8(copy.deepcopy(ours_dense)))
        contenders["ours, MoE, int8 weight-only"] = ours_call(quantize_int8(copy.deepcopy(ours_moe)))
    if not args.no_bf16:
        # The same weights cast to bf16 (`--dtype bf16` of our CLI), for both libraries: half the bytes per
        # decoded token. Their tokens drift from the fp32 ones (a different model numerically).
        contenders[BF16_HF] = hf_call(copy.deepcopy(hf).to(torch.bfloat16), "static")
        contenders[BF16_OURS] = ours_call(copy.deepcopy(ours_dense).to(torch.bfloat16))
    rows, ratio_at_1, bf16_at_1, int8_at_1 = [], None, None, None
    for batch in args.batches:
        ids = prompts(batch, args.prompt_tokens, hf.config.vocab_size)
        seconds, outputs = measure(contenders, ids, args.new_tokens, args.rounds)
        hf_best = min((s, name) for name, s in seconds.items() if name.startswith(HF_NAME) and name != BF16_HF)
        reference = outputs[hf_best[1]]
        for name, s in seconds.items():
            same = (outputs[name] == reference).float().mean().item()
            rows.append([batch, name, f"{s * 1e3:.0f}", f"{batch * args.new_tokens / s:,.1f}",
                         f"{hf_best[0] / s:.2f}x", f"{same:.0%}"])
        if batch == 1:
            ratio_at_1 = hf_best[0] / seconds["ours, dense (same weights)"]
            if INT8_OURS in seconds:
                int8_at_1 = hf_best[0] / seconds[INT8_OURS]
            if BF16_OURS in seconds:
                bf16_at_1 = (hf_best[0] / seconds[BF16_OURS], seconds[BF16_HF] / seconds[BF16_OURS])
        print(f"  batch {batch} done", file=sys.stderr, flush=True)

    print(f"## Generation, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens per row, greedy\n")
    size = " (GPT-2 small)" if (args.layers, args.embd) == (12, 768) else ""
    print(f"- model: {args.layers} layers, d={args.embd}, {args.heads} heads, vocab {hf.config.vocab_size}, "
          f"random init{size}, fp32; the same weights in every contender")
    print(f"- machine: {machine_description()}")
    print(f"- median of {args.rounds} interleaved rounds after one warm-up call each\n")
    print(markdown_table(["batch", "contender", "ms per call", "new tokens/s", "tokens/s vs HF's best",
                          "tokens equal to HF's"], rows))
    if ratio_at_1 is not None:
        verdict = "met" if ratio_at_1 >= 2.0 else "NOT met"
        print(f"\nTarget: ours >= 2x HF generate tokens/s at batch 1 (same weights): {ratio_at_1:.2f}x, {verdict}")
    if int8_at_1 is not None:
        print(f"With int8 weight-only (--quantize int8) at batch 1: ours {int8_at_1:.2f}x HF's best fp32")
    if bf16_at_1 is not None:
        print(f"With bf16 weights at batch 1: ours {bf16_at_1[0]:.2f}x HF's best fp32 and {bf16_at_1[1]:.2f}x HF "
              "generate in bf16 (static cache)")


if __name__ == "__main__":
    main()
