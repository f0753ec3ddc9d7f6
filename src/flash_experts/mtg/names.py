"""How good are generated card names? Validity, uniqueness and novelty, and each name marked new or real.

    validity    share of raw samples that clean up into a well-formed card name (`clean_card_name`)
    uniqueness  share of the valid names that are distinct (case- and accent-insensitive)
    novelty     share of the distinct valid names that are not real cards (not in the reference names)

Names are compared by `name_key` (the same key the MTG data uses to deduplicate cards), so "SWORD OF
FIRE AND ICE" and "Sword of Fire and Ice" are one name and "Seance" matches the real "Séance".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from flash_experts.data.tokens import document_start_ids
from flash_experts.errors import ConfigError, UserError
from flash_experts.generation.generate import generate
from flash_experts.generation.sampling import SamplingConfig
from flash_experts.mtg.cards import conditioning_prefix, name_key
from flash_experts.mtg.cleaning import (
    CARD_NAME_FIRST_TOKEN_REGEX,
    CARD_NAME_REGEX,
    MIN_NAME_LETTERS,
    NAME_TEMPERATURE,
    NAME_TOP_P,
    clean_card_name,
)


@dataclass
class NameSample:
    raw: str  # what the model produced
    name: str | None  # the cleaned name, None when invalid
    is_new: bool | None  # not a real card; None when invalid or when there is no reference list
    is_duplicate: bool  # the same name came earlier in this batch


@dataclass
class NameMetrics:
    total: int
    valid: int
    distinct: int
    novel: int | None  # None without reference names
    samples: list[NameSample] = field(default_factory=list)

    @property
    def validity(self) -> float:
        return self.valid / self.total if self.total else 0.0

    @property
    def uniqueness(self) -> float:
        return self.distinct / self.valid if self.valid else 0.0

    @property
    def novelty(self) -> float | None:
        if self.novel is None:
            return None
        return self.novel / self.distinct if self.distinct else 0.0

    def unique_names(self) -> list[NameSample]:
        """The valid names, first occurrence of each, in generation order."""
        return [s for s in self.samples if s.name is not None and not s.is_duplicate]

    def summary(self) -> str:
        novelty = (f"{self.novelty:.1%} ({self.novel}/{self.distinct})" if self.novelty is not None
                   else "n/a (no reference names)")
        return (f"validity {self.validity:.1%} ({self.valid}/{self.total}), "
                f"uniqueness {self.uniqueness:.1%} ({self.distinct}/{self.valid}), novelty {novelty}")


def reference_keys(names: Iterable[str]) -> set[str]:
    return {name_key(n) for n in names if n.strip()}


def validity(raw_samples: list[str]) -> float:
    return evaluate_names(raw_samples).validity


def uniqueness(names: list[str]) -> float:
    """Distinct share of already-clean names (case- and accent-insensitive)."""
    return len({name_key(n) for n in names}) / len(names) if names else 0.0


def novelty(names: list[str], reference_names: Iterable[str]) -> float:
    """Share of the distinct names that are not in `reference_names`."""
    distinct = {name_key(n) for n in names}
    known = reference_keys(reference_names)
    return len(distinct - known) / len(distinct) if distinct else 0.0


def evaluate_names(raw_samples: list[str], reference_names: Iterable[str] | None = None) -> NameMetrics:
    """Clean every raw sample and measure validity, uniqueness and (with reference names) novelty."""
    known = reference_keys(reference_names) if reference_names is not None else None
    seen: set[str] = set()
    samples = []
    novel = 0
    for raw in raw_samples:
        name = clean_card_name(raw)
        if name is None:
            samples.append(NameSample(raw, None, None, False))
            continue
        key = name_key(name)
        duplicate = key in seen
        seen.add(key)
        is_new = None if known is None else key not in known
        if is_new and not duplicate:
            novel += 1
        samples.append(NameSample(raw, name, is_new, duplicate))
    valid = sum(s.name is not None for s in samples)
    return NameMetrics(len(raw_samples), valid, len(seen), None if known is None else novel, samples)


def read_reference_names(path: str | Path) -> list[str]:
    """Names from a text file, one per line; conditioned lines ("type | colors | name") give the name."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"reference names file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"reference names file is not UTF-8 text: {path}") from None
    names = [line.rsplit("|", 1)[-1].strip() for line in lines]
    names = [n for n in names if n]
    if not names:
        raise UserError(f"reference names file has no names: {path}")
    return names


