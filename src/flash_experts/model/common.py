"""What both model families share: outputs, losses, positions and padding masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.utils import ModelOutput

from flash_experts.errors import ConfigError
from flash_experts.model.moe import RouterStats


@dataclass
class MoECausalLMOutput(ModelOutput):
    """HF-style causal LM output plus the router's side of the story."""

    loss: Tensor | None = None  # lm_loss + aux_loss: the training objective
    logits: Tensor | None = None
    cache: object | None = None  # the KVCache (transformers >= 5.24 names this field `cache`)
    lm_loss: Tensor | None = None  # mean next-token cross entropy (what perplexity is made of)
    aux_loss: Tensor | None = None  # weighted load-balancing + z-losses, summed over MoE layers
    router_stats: list[RouterStats] | None = None
    hidden_states: Tensor | None = None  # the final hidden states (after the last norm)

    @property
    def past_key_values(self) -> object | None:
        """The older name of `cache`, which most callers (and transformers < 5.24) still use."""
        return self.cache


def causal_lm_loss(logits_BTV: Tensor, labels_BT: Tensor) -> Tensor:
    """Mean cross entropy of predicting token t+1 from position t; labels of -100 are ignored."""
    shift_logits = logits_BTV[:, :-1].reshape(-1, logits_BTV.shape[-1]).float()
    shift_labels = labels_BT[:, 1:].reshape(-1).to(logits_BTV.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


def weighted_router_loss(stats: list[RouterStats], aux_coef: float, z_coef: float, device: torch.device) -> Tensor:
    """Sum over MoE layers of aux_coef * load-balancing loss + z_coef * z-loss (0 for a dense model)."""
    total = torch.zeros((), device=device)
    for layer_stats in stats:
        total = total + aux_coef * layer_stats.load_balancing_loss + z_coef * layer_stats.z_loss
    return total


def positions_and_padding(attention_mask: Tensor | None, position_ids: Tensor | None, past_length: int,
                          batch_size: int, seq_len: int, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Position ids (B, T) and the key padding mask (B, past + T) bool, or None when nothing is padded.

    Without explicit positions, a left-padded row counts positions from its first real token
    (cumsum(mask) - 1), as HF does, so a padded prompt computes what it computes alone.
    """
    key_padding_mask = None
    if attention_mask is not None:
        if attention_mask.shape[-1] != past_length + seq_len:
            raise ConfigError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but the cache holds {past_length} "
                f"and the input {seq_len}"
            )
        attention_mask = attention_mask.to(device)
        if not bool(attention_mask.all()):
            key_padding_mask = attention_mask.bool()
    if position_ids is None:
        if key_padding_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq_len:]
        else:
            position_ids = torch.arange(past_length, past_length + seq_len, device=device).expand(batch_size, -1)
    return position_ids.to(device), key_padding_mask

