"""GPT-2 with Mixture-of-Experts MLPs and pluggable attention: attention, MLP, block and the backbone
(embeddings -> blocks -> final norm) here; the causal-LM wrapper around the backbone (positions, padding, the
head, the router losses) is `model/common.py`'s `CausalLMForward`, shared with the Llama family.

Parameter names and layouts follow Hugging Face's GPT-2 (`transformer.h.{i}.attn.c_attn.weight` is a
Conv1D (in, out) matrix, ...), so a dense GPT-2 checkpoint maps onto this model name for name. The MLP of
each layer listed in `config.moe_layer_indices()` is an `MoELayer` instead.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from flash_experts.attention import attention
from flash_experts.errors import ConfigError
from flash_experts.model.common import CausalLMForward
from flash_experts.model.config import GPT2MoEConfig
from flash_experts.model.kv_cache import KVCache, LayerCache
from flash_experts.model.moe import BatchRouting, GroupedExperts, MoELayer, Router


def activation_fn(name: str):
    """HF's activation by name, except GPT-2's `gelu_new`: the same tanh approximation as one fused kernel
    (`F.gelu(approximate="tanh")`) instead of five elementwise ops: one pass over the activations instead of five."""
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return functools.partial(F.gelu, approximate="tanh")
    return ACT2FN[name]

class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2MoEConfig, layer_index: int):
        super().__init__()
        self.num_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.layer_index = layer_index
        self.c_attn = Conv1D(3 * config.n_embd, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        scale = 1.0 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_index + 1
        self.scale = scale
        self.config = config
        # qk_norm: one LayerNorm over the head dimension for queries, one for keys, shared by the heads
        self.q_norm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_epsilon) if config.qk_norm else None
        self.k_norm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_epsilon) if config.qk_norm else None
        # Attention dropout is not applied (no implementation here supports it); resid/embd dropout are.

    def forward(self, x_BTD: Tensor, key_padding_mask: Tensor | None, cache: LayerCache | None) -> Tensor:
        B, T, D = x_BTD.shape
        q, k, v = self.c_attn(x_BTD).split(D, dim=2)
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_index)
        y = attention(q, k, v, causal=True, key_padding_mask=key_padding_mask,
                      implementation=self.config.attention_implementation, scale=self.scale)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.resid_dropout(self.c_proj(y))


class GPT2MLP(nn.Module):
    """The dense MLP (kept for the layers that are not MoE)."""

    def __init__(self, config: GPT2MoEConfig):
        super().__init__()
        self.c_fc = Conv1D(config.intermediate_size, config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.intermediate_size)
        self.act = activation_fn(config.activation_function)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2MoEConfig, layer_index: int, is_moe: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_index)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.is_moe = is_moe
        if is_moe:
            self.mlp = MoELayer(
                config.moe_settings(), hidden_size=config.n_embd, ffn_size=config.intermediate_size,
                activation=activation_fn(config.activation_function), gated=False, bias=True, layer_index=layer_index,
            )
            self.mlp_dropout = nn.Dropout(config.resid_pdrop)
        else:
            self.mlp = GPT2MLP(config)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None, cache: LayerCache | None
                ) -> tuple[Tensor, BatchRouting | None]:
        x = x + self.attn(self.ln_1(x), key_padding_mask, cache)
        if not self.is_moe:
            return x + self.mlp(self.ln_2(x)), None
        mlp_out, stats = self.mlp(self.ln_2(x))
        return x + self.mlp_dropout(mlp_out), stats


class GPT2MoEModel(nn.Module):
    def __init__(self, config: GPT2MoEConfig):
        super().__init__()
        moe_layers = set(config.moe_layer_indices())
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(GPT2Block(config, i, i in moe_layers) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)


class GPT2MoEForCausalLM(CausalLMForward, PreTrainedModel, GenerationMixin):
    config_class = GPT2MoEConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _no_split_modules = ["GPT2Block"]
    _supports_sdpa = True

    def __init__(self, config: GPT2MoEConfig):
        super().__init__(config)
        self.transformer = GPT2MoEModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    # -- HF plumbing ---------------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """GPT-2's initialisation (normal(0, 0.02); residual projections scaled by 1/sqrt(2 * n_layer))."""
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        if isinstance(module, (nn.Linear, Conv1D)):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        # (transformers initialises modules that own parameters directly, so the MoE parts are handled here
        # rather than through MoELayer, which owns none itself.)
        elif isinstance(module, Router):
            module.weight.normal_(0.0, std)
        elif isinstance(module, GroupedExperts):
            module.w_up.normal_(0.0, std)
            module.w_down.normal_(0.0, residual_std)
            module.b_up.zero_()
            module.b_down.zero_()
        if isinstance(module, (GPT2Attention, GPT2MLP)):
            module.c_proj.weight.normal_(0.0, residual_std)

    # -- inference helpers -----------------------------------------------------------------------------------
    def make_cache(self, batch_size: int, max_length: int) -> KVCache:
        """A static KV cache for up to `max_length` positions (prompt + generated)."""
        if max_length > self.config.n_positions:
            from flash_experts.errors import UserError

            raise UserError(f"{max_length} positions requested but the model has {self.config.n_positions}")
        param = self.transformer.wte.weight  # the activations' dtype, whatever the head holds
        return KVCache(self.config.n_layer, batch_size, self.config.n_head, max_length,
                       self.config.n_embd // self.config.n_head, param.dtype, param.device)

    # -- forward: the backbone here; positions, padding, head and losses in common.py CausalLMForward ------
    def default_cache(self, batch_size: int) -> KVCache:
        return self.make_cache(batch_size, self.config.n_positions)

    def check_length(self, total_length: int) -> None:
        if total_length > self.config.n_positions:
            raise ConfigError(
                f"sequence of {total_length} tokens is longer than the model's {self.config.n_positions} positions"
            )

    def backbone(self, input_ids: Tensor, position_ids: Tensor, key_padding_mask: Tensor | None,
                 cache: LayerCache | None) -> tuple[Tensor, list[BatchRouting]]:
        t = self.transformer
        x = t.drop(t.wte(input_ids) + t.wpe(position_ids))
        router_stats: list[BatchRouting] = []
        for block in t.h:
            x, stats = block(x, key_padding_mask, cache)
            if stats is not None:
                router_stats.append(stats)
        return t.ln_f(x), router_stats