# ----------------------------------------------------------------------------- generating names

def name_sampling_config(**overrides) -> SamplingConfig:
    """The sampling the library uses for card names: NAME_TEMPERATURE, NAME_TOP_P and the three filters of the
    format (card-name characters, a capital first, no end before MIN_NAME_LETTERS letters)."""
    settings = dict(temperature=NAME_TEMPERATURE, top_p=NAME_TOP_P, allowed_regex=CARD_NAME_REGEX,
                    first_token_regex=CARD_NAME_FIRST_TOKEN_REGEX, min_letters=MIN_NAME_LETTERS)
    settings.update(overrides)
    return SamplingConfig(**settings)


def generate_card_names(
    model,
    tokenizer,
    count: int = 20,
    *,
    type_line: str | None = None,
    colors: str | None = None,
    config: SamplingConfig | None = None,
    reference_names=None,
    seed: int | None = None,
    max_new_tokens: int = 16,
    max_rounds: int = 5,
    batch_size: int | None = None,
):
    """Sample MTG card names until `count` distinct valid ones exist (or `max_rounds` batches ran).

    Every sample starts where a document starts in the token files (data/tokens.py `document_start_ids`:
    "\n", EOS; never the tokenizer's BOS, which a pretrained model's first position does not read), then the
    conditioned format's prefix ("Creature — Elf | G |") when a type line is given. Returns the `NameMetrics`
    over every raw sample, with each valid name marked new or real when `reference_names` is given."""
    if not isinstance(count, int) or count < 1:
        raise ConfigError(f"count must be an integer >= 1, got {count!r}")
    if not isinstance(max_rounds, int) or max_rounds < 1:
        raise ConfigError(f"max_rounds must be an integer >= 1, got {max_rounds!r}")
    prefix = conditioning_prefix(type_line, colors)
    prompt = document_start_ids(tokenizer) + (tokenizer.encode(prefix, add_special_tokens=False) if prefix else [])
    config = config or name_sampling_config()
    batch_size = batch_size or min(2 * count, 256)
    reference = list(reference_names) if reference_names is not None else None
    raw: list[str] = []
    for round_index in range(max_rounds):
        result = generate(model, tokenizer, torch.tensor([prompt] * batch_size), config, max_new_tokens, stop_strings=["\n"],
                          seed=None if seed is None else seed + round_index)
        raw.extend(result.texts)
        metrics = evaluate_names(raw, reference)
        if metrics.distinct >= count:
            break
    return metrics


def name_bits_per_character(model: torch.nn.Module, tokenizer: Any, names: Sequence[str]) -> float:
    """Held-out names scored as the model writes them: each name's tokens and the EOS after it, predicted from
    the document start ("\n", EOS: `document_start_ids`), in bits, over the names' characters plus one each
    for the end (as test bits per character counts the newline an EOS stands for). Lower is better; it reads
    the same start the sampled names come from."""
    if not names:
        raise ConfigError("name_bits_per_character needs at least one name")
    start, eos = document_start_ids(tokenizer), tokenizer.eos_token_id
    rows = sorted((start + tokenizer.encode(name, add_special_tokens=False) + [eos] for name in names), key=len)
    nats, first = 0.0, len(start)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for begin in range(0, len(rows), 64):
                group = rows[begin:begin + 64]
                for length in sorted({len(r) for r in group}):  # equal lengths: one batch, no padding
                    ids = torch.tensor([r for r in group if len(r) == length])
                    logits = model(input_ids=ids).logits[:, first - 1:-1].double()
                    nats -= logits.log_softmax(-1).gather(-1, ids[:, first:, None]).sum().item()
    finally:
        model.train(was_training)
    return nats / math.log(2) / sum(len(name) + 1 for name in names)


