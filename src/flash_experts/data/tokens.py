"""Tokenise once, cache on disk in the nanoGPT layout a trainer memory-maps.

A prepared data folder holds:
    train.bin, val.bin, test.bin   flat token streams (the splits that exist), uint16 when the vocabulary
                                   fits in 16 bits (GPT-2's 50257 does), else uint32; every document is
                                   followed by the tokenizer's EOS token: "doc1<eos>doc2<eos>..."
    meta.json                      source, format, tokenizer (name/path), vocab_size, eos_token_id, dtype,
                                   per split: tokens, documents, sha256 of the documents; inputs_sha256
    tokenizer/                     a copy of the tokenizer (save_pretrained), so readers decode exactly

`load_split(folder, "train")` returns a read-only np.memmap after checking the file against meta.json.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from flash_experts.errors import UserError

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
BATCH_DOCUMENTS = 2048


def _split_name(split: str) -> str:
    try:
        return SPLIT_ALIASES[split.lower()]
    except KeyError:
        raise UserError(f"unknown split {split!r}: use train, val (or valid/validation) or test") from None


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (ids < 65536), uint32 beyond."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def check_output_folder(out_dir: str | Path) -> Path:
    """`out_dir` as a Path, or a UserError when it cannot become a folder (it, or a folder above it, is a file):
    checked before any work, so the error is one sentence and not the OS's at the end of tokenising."""
    out = Path(out_dir)
    for place in (out, *out.parents):
        if place.exists():
            if not place.is_dir():
                where = "is a file" if place == out else f"lies under {place}, which is a file"
                raise UserError(f"--out {out} {where}: give a folder for the token files")
            break
    return out


def prepare_token_splits(documents_by_split: dict[str, list[str]], tokenizer, out_dir: str | Path,
                         *, source: str | None = None, data_format: str | None = None,
                         extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Tokenise every split into `out_dir/<split>.bin` (+ meta.json, tokenizer/); returns the meta dict."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to separate documents")
    splits = {_split_name(name): docs for name, docs in documents_by_split.items()}
    if not splits or not any(splits.values()):
        raise UserError("no documents to tokenise")
    vocab_size = len(tokenizer)
    dtype = token_dtype(vocab_size)
    out = check_output_folder(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)  # a half-written folder must not look complete

    split_meta: dict[str, dict[str, Any]] = {}
    inputs_hash = hashlib.sha256()
    for split in SPLITS:
        target = out / f"{split}.bin"
        if split not in splits:
            target.unlink(missing_ok=True)  # a stale split from an earlier run would contradict meta.json
            continue
        documents = [doc for doc in splits[split] if doc]
        tokens, digest = _write_split(documents, tokenizer, eos_id, dtype, target)
        split_meta[split] = {"tokens": tokens, "documents": len(documents), "sha256": digest}
        inputs_hash.update(f"{split}:{digest}\n".encode())

    tokenizer.save_pretrained(str(out / TOKENIZER_DIR))
    meta = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "format": data_format,
        "tokenizer": str(tokenizer.name_or_path),
        "tokenizer_dir": TOKENIZER_DIR,
        "vocab_size": vocab_size,
        "eos_token_id": int(eos_id),
        "eos_token": tokenizer.eos_token,
        "dtype": dtype.name,
        "splits": split_meta,
        "inputs_sha256": inputs_hash.hexdigest(),
        **(extra_meta or {}),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


def _write_split(documents: list[str], tokenizer, eos_id: int, dtype: np.dtype, target: Path) -> tuple[int, str]:
    """Stream `documents` as ids + EOS into target (via a .partial file); returns (tokens, sha256 of docs)."""
    digest = hashlib.sha256()
    total = 0
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as handle:
        for start in range(0, len(documents), BATCH_DOCUMENTS):
            batch = documents[start:start + BATCH_DOCUMENTS]
            for doc in batch:
                digest.update(doc.encode("utf-8") + b"\0")
            ids = []
            for doc_ids in _encode_batch(tokenizer, batch):
                ids.extend(doc_ids)
                ids.append(eos_id)
            array = np.asarray(ids, dtype=np.int64)
            if array.size and (array.min() < 0 or array.max() >= np.iinfo(dtype).max + 1):
                raise UserError(f"token id {int(array.max())} does not fit {dtype.name}")
            array.astype(dtype).tofile(handle)
            total += array.size
    partial.replace(target)
    return total, digest.hexdigest()


def _encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens; the Rust backend directly when there is one (fast, batched,
    and no "sequence longer than model_max_length" warnings for long documents)."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


def document_start_ids(tokenizer) -> list[int]:
    """The prompt from which a model fine-tuned on these token files writes a new document: an ordinary token
    ("\n"), then the EOS that `prepare_token_splits` writes after every document.

    Why not the EOS alone, or the tokenizer's BOS (where generate() starts an empty prompt): a pretrained model
    makes its first position an attention sink, which says almost nothing to the positions after it, and our
    training windows start at any token. Measured on SmolLM2 fine-tuned on whole cards (docs/CARDS.md): after
    BOS, after EOS and after EOS, EOS the next-token distributions agree to three decimals and are those of the
    middle of a card (" the", "}{", "\n" most likely); after "\n", EOS (or any document's last token, EOS) they
    are those of a name's first letter, and 64 sampled cards parse 100% against 62%. The EOS must sit at the
    second position, after an ordinary token, to be read as a document boundary.
    """
    if tokenizer.eos_token_id is None:
        raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to start a document from")
    return [*tokenizer.encode("\n", add_special_tokens=False), tokenizer.eos_token_id]


def load_meta(data_dir: str | Path) -> dict[str, Any]:
    """meta.json of a prepared data folder (UserError when missing or unreadable)."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: {data_dir} is not a prepared data folder (run `flash-experts prepare-data`)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(meta, dict) or "splits" not in meta or "dtype" not in meta:
        raise UserError(f"{path} is not a flash-experts data meta file (no splits/dtype)")
    return meta


def load_split(data_dir: str | Path, split: str, vocab_size: int | None = None) -> np.ndarray:
    """The split's token stream as a read-only memmap, checked against meta.json (and against a model's
    `vocab_size` when given: every id must be a valid embedding row)."""
    meta = load_meta(data_dir)
    split = _split_name(split)
    path = Path(data_dir) / f"{split}.bin"
    if split not in meta["splits"]:
        available = ", ".join(meta["splits"]) or "none"
        raise UserError(f"{data_dir} has no {split} split (available: {available})")
    if not path.is_file():
        raise UserError(f"{path} is missing although {Path(data_dir) / META_FILE} lists it; re-run prepare-data")
    dtype = np.dtype(meta["dtype"])
    expected = int(meta["splits"][split]["tokens"])
    actual = path.stat().st_size
    if actual != expected * dtype.itemsize:
        raise UserError(
            f"{path} has {actual} bytes but meta.json says {expected} {dtype.name} tokens "
            f"({expected * dtype.itemsize} bytes); re-run prepare-data"
        )
    if vocab_size is not None and int(meta["vocab_size"]) > vocab_size:
        raise UserError(
            f"{data_dir} was tokenised with a vocabulary of {meta['vocab_size']} but the model has {vocab_size}; "
            "prepare the data with the model's tokenizer"
        )
    if expected == 0:
        return np.zeros(0, dtype=dtype)  # np.memmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r")
