"""Generation tokens/s at batch 1 and 16: our decode loop vs Hugging Face `generate` (and llama.cpp), same weights.

    python benchmarks/bench_generate.py                    # GPT-2 small size (random init)
    python benchmarks/bench_generate.py --model smollm2    # the offline SmolLM2-135M, with the llama.cpp rows
    python benchmarks/bench_generate.py --quick            # tiny model, a check that everything runs

One dense model (HF `GPT2LMHeadModel` at seed 0, or SmolLM2-135M's `LlamaForCausalLM`; sdpa attention) is the
source of every contender's weights:
- HF generate: that model, `model.generate(..., use_cache=True)`, greedy, with HF's default dynamic
  cache and with `cache_implementation="static"`; the faster of the two is the reference.
- ours, dense: the same weights in our model class with no MoE layers (`upcycle(..., moe_layers=[])`),
  decoded by `flash_experts.generation.generate` (static KV cache, no per-token host sync).
- ours, MoE: the same weights upcycled to 8 experts, top-2, every other layer (the same function, twice
  the MLP work in those layers; at batch 1 only the two chosen experts' weights are read).
- int8 / int4 weights (`--quantize` chooses; `--quantize` alone: neither): ours, dense and MoE, after
  `flash_experts.model.quantize.quantize` (`--quantize int8|int4` of our CLI): not the same weights any more,
  so the "tokens equal" column shows how far the quantized model's tokens drift.
- bf16 weights (leave out with --no-bf16): HF (static cache) and ours, dense, on the same weights cast to bf16,
  as `flash-experts generate --dtype bf16` runs them.
- llama.cpp (`--model smollm2`, batch 1, when llama-cpp-python is installed; llama_cpp_peer.py): the offline
  Q4_1 file re-encoded to F16 and Q8_0 and the file itself, greedy through its Python API, same threads.
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
DENSE = "ours, dense (same weights)"
MOE = "ours, MoE 8x top-2 (upcycled)"
BF16_OURS = "ours, dense, bf16 weights"
QUANTIZED_OURS = "ours, dense, {} weight-only"
QUANTIZED_MOE = "ours, MoE, {} weight-only"
LLAMA_CPP = "llama.cpp {}"


def build_models(args):
    """(HF dense model, tokenizer or None, our dense copy, our upcycled MoE), all on the same weights."""
    from flash_experts.model import upcycle

    if args.model == "smollm2":
        from flash_experts.model.loading import load_smollm2

        hf, tokenizer = load_smollm2(dtype=torch.float32)
        hf.config._attn_implementation = "sdpa"
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        hf = GPT2LMHeadModel(GPT2Config(n_layer=args.layers, n_embd=args.embd, n_head=args.heads,
                                        attn_implementation="sdpa"))
        tokenizer = None
    hf = hf.eval()
    assert hf.config._attn_implementation == "sdpa"
    ours_dense = upcycle(hf, moe_layers=[]).eval()
    ours_moe = upcycle(hf, num_experts=8, top_k=2, moe_layers="every_other").eval()
    return hf, tokenizer, ours_dense, ours_moe


def prompts(batch: int, length: int, vocab: int, tokenizer=None) -> torch.Tensor:
    """(batch, length) prompt ids: real text when a tokenizer and WikiText are here, else random."""
    try:
        from flash_experts.data.text import find_wikitext_dir
        from flash_experts.data.tokenizer import load_tokenizer

        folder = find_wikitext_dir()
        text = sorted(folder.glob("wiki.*.raw"))[-1].read_text(encoding="utf-8")[:200_000]
        ids = torch.tensor((tokenizer or load_tokenizer()).encode(text), dtype=torch.long)
        ids = ids[ids < vocab]
        return torch.stack([ids[i * length:(i + 1) * length] for i in range(batch)])
    except Exception:  # noqa: BLE001 - no tokenizer or text offline: the timing does not depend on it
        return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))


def hf_call(model, cache_implementation: str | None):
    pad = model.config.eos_token_id
    pad = pad[0] if isinstance(pad, list) else pad

    def run(ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        extra = {"cache_implementation": cache_implementation} if cache_implementation else {}
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=pad, **extra)
        return out[:, ids.shape[1]:]
    return run


def ours_call(model, compile: bool = False):
    from flash_experts.generation import SamplingConfig, generate

    greedy = SamplingConfig(temperature=0.0)

    def run(ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        # eos_token_id=-1: no token ends a row, so exactly `new_tokens` come out, as HF's min_new_tokens does
        result = generate(model, None, ids, greedy, new_tokens, eos_token_id=-1, compile=compile)
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


def contenders_for(args, hf, ours_dense, ours_moe, llama_cpp_folder: Path) -> tuple[dict, list[str]]:
    """The contenders by name, and the notes on any that were left out."""
    from flash_experts.model.quantize import quantize

    contenders = {
        f"{HF_NAME} (dynamic cache)": hf_call(hf, None),
        f"{HF_NAME} (static cache)": hf_call(hf, "static"),
        DENSE: ours_call(ours_dense),
        MOE: ours_call(ours_moe),
    }
    for scheme in args.quantize:
        contenders[QUANTIZED_OURS.format(scheme)] = ours_call(quantize(copy.deepcopy(ours_dense), scheme))
        contenders[QUANTIZED_MOE.format(scheme)] = ours_call(quantize(copy.deepcopy(ours_moe), scheme))
    if not args.no_bf16:
        # The same weights cast to bf16 (`--dtype bf16` of our CLI), for both libraries: half the bytes per
        # decoded token. Their tokens drift from the fp32 ones (a different model numerically).
        contenders[BF16_HF] = hf_call(copy.deepcopy(hf).to(torch.bfloat16), "static")
        contenders[BF16_OURS] = ours_call(copy.deepcopy(ours_dense).to(torch.bfloat16))
    # The compiled decode step (`--compile` of our CLI): its first call, in the warm-up, compiles.
    for name in args.compile:
        if name in contenders and not name.startswith(("HF", "llama.cpp")):
            source = {DENSE: ours_dense, MOE: ours_moe}.get(name)
            if source is None:  # a quantized or bf16 contender: rebuild the same model for its compiled twin
                scheme = next((q for q in ("int8", "int4") if q in name), None)
                source = ours_moe if name.startswith("ours, MoE") else ours_dense
                source = (quantize(copy.deepcopy(source), scheme) if scheme
                          else copy.deepcopy(source).to(torch.bfloat16))
            contenders[f"{name}, compiled"] = ours_call(source, compile=True)
    notes = []
    if args.model == "smollm2" and not args.no_llama_cpp:
        from flash_experts.model.loading import smollm2_gguf_path
        from llama_cpp_peer import LLAMA_CPP_FORMATS, llama_cpp_call, llama_cpp_missing, reencoded_gguf

        missing = llama_cpp_missing()
        if missing:
            notes.append(f"llama.cpp rows skipped: {missing}")
        else:
            context = args.prompt_tokens + args.new_tokens + 8
            for fmt in LLAMA_CPP_FORMATS:
                path = reencoded_gguf(smollm2_gguf_path(), fmt, llama_cpp_folder)
                contenders[LLAMA_CPP.format(fmt)] = llama_cpp_call(path, context, torch.get_num_threads())
    return contenders, notes


def verdicts(seconds: dict, hf_best: float, model: str) -> list[str]:
    """The issue's targets at batch 1, as ratios of tokens/s measured in this run."""
    def best(name: str) -> str:
        """`name` or its compiled twin, whichever ran faster."""
        twins = [n for n in (name, f"{name}, compiled") if n in seconds]
        return min(twins, key=seconds.get) if twins else name

    def ratio(faster: str, slower: str | float, eager: bool = False) -> float | None:
        faster = faster if eager else best(faster)
        if isinstance(slower, str) and slower.startswith("ours") and not eager:
            slower = best(slower)
        base = slower if isinstance(slower, float) else seconds.get(slower)
        if faster not in seconds or base is None:
            return None
        lines_used.append(faster)
        return base / seconds[faster]

    def line(text: str, value: float | None, target: float | None) -> None:
        if value is None:
            return
        verdict = "" if target is None else f" (target >= {target}x: {'met' if value >= target else 'NOT met'})"
        compiled = " [compiled step]" if lines_used and lines_used[-1].endswith("compiled") else ""
        lines.append(f"- {text}{compiled}: {value:.2f}x{verdict}")

    lines: list[str] = []
    lines_used: list[str] = []
    line("ours fp32 vs HF generate's best fp32 (same weights)", ratio(DENSE, hf_best), 2.0)
    line("ours bf16 vs HF generate bf16", ratio(BF16_OURS, BF16_HF), None)
    for scheme in ("int8", "int4"):
        line(f"ours {scheme} vs HF generate's best fp32", ratio(QUANTIZED_OURS.format(scheme), hf_best), None)
    if model == "smollm2":
        line("ours int8 vs llama.cpp Q8_0", ratio(QUANTIZED_OURS.format("int8"), LLAMA_CPP.format("Q8_0")), 0.8)
        line("ours bf16 vs llama.cpp F16", ratio(BF16_OURS, LLAMA_CPP.format("F16")), 1.0)
        line("ours int4 vs llama.cpp Q4_1", ratio(QUANTIZED_OURS.format("int4"), LLAMA_CPP.format("Q4_1")), None)
    # The MoE against its dense source: both eager, then each at its best (compiled where that ran faster;
    # quantized MoE experts decode eagerly).
    line("MoE top-2 vs its dense source, fp32, both eager", ratio(MOE, DENSE, eager=True), None)
    line("MoE top-2 vs its dense source, fp32, each at its best", ratio(MOE, DENSE), 0.8)
    for scheme in ("int8", "int4"):
        moe, dense = QUANTIZED_MOE.format(scheme), QUANTIZED_OURS.format(scheme)
        line(f"MoE top-2 vs its dense source, {scheme}, both eager", ratio(moe, dense, eager=True), None)
        line(f"MoE top-2 vs its dense source, {scheme}, each at its best", ratio(moe, dense), None)
    return lines