# ----------------------------------------------------------------------------- choosing the sampling

# The name targets of issue 11: valid, distinct and new at least this often.
MIN_VALIDITY, MIN_UNIQUENESS, MIN_NOVELTY = 0.95, 0.95, 0.90


@dataclass
class SamplingTrial:
    temperature: float
    top_p: float
    metrics: NameMetrics  # over every selection sample of this setting

    @property
    def margin(self) -> float:
        """How far the setting clears the nearest of the three targets (negative: it misses one)."""
        m = self.metrics
        return min(m.validity - MIN_VALIDITY, m.uniqueness - MIN_UNIQUENESS, (m.novelty or 0.0) - MIN_NOVELTY)

    @property
    def qualifies(self) -> bool:
        return self.margin >= 0


def select_name_sampling(model, tokenizer, reference_names: list[str], *, temperatures: Iterable[float],
                         top_ps: Iterable[float] = (NAME_TOP_P,), count: int = 200,
                         seeds: Iterable[int] = (1000,)) -> tuple[SamplingTrial | None, list[SamplingTrial]]:
    """Choose temperature and top-p for card names on selection samples: `count` names per seed for every
    setting of the grid (the card-name filters of `name_sampling_config` always on). The rule: of the settings that meet all three
    targets (validity, uniqueness, novelty), the one that clears the nearest target by the widest margin,
    ties to the higher temperature, then the higher top-p. Lower temperatures trade distinct names for valid
    ones; a setting chosen for its validity alone sits at the uniqueness bar, where the noise of a few hundred
    fresh samples puts it below as often as above. Returns the chosen trial (None when no setting meets the
    targets) and every trial.

    The seeds must not be the ones whose samples are reported: names scored on the samples that chose the
    setting would be scored on their own selection."""
    trials = []
    for temperature in temperatures:
        for top_p in top_ps:
            config = name_sampling_config(temperature=temperature, top_p=top_p)
            raw = []
            for seed in seeds:
                metrics = generate_card_names(model, tokenizer, count, config=config, seed=seed, max_rounds=1,
                                              batch_size=count)
                raw += [s.raw for s in metrics.samples]
            trials.append(SamplingTrial(temperature, top_p, evaluate_names(raw, reference_names)))
    eligible = [t for t in trials if t.qualifies]
    chosen = max(eligible, key=lambda t: (round(t.margin, 9), t.temperature, t.top_p)) if eligible else None
    return chosen, trials


# The temperatures a model chooses its card-name sampling from (top-p 1.0, the name filters on).
NAME_TEMPERATURES = (0.5, 0.6, 0.7, 0.8)


def choose_name_sampling(model, tokenizer, reference_names: list[str], *, count: int = 200,
                         seed: int = 1337) -> tuple[Any, SamplingTrial | None, list[SamplingTrial]]:
    """The main job's per-model choice: `select_name_sampling` over NAME_TEMPERATURES on `count` selection
    names of seed + 1 (never the seed whose names are reported). Returns the sampling config to report with
    (the library's default where no setting met the targets), the chosen trial (or None) and every trial.

    A model trained for minutes is less sure of the format than the one that chose the library's default, and
    names scored on the samples that chose their setting would flatter it."""
    chosen, trials = select_name_sampling(model, tokenizer, reference_names, temperatures=NAME_TEMPERATURES,
                                          count=count, seeds=(seed + 1,))
    config = name_sampling_config(**({"temperature": chosen.temperature, "top_p": chosen.top_p} if chosen else {}))
    return config, chosen, trials
