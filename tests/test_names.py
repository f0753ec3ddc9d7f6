"""Name metrics on hand-made lists with hand-counted validity, uniqueness and novelty."""

from __future__ import annotations

import pytest

from flash_experts.errors import UserError
from flash_experts.mtg.names import evaluate_names, novelty, read_reference_names, uniqueness

REAL = ["Llanowar Elves", "Sword of Fire and Ice", "Séance", "Jace, the Mind Sculptor"]


def test_evaluate_names_hand_counted():
    """Hand-counted: 8 samples, 6 valid, 4 distinct, 2 of them real -> 75%, 66.7%, 50%."""
    raw = [
        " llanowar elves",  # valid, real (case-insensitive)
        "Grove Warden<|endoftext|>",  # valid, new
        "Grove Warden",  # valid, duplicate
        "SEANCE",  # valid, real (accent-insensitive match with "Séance")
        "123 !!",  # invalid
        "Thornweald Archer",  # valid, new
        "",  # invalid
        "GROVE WARDEN",  # valid, duplicate
    ]
    metrics = evaluate_names(raw, REAL)
    assert (metrics.total, metrics.valid, metrics.distinct, metrics.novel) == (8, 6, 4, 2)
    assert metrics.validity == pytest.approx(6 / 8)
    assert metrics.uniqueness == pytest.approx(4 / 6)
    assert metrics.novelty == pytest.approx(2 / 4)
    marks = [(s.name, s.is_new) for s in metrics.unique_names()]
    assert marks == [("Llanowar Elves", False), ("Grove Warden", True), ("Seance", False), ("Thornweald Archer", True)]
    assert metrics.samples[4].name is None and metrics.samples[4].is_new is None
    assert "validity 75.0% (6/8)" in metrics.summary() and "novelty 50.0% (2/4)" in metrics.summary()


def test_metrics_without_reference_and_empty_hand_made():
    """Hand-made edge cases: no reference list means novelty unknown; no samples means zeros."""
    metrics = evaluate_names(["Grove Warden", "grove warden"])
    assert metrics.novelty is None and metrics.novel is None and metrics.uniqueness == 0.5
    assert metrics.unique_names()[0].is_new is None and "n/a" in metrics.summary()
    empty = evaluate_names([], REAL)
    assert (empty.validity, empty.uniqueness, empty.novelty) == (0.0, 0.0, 0.0)


def test_plain_uniqueness_and_novelty_hand_counted():
    """Hand-counted on clean names: 3 of 4 distinct; of those, 1 of 3 is new."""
    names = ["Llanowar Elves", "Séance", "seance", "Grove Warden"]
    assert uniqueness(names) == pytest.approx(3 / 4)
    assert novelty(names, REAL) == pytest.approx(1 / 3)


def test_read_reference_names_file_formats(tmp_path):
    """Hand-made files: plain names and conditioned lines; missing or empty files are UserErrors."""
    path = tmp_path / "names.txt"
    path.write_text("Llanowar Elves\n\nCreature — Elf Druid | G | Fyndhorn Elves\n", encoding="utf-8")
    assert read_reference_names(path) == ["Llanowar Elves", "Fyndhorn Elves"]
    with pytest.raises(UserError, match="not found"):
        read_reference_names(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(UserError, match="no names"):
        read_reference_names(tmp_path / "empty.txt")
