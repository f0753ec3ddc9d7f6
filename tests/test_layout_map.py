"""The one layout map (docs/ARCHITECTURE.md) names every file of the package, and nothing that is not there.

Reference: the package's files on disk (`*.py` under src/flash_experts). The map is read as it is written: in
the block that starts with `src/flash_experts/`, a line's leading names (before its description) are files
(`x.py`) or folders (`x/`), nested by indentation, two spaces a level; deeper lines continue a description.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "flash_experts"
NAME = re.compile(r"^(\w+\.py|\w+/)$")


def map_block(text: str) -> list[str]:
    start = text.index("```\nsrc/flash_experts/\n") + len("```\nsrc/flash_experts/\n")
    return text[start:text.index("```", start)].splitlines()


def mapped_paths(lines: list[str]) -> set[str]:
    """Package-relative paths the map names (folders end with /)."""
    paths, folders = set(), {}  # folders: indentation -> folder path at that depth
    for line in lines:
        indent = len(line) - len(line.lstrip(" "))
        if not line.strip() or indent >= 20:  # a description's continuation
            continue
        names = []
        for token in line.split():
            if not NAME.match(token):
                break
            names.append(token)
        parent = folders.get(indent - 2, "") if indent > 2 else ""
        folders = {depth: path for depth, path in folders.items() if depth < indent}
        for name in names:
            paths.add(parent + name)
            if name.endswith("/"):
                folders[indent] = parent + name
    return paths


def package_paths() -> set[str]:
    files = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")}
    folders = {str(p.relative_to(PACKAGE)) + "/" for p in PACKAGE.rglob("*") if p.is_dir() and (p / "__init__.py").exists()}
    return files | folders


def test_the_map_names_every_file_of_the_package_and_no_other():
    mapped = mapped_paths(map_block((ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")))
    on_disk = package_paths()
    # A package's __init__.py may go unnamed (its folder is named); every other file must be there.
    missing = {p for p in on_disk - mapped if not p.endswith("__init__.py")}
    assert missing == set(), "files the map does not name"
    assert mapped - on_disk == set(), "names in the map that are not files of the package"


def test_the_readme_points_to_the_map_instead_of_keeping_its_own():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/ARCHITECTURE.md" in readme
    assert "```\nsrc/flash_experts/" not in readme


def test_the_reader_follows_nesting_and_descriptions():
    """Reference: a hand-made map with a nested folder, two files on one line and a continued description."""
    lines = [
        "  errors.py               what goes wrong",
        "  model/",
        "    moe.py                the layer; mentions fake.py in words",
        "                          and continues.py here",
        "    quantize/",
        "      int8.py             scales",
        "  cli/",
        "    a.py b.py             verbs",
    ]
    assert mapped_paths(lines) == {"errors.py", "model/", "model/moe.py", "model/quantize/",
                                   "model/quantize/int8.py", "cli/", "cli/a.py", "cli/b.py"}
