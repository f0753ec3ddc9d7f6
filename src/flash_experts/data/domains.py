"""A multi-domain byte corpus: several kinds of text kept apart, so a model can be scored per domain and its
experts read per domain (the from-scratch race, `flash-experts race`).

Each domain is a stream of UTF-8 bytes per split (documents joined by a blank line), so the vocabulary is the
256 byte values: at that vocabulary the embedding and the LM head are small and the MLPs carry the FLOPs, which
is where a Mixture of Experts differs from a dense model. A training batch takes the same number of rows from
every domain (the remainder rotating from step to step), each row a random window; a batch is a function of
the seed and the step, so two models trained on the same corpus see the same bytes in the same order.

Offline sources: prose (the Wikipedia summaries of `text.wikipedia_documents`) and code (the Python standard
library this interpreter ships, below); card names come from `flash_experts.mtg` (a package above this one),
passed in by the caller as documents like any other domain.
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flash_experts.data.text import SPLITS, hash_split, read_text
from flash_experts.errors import UserError

VOCAB_SIZE = 256  # bytes
META_FILE = "domains.json"
# Parts of the standard library that are not its code: test suites (which quote other languages, binary
# fixtures) and bundled third-party packages.
_SKIPPED_STDLIB_PARTS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


def python_source_documents(root: str | Path | None = None) -> dict[str, list[str]]:
    """The Python standard library's .py files (this interpreter's, unless `root`), one document each, split
    90/5/5 by a hash of the file's path under the root."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIPPED_STDLIB_PARTS.intersection(p.relative_to(root).parts))
    if not files:
        raise UserError(f"no Python source files under {root}")
    splits: dict[str, list[str]] = {split: [] for split in SPLITS}
    for file in files:
        try:
            text = read_text(file)
        except UserError:  # not UTF-8 text (a few files carry other encodings on purpose)
            continue
        if text.strip():
            splits[hash_split(file.relative_to(root).as_posix())].append(text)
    return splits


@dataclass
class DomainCorpus:
    """Byte streams per domain and split: `streams[domain][split]` is a uint8 array."""

    streams: dict[str, dict[str, np.ndarray]]

    @staticmethod
    def from_documents(documents: dict[str, dict[str, list[str]]],
                       max_bytes: dict[str, int] | None = None) -> DomainCorpus:
        """documents[domain][split] -> byte streams, each split cut to at most max_bytes[split] bytes (the
        documents are in a fixed order, so the cut is deterministic)."""
        streams: dict[str, dict[str, np.ndarray]] = {}
        for domain, splits in documents.items():
            streams[domain] = {}
            for split in SPLITS:
                data = "\n\n".join(splits.get(split, [])).encode("utf-8")
                if max_bytes and split in max_bytes:
                    data = data[:max_bytes[split]]
                streams[domain][split] = np.frombuffer(data, dtype=np.uint8).copy()
        return DomainCorpus(streams)

    @property
    def domains(self) -> list[str]:
        return list(self.streams)

    def check(self, context: int) -> None:
        """Every domain needs more than one window of `context` bytes in every split."""
        for domain, splits in self.streams.items():
            for split, stream in splits.items():
                if len(stream) <= context:
                    raise UserError(f"domain {domain!r} has {len(stream)} bytes of {split} text: not more than one "
                                    f"window of {context}")

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for domain, splits in self.streams.items():
            for split, stream in splits.items():
                stream.tofile(folder / f"{domain}.{split}.bin")
        sizes = {domain: {split: int(len(s)) for split, s in splits.items()} for domain, splits in self.streams.items()}
        (folder / META_FILE).write_text(json.dumps({"vocab_size": VOCAB_SIZE, "bytes": sizes}, indent=1))

    @staticmethod
    def load(folder: str | Path) -> DomainCorpus:
        folder = Path(folder)
        try:
            meta = json.loads((folder / META_FILE).read_text())
            streams = {domain: {split: np.fromfile(folder / f"{domain}.{split}.bin", dtype=np.uint8)
                                for split in splits} for domain, splits in meta["bytes"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise UserError(f"{folder} is not a domain corpus ({META_FILE} and its .bin files): {error}") from None
        for domain, splits in meta["bytes"].items():
            for split, size in splits.items():
                if len(streams[domain][split]) != size:
                    raise UserError(f"{folder}: {domain}.{split}.bin holds {len(streams[domain][split])} bytes, "
                                    f"{META_FILE} says {size}")
        return DomainCorpus(streams)

    def train_batch(self, step: int, batch_size: int, context: int, seed: int) -> torch.Tensor:
        """(batch_size, context) int64 windows of training bytes: the same number of rows from each domain
        (domain order rotating by step for the remainder), random offsets from (seed, step)."""
        generator = np.random.default_rng([seed, step])
        domains = self.domains
        rows = []
        for row in range(batch_size):
            stream = self.streams[domains[(row + step) % len(domains)]]["train"]
            start = int(generator.integers(0, len(stream) - context))
            rows.append(stream[start:start + context])
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def split_windows(self, split: str, context: int, count: int) -> dict[str, torch.Tensor]:
        """`windows` of every domain: {domain: (count, context)}."""
        return {domain: self.windows(domain, split, context, count) for domain in self.domains}

    def windows(self, domain: str, split: str, context: int, count: int) -> torch.Tensor:
        """Up to `count` evaluation windows (count, context) of one domain's split, evenly spaced over the whole
        stream (not only its start) and not overlapping, the same for the whole run."""
        stream = self.streams[domain][split]
        available = len(stream) - context
        count = max(1, min(count, len(stream) // context))
        starts = np.linspace(0, available, count).astype(np.int64)
        return torch.from_numpy(np.stack([stream[s:s + context] for s in starts]).astype(np.int64))
