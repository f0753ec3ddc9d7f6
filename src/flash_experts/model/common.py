"""What both model families share: outputs, losses, positions and padding masks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.utils import ModelOutput

from flash_experts.errors import ConfigError
from flash_experts.model.kv_cache import LayerCache
from flash_experts.model.moe import BatchRouting

# Arguments transformers' own callers pass to a causal LM that change nothing here; any other unknown keyword
# is a TypeError (a misspelled `attention_mask` must not be swallowed).
IGNORED_HF_ARGUMENTS = frozenset({"return_dict", "output_attentions", "output_hidden_states", "cache_position",
                                  "num_items_in_batch"})


@dataclass
class MoECausalLMOutput(ModelOutput):
    """HF-style causal LM output plus the router's side of the story."""

    loss: Tensor | None = None  # lm_loss + aux_loss: the training objective
    logits: Tensor | None = None
    cache: LayerCache | None = None  # the KV cache (transformers >= 5.24 names this field `cache`)
    lm_loss: Tensor | None = None  # mean next-token cross entropy (what perplexity is made of)
    aux_loss: Tensor | None = None  # weighted load-balancing + z-losses, summed over MoE layers
    router_stats: list[BatchRouting] | None = None
    hidden_states: Tensor | None = None  # the final hidden states (after the last norm)

    @property
    def past_key_values(self) -> LayerCache | None:
        """The older name of `cache`, which most callers (and transformers < 5.24) still use."""
        return self.cache


def causal_lm_loss(logits_BTV: Tensor, labels_BT: Tensor) -> Tensor:
    """Mean cross entropy of predicting token t+1 from position t; labels of -100 are ignored."""
    shift_logits = logits_BTV[:, :-1].reshape(-1, logits_BTV.shape[-1]).float()
    shift_labels = labels_BT[:, 1:].reshape(-1).to(logits_BTV.device)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)


def weighted_router_loss(stats: list[BatchRouting], aux_coef: float, z_coef: float, device: torch.device) -> Tensor:
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



class CausalLMForward:
    """The causal-LM forward both families share, around the family's own `backbone` (embeddings -> blocks ->
    final norm): the cache arguments, positions and padding, the LM head with `logits_to_keep`, the router
    losses and the output. A family provides `backbone`, `default_cache` and `check_length`."""

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        labels: Tensor | None = None,
        past_key_values: LayerCache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        cache: LayerCache | None = None,
        **hf_arguments: object,
    ) -> MoECausalLMOutput:
        """input_ids (B, T); attention_mask (B, past + T), 1 = real token; labels (B, T), -100 = ignore.

        `logits_to_keep` > 0 computes logits only for the last that many positions (decoding needs one).
        The cache comes as `past_key_values` or (transformers >= 5.24) `cache`; with `use_cache` and none
        given, the family's default cache is made.
        """
        unknown = set(hf_arguments) - IGNORED_HF_ARGUMENTS
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward() got unexpected keyword argument(s): "
                            f"{', '.join(sorted(unknown))}")
        given = past_key_values if past_key_values is not None else cache
        cache = given if given is not None or not use_cache else self.default_cache(input_ids.shape[0])
        x, router_stats = self.hidden_states(input_ids, attention_mask, position_ids, cache)
        logits = self.lm_head(x[:, -logits_to_keep:] if logits_to_keep else x)

        aux_loss = weighted_router_loss(
            router_stats, self.config.router_aux_loss_coef, self.config.router_z_loss_coef, x.device
        )
        lm_loss = loss = None
        if labels is not None:
            lm_loss = causal_lm_loss(logits, labels)
            loss = lm_loss + aux_loss
        return MoECausalLMOutput(
            loss=loss, logits=logits, cache=cache if use_cache or given is not None else None,
            lm_loss=lm_loss, aux_loss=aux_loss, router_stats=router_stats, hidden_states=x,
        )

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      position_ids: Tensor | None = None, cache: LayerCache | None = None
                      ) -> tuple[Tensor, list[BatchRouting]]:
        """The forward without the head: the final hidden states (B, T, D) and what each MoE layer's router did.
        The decode loop applies its own head to the last position (generation/decode_head.py)."""
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        self.check_length(past + T)
        position_ids, key_padding_mask = positions_and_padding(
            attention_mask, position_ids, past, B, T, input_ids.device
        )
        return self.backbone(input_ids, position_ids, key_padding_mask, cache)

    def flops_per_token(self, context: int, training: bool = False) -> float:
        """Matrix-product FLOPs per token of windows of `context` tokens: the forward's (model/flops.py says
        what is counted), or with `training` the whole step's (forward and backward, 3x). A contest at equal
        compute (flash_experts/contest) budgets its contenders with it."""
        from flash_experts.model.flops import TRAINING_MULTIPLE, forward_flops_per_token

        forward = forward_flops_per_token(self, context)
        return TRAINING_MULTIPLE * forward if training else forward

    def save_pretrained(self, save_directory: str | Path, *args: object, **kwargs: object) -> None:
        """transformers' `save_pretrained`, plus the modeling code and `auto_map` (see `remote_code`), so the
        folder loads with `trust_remote_code=True` where this package is not installed."""
        from flash_experts.model.remote_code import write_modeling_code

        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        stored_as = getattr(self.config, "quantization_config", None)
        if isinstance(stored_as, dict) and stored_as.get("quant_method") == "gguf":
            # A leftover of a GGUF-loaded source (checkpoints upcycled before this was dropped at upcycling):
            # the weights here are floats, and transformers would look for that GGUF file on loading.
            del self.config.quantization_config
        self.config.auto_map = write_modeling_code(type(self), type(self.config), folder)
        super().save_pretrained(save_directory, *args, **kwargs)

    def default_cache(self, batch_size: int) -> LayerCache:
        raise NotImplementedError

    def check_length(self, total_length: int) -> None:
        raise NotImplementedError

    def backbone(self, input_ids: Tensor, position_ids: Tensor, key_padding_mask: Tensor | None,
                 cache: LayerCache | None) -> tuple[Tensor, list[BatchRouting]]:
        raise NotImplementedError