def weights_read_per_token(model) -> int:
    """Parameters a batch-1 decode step reads: all of them but the experts its tokens do not choose (and the
    embedding rows not looked up, which a tied LM head reads anyway)."""
    from flash_experts.model.moe import GroupedExperts

    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, GroupedExperts):
            unchosen = 1 - model.config.num_experts_per_tok / module.num_experts
            total -= round(unchosen * sum(p.numel() for p in module.parameters()))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few tokens: a smoke test")
    parser.add_argument("--model", choices=["gpt2-small", "smollm2"], default="gpt2-small",
                        help="gpt2-small: random init of GPT-2 small's size; smollm2: the offline SmolLM2-135M "
                             "(real weights, and the llama.cpp rows)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quantize", nargs="*", default=["int8", "int4"], choices=["int8", "int4"],
                        help="weight-only schemes to run (default both; none: --quantize)")
    parser.add_argument("--no-bf16", action="store_true", help="leave out the bf16-weights contenders")
    parser.add_argument("--compile", nargs="*", default=None, metavar="CONTENDER",
                        help="contenders of ours to run a second time with the compiled decode step (default: "
                             "ours dense in every precision and the fp32 MoE; --compile alone: none)")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave out the llama.cpp rows (smollm2)")
    parser.add_argument("--llama-cpp-dir", type=Path, default=Path("runs/bench_generate_gguf"),
                        help="where the re-encoded GGUF files are kept between runs (made once)")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.embd, args.heads, args.new_tokens, args.rounds = 2, 64, 2, 8, 1
    args.llama_cpp_dir.mkdir(parents=True, exist_ok=True)
    if args.compile is None:
        args.compile = [DENSE, MOE, BF16_OURS, *(QUANTIZED_OURS.format(q) for q in args.quantize)]

    hf, tokenizer, ours_dense, ours_moe = build_models(args)
    contenders, notes = contenders_for(args, hf, ours_dense, ours_moe, args.llama_cpp_dir)
    rows, verdict_lines = [], []
    for batch in args.batches:
        ids = prompts(batch, args.prompt_tokens, hf.config.vocab_size, tokenizer)
        # llama.cpp's Python API decodes one sequence at a time: its rows are for batch 1 only.
        running = {name: run for name, run in contenders.items() if batch == 1 or not name.startswith("llama.cpp")}
        seconds, outputs = measure(running, ids, args.new_tokens, args.rounds)
        hf_best = min((s, name) for name, s in seconds.items() if name.startswith(HF_NAME) and name != BF16_HF)
        reference = outputs[hf_best[1]]
        for name, s in seconds.items():
            same = (outputs[name] == reference).float().mean().item()
            rows.append([batch, name, f"{s * 1e3:.0f}", f"{batch * args.new_tokens / s:,.1f}",
                         f"{hf_best[0] / s:.2f}x", f"{same:.0%}"])
        if batch == 1:
            verdict_lines = verdicts(seconds, hf_best[0], args.model)
        print(f"  batch {batch} done", file=sys.stderr, flush=True)

    print(f"## Generation, {args.prompt_tokens}-token prompts, {args.new_tokens} new tokens per row, greedy\n")
    if args.model == "smollm2":
        print(f"- model: SmolLM2-135M (offline GGUF, dequantized to fp32), {hf.config.num_hidden_layers} layers, "
              f"d={hf.config.hidden_size}; the same weights in every contender; MoE: upcycled to 8 experts, "
              "top-2, every other layer")
    else:
        size = " (GPT-2 small)" if (args.layers, args.embd) == (12, 768) else ""
        print(f"- model: {args.layers} layers, d={args.embd}, {args.heads} heads, vocab {hf.config.vocab_size}, "
              f"random init{size}, fp32; the same weights in every contender")
    print(f"- machine: {machine_description()}")
    print(f"- median of {args.rounds} interleaved rounds after one warm-up call each")
    for note in notes:
        print(f"- {note}")
    print()
    print(markdown_table(["batch", "contender", "ms per call", "new tokens/s", "tokens/s vs HF's best fp32",
                          "tokens equal to HF's"], rows))
    if verdict_lines:
        print("\nAt batch 1, tokens/s ratios:")
        print("\n".join(verdict_lines))
        read = weights_read_per_token(ours_moe) / weights_read_per_token(ours_dense)
        print(f"- the MoE reads {read:.3f}x its dense source's weights per token: at the memory-bandwidth limit it "
              f"decodes at most {1 / read:.2f}x as fast")


if __name__ == "__main__":
    main()
