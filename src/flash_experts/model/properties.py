"""What callers ask of a causal LM whatever its class (ours, Hugging Face's, quantized): where it lives, how
long a sequence it takes, how many tokens it knows. Generation and evaluation both ask; the answers live here,
below both."""

from __future__ import annotations

import torch


def model_device(model: torch.nn.Module) -> torch.device:
    """Where its parameters live (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def model_max_positions(model: torch.nn.Module) -> int | None:
    """The longest sequence the model's position embeddings allow, from its config (None if unknown)."""
    config = getattr(model, "config", None)
    for field in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_vocab_size(model: torch.nn.Module) -> int | None:
    """The vocabulary size its config names (None if unknown)."""
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    return value if isinstance(value, int) else None


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a clock read after it measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
