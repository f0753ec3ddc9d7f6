"""Step 2 of the WikiText chain: the pretrained model beside the one examples/finetune_moe_flash.py fine-tuned.

    python examples/combined_moe_flash.py                          # models/wikitext-moe/best vs its base
    python examples/combined_moe_flash.py --prompt "The history of the" --prompt "In 1998, the band"
    python examples/combined_moe_flash.py --model models/other-run --base gpt2 --max-new-tokens 60

It loads both models, generates from each with several sampling settings (greedy; temperature; top-k with
top-p; a repetition penalty with no repeated trigrams; banned words), cleans and formats the text (special
tokens and tokenizer artifacts out, cut at the last full sentence), and prints them side by side. Then the
`compare` machinery measures both on the same text: WikiText-2 test perplexity (or the training data's
validation split when WikiText-2 is not here), parameters (total and active per token), forward and
generation tokens/s, with a Markdown report and PNG charts in models/wikitext-moe/comparison/.
"""

import argparse
from pathlib import Path

from common import WIKITEXT_MODEL, fine_tuned_model, main, run_config, run_folder_of, tiny

PROMPTS = ["The history of the", "In the early twentieth century,"]
# WikiText's raw text writes "1 @,@ 000" and "well @-@ known": a fine-tuned model learns those markers.
WIKITEXT_MARKERS = ["@-@", "@,@", "@.@"]


def sampling_settings() -> dict:
    from flash_experts.generation import SamplingConfig

    return {
        "greedy": SamplingConfig(temperature=0),
        "temperature 0.8": SamplingConfig(temperature=0.8),
        "top-k 50, top-p 0.9": SamplingConfig(temperature=0.9, top_k=50, top_p=0.9),
        "repetition penalty 1.3, no repeated trigram": SamplingConfig(
            temperature=0.8, top_p=0.95, repetition_penalty=1.3, no_repeat_ngram_size=3),
        "banned words (WikiText's @-@ markers)": SamplingConfig(
            temperature=0.8, top_p=0.95, banned_words=WIKITEXT_MARKERS),
    }


def side_by_side(entries, prompts: list[str], max_new_tokens: int, seed: int) -> str:
    """Every prompt x setting x model, generated with the same seed and cleaned; returned as Markdown."""
    from flash_experts.generation import generate
    from flash_experts.generation.cleaning import clean_text

    lines = ["# Generations side by side", ""]
    for prompt in prompts:
        print(f"\n=== {prompt!r}")
        lines += [f"## {prompt!r}", ""]
        for setting, config in sampling_settings().items():
            print(f"--- {setting}")
            lines += [f"### {setting}", ""]
            for entry in entries:
                result = generate(entry.model, entry.tokenizer, [prompt], config, max_new_tokens, seed=seed)
                text = clean_text(prompt + result.texts[0], sentence_end=True)
                print(f"  [{entry.name}] {text}")
                lines.append(f"- **{entry.name}**: {text}")
            lines.append("")
    return "\n".join(lines) + "\n"


def combined() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(WIKITEXT_MODEL), help=f"fine-tuned model or run (default {WIKITEXT_MODEL})")
    parser.add_argument("--base", default=None, help="the pretrained model (default: the base the run started from)")
    parser.add_argument("--prompt", action="append", default=None, help="a prompt (repeat for several)")
    parser.add_argument("--max-new-tokens", type=int, default=8 if tiny() else 40)
    parser.add_argument("--eval-tokens", type=int, default=256 if tiny() else 4096, help="tokens measured (default 4096)")
    parser.add_argument("--wikitext", default=None, help="WikiText-2 folder or wiki.test.raw (default: found as usual)")
    parser.add_argument("--out", default=None, help="report folder (default MODEL's run folder/comparison)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from flash_experts.errors import UserError
    from flash_experts.evaluation.compare import ModelEntry, compare_models, comparison_table
    from flash_experts.evaluation.perplexity import check_data_tokenizer, load_eval_tokens
    from flash_experts.model.loading import load_model

    for name in ("max_new_tokens", "eval_tokens"):
        if getattr(args, name) < 2:
            raise UserError(f"--{name.replace('_', '-')} must be >= 2, got {getattr(args, name)}")
    tuned_dir = fine_tuned_model(args.model, made_by="finetune_moe_flash.py")
    run = run_folder_of(tuned_dir)
    trained = run_config(run) if run is not None else {}
    base = args.base or (trained.get("model") or {}).get("base")
    if not base:
        raise UserError(f"{tuned_dir} does not say which base it was fine-tuned from: pass --base")
    out = Path(args.out) if args.out else (run or tuned_dir) / "comparison"

    print(f"loading the pretrained {base} and the fine-tuned {tuned_dir}", flush=True)
    base_model, base_tokenizer = load_model(base)
    tuned_model, tuned_tokenizer = load_model(str(tuned_dir))
    if base_tokenizer.get_vocab() != tuned_tokenizer.get_vocab():
        raise UserError(f"{base} and {tuned_dir} use different tokenizers: pass the --base it was fine-tuned from")
    entries = [ModelEntry("pretrained", base_model.eval(), base_tokenizer),
               ModelEntry("fine-tuned MoE", tuned_model.eval(), tuned_tokenizer)]

    samples = side_by_side(entries, args.prompt or PROMPTS, args.max_new_tokens, args.seed)

    try:
        eval_tokens = load_eval_tokens(tuned_tokenizer, wikitext=args.wikitext or True, max_tokens=args.eval_tokens)
        source = "WikiText-2 raw test split"
    except UserError as error:
        data_dir = (trained.get("data") or {}).get("dir")
        if not data_dir or not (Path(data_dir) / "meta.json").is_file():
            raise UserError(f"nothing to measure perplexity on: {error}") from None
        print(f"WikiText-2 not found ({error}): measuring on {data_dir}'s validation split", flush=True)
        check_data_tokenizer(data_dir, tuned_tokenizer)
        eval_tokens = load_eval_tokens(tuned_tokenizer, data_dir=data_dir, split="val", max_tokens=args.eval_tokens)
        source = f"{data_dir} (validation split)"
    context = (trained.get("data") or {}).get("block_size")
    result = compare_models(entries, prompts=(args.prompt or PROMPTS)[:1], eval_tokens=eval_tokens,
                            eval_source=f"{source}, first {eval_tokens.numel():,} tokens", context=context,
                            max_new_tokens=args.max_new_tokens, out_dir=out, quiet=True)
    (out / "generations.md").write_text(samples, encoding="utf-8")

    from rich.console import Console

    Console().print(comparison_table(result))
    for note in result.notes:
        print(f"note: {note}")
    print(f"report: {out / 'report.md'}, generations: {out / 'generations.md'}")


if __name__ == "__main__":
    main(combined)
