"""Data: tokenizers, MTG card names, text corpora, and the on-disk token cache trainers read.

    load_tokenizer(source)                      hub id / folder / offline GPT-2 BPE from registry packages
    load_mtg_records(...) -> [CardRecord]       MTGJSON v3/v5 or Arena catalogs, cleaned, one per name
    mtg_documents(records, conditioned) -> {split: [document, ...]} (split_records + format_card)
    split_records, format_card, conditioning_prefix, parse_card_text
    wikitext_documents, wikipedia_documents, text_documents   -> {split: [document, ...]}
    prepare_token_splits(docs_by_split, tokenizer, out_dir)   -> train.bin / val.bin / test.bin + meta.json
    load_split(data_dir, split) -> np.memmap
"""

from flash_experts.data.mtg import (
    CardRecord,
    conditioning_prefix,
    format_card,
    load_mtg_records,
    mtg_documents,
    parse_card_text,
    read_mtg_source,
    split_for_name,
    split_records,
)
from flash_experts.data.text import text_documents, wikipedia_documents, wikitext_documents
from flash_experts.data.tokenizer import load_tokenizer
from flash_experts.data.tokens import load_meta, load_split, prepare_token_splits

__all__ = [
    "CardRecord",
    "conditioning_prefix",
    "format_card",
    "load_meta",
    "load_mtg_records",
    "load_split",
    "load_tokenizer",
    "mtg_documents",
    "parse_card_text",
    "prepare_token_splits",
    "read_mtg_source",
    "split_for_name",
    "split_records",
    "text_documents",
    "wikipedia_documents",
    "wikitext_documents",
]
