"""What the example scripts share: where each one leaves its output for the next, the base model, errors.

The two chains, run from the repository root (or any folder: every path is relative to where you run them):

    MTG names   prepare_mtg_data.py  -> data/mtg/          finetune_mtg_names.py -> models/mtg-names/
                generate_mtg_names.py, generate_names.py   read models/mtg-names/best
    WikiText    finetune_moe_flash.py -> data/wikitext/, models/wikitext-moe/
                combined_moe_flash.py reads models/wikitext-moe/best and the base it was fine-tuned from

`data/` holds prepared token files, `models/` trained models (one run folder each, its best checkpoint in
`best/`). Every script takes `--data`/`--out`/`--model` to use other places.

Set FLASH_EXPERTS_EXAMPLES_TINY=1 for a seconds-long run of the same code (the tests do, with a tiny base).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn

# Before torch loads, the process set up as the command line sets it up (cpu_memory.py); errors turned into one
# line exactly as the `flash-experts` verbs turn them (errors.py `report_errors`).
from flash_experts.cpu_memory import keep_cpu_memory_between_steps, share_cores_while_waiting

keep_cpu_memory_between_steps()
share_cores_while_waiting()

from flash_experts.errors import UserError, report_errors  # noqa: E402

DATA = Path("data")
MODELS = Path("models")
MTG_DATA = DATA / "mtg"
MTG_MODEL = MODELS / "mtg-names"
MTG_CARDS_DATA = DATA / "mtg-cards"
MTG_CARDS_MODEL = MODELS / "mtg-cards"
WIKITEXT_DATA = DATA / "wikitext"
WIKITEXT_MODEL = MODELS / "wikitext-moe"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
REAL_CARDS_FILE = "cards.json"  # every real whole card's fields, beside the card documents' token files
CARD_NAMES_FILE = "card_names.txt"  # every real name, beside the MTG token files: novelty is judged against it
os.environ.setdefault("WANDB_SILENT", "true")  # the scripts print what matters; W&B still writes its files


def main(body: Callable[[], int | None]) -> NoReturn:
    """Run a script's body with the command line's error handling: one `error:` line and exit code 2."""
    sys.exit(report_errors(body))


def pick_base(requested: str) -> str:
    """The base model as `flash-experts demo` chooses it (hub gpt2 when the hub answers, else SmolLM2)."""
    from flash_experts.model.loading import choose_base

    base, why = choose_base(requested)
    print(f"base model: {base} ({why})", flush=True)
    return base


def fine_tuned_model(path: str | Path, made_by: str) -> Path:
    """The model a fine-tuning script left in `path`: the folder itself when it is a model, else its best
    checkpoint, else its latest checkpoint; a one-line error naming the script to run otherwise."""
    from flash_experts.training.checkpoint import find_latest

    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "best" / "config.json").is_file():
        return path / "best"
    latest = find_latest(path) if path.is_dir() else None
    if latest is not None:
        return latest
    raise UserError(f"no fine-tuned model in {path}: run examples/{made_by} first (or name another model folder)")


def refuse_to_overwrite(run_dir: Path, resume: bool) -> None:
    """Saved work is never lost: a run folder that already holds a run is continued only when asked."""
    if not resume and (run_dir / "config.yaml").exists():
        raise UserError(f"{run_dir} already holds a run: pass --resume to continue it, or --out DIR for a new one")


def run_config(run_dir: Path) -> dict[str, Any]:
    """The training config a run folder was trained with ({} when the folder has none)."""
    import yaml

    file = run_dir / "config.yaml"
    if not file.is_file():
        return {}
    return yaml.safe_load(file.read_text(encoding="utf-8")) or {}


def tiny() -> bool:
    """FLASH_EXPERTS_EXAMPLES_TINY=1: tiny sizes (read when asked, so one process can run the scripts both ways)."""
    return os.environ.get("FLASH_EXPERTS_EXAMPLES_TINY", "") == "1"


def laptop_defaults(laptop: list[str], tiny_sizes: list[str], full: bool) -> list[str]:
    """The script's own sizes for its config: laptop-sized (none with --full), tiny under
    FLASH_EXPERTS_EXAMPLES_TINY=1. They change the config like its file would; the user's overrides win, and
    a max_steps below these warm-up steps shortens the warm-up (training.config.load_config)."""
    return [*([] if full else laptop), *(tiny_sizes if tiny() else [])]


def run_folder_of(model: Path) -> Path | None:
    """The run folder a checkpoint belongs to (`run/best`, `run/checkpoints/step-…`): the nearest folder
    above it with the trainer's config.yaml."""
    for folder in (model, *model.parents[:3]):
        if (folder / "config.yaml").is_file():
            return folder
    return None


def mtg_training_data(model: Path) -> tuple[bool, list[str]]:
    """(conditioned, real card names) for a model of the MTG chain: read from the data folder its run trained
    on. A model from elsewhere: plain names, judged against the offline card data."""
    from flash_experts.data.tokens import load_meta
    from flash_experts.mtg.cards import load_mtg_records

    run = run_folder_of(model)
    data_dir = (run_config(run).get("data") or {}).get("dir") if run is not None else None
    if data_dir and (Path(data_dir) / "meta.json").is_file():
        names_file = Path(data_dir) / CARD_NAMES_FILE
        conditioned = load_meta(data_dir).get("format") == "mtg-conditioned"
        if names_file.is_file():
            return conditioned, names_file.read_text(encoding="utf-8").splitlines()
        return conditioned, [record.name for record in load_mtg_records()]
    return False, [record.name for record in load_mtg_records()]
