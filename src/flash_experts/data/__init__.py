"""Data: tokenizers, text corpora, and the on-disk token cache trainers read.

    load_tokenizer(source)                      hub id / folder / offline GPT-2 BPE from registry packages
    wikitext_documents, wikipedia_documents, text_documents   -> {split: [document, ...]}
    prepare_token_splits(docs_by_split, tokenizer, out_dir)   -> train.bin / val.bin / test.bin + meta.json
    load_split(data_dir, split) -> np.memmap
"""

from flash_experts.data.text import text_documents, wikipedia_documents, wikitext_documents
from flash_experts.data.tokenizer import load_tokenizer
from flash_experts.data.tokens import load_meta, load_split, prepare_token_splits

__all__ = [
    "load_meta",
    "load_split",
    "load_tokenizer",
    "prepare_token_splits",
    "text_documents",
    "wikipedia_documents",
    "wikitext_documents",
]
