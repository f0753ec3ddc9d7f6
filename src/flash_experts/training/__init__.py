"""Training: config, the loop, checkpoints, data parallelism, tracking.

    from flash_experts.training import load_config, train
    result = train(load_config("configs/mtg_moe.yaml", ["optim.max_steps=100"]), resume="auto")
    print(result.best_val_ppl, result.run_dir)

Names are imported on first use, so that reading a config does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "train": "trainer", "TrainResult": "trainer", "TrainingDiverged": "trainer", "build_model": "trainer",
    "TrainConfig": "config", "load_config": "config", "save_config": "config",
    "find_latest": "checkpoint", "load_trainer_state": "checkpoint",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
