"""Llama-family models (Llama, SmolLM2, Mistral, Qwen2) with Mixture-of-Experts MLPs: the HF Mixtral layout.

Parameter names follow Hugging Face's Llama (`model.layers.{i}.self_attn.q_proj.weight`, ...), so a dense
checkpoint maps onto this model name for name. The MLP of each layer in `config.moe_layer_indices()` is an
`MoELayer` of SwiGLU experts (`mlp.router.weight`, `mlp.experts.{w_gate, w_up, w_down}`, stored (in, out)).
RMSNorm and rotary embeddings are transformers' own code, so RoPE variants (llama3, linear, yarn, ...) come
with it; attention goes through our dispatch (`flash_experts.attention`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    repeat_kv,
)

from flash_experts.attention import attention
from flash_experts.errors import ConfigError
from flash_experts.model.common import CausalLMForward
from flash_experts.model.config import LlamaMoEConfig
from flash_experts.model.kv_cache import KVCache, LayerCache
from flash_experts.model.moe import BatchRouting, GroupedExperts, MoELayer, Router


class LlamaAttention(nn.Module):
    """Grouped-query attention: H query heads share Hkv key/value heads (H % Hkv == 0)."""

    def __init__(self, config: LlamaMoEConfig, layer_index: int):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.layer_index = layer_index
        self.config = config
        D, H, Hkv, Dh = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(D, H * Dh, bias=config.attention_bias)
        self.k_proj = nn.Linear(D, Hkv * Dh, bias=config.attention_bias)
        self.v_proj = nn.Linear(D, Hkv * Dh, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=config.o_proj_bias)
        # Attention dropout is not applied (no implementation here supports it); Llama models train without it.

    def forward(self, x_BTD: Tensor, cos_sin: tuple[Tensor, Tensor], key_padding_mask: Tensor | None,
                cache: LayerCache | None) -> Tensor:
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *cos_sin)
        if cache is not None:  # the cache holds the Hkv heads (already rotated): G times less memory than H
            k, v = cache.update(k, v, self.layer_index)
        groups = self.num_heads // self.num_kv_heads
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)  # (B, H, L, Dh)
        y = attention(q, k, v, causal=True, key_padding_mask=key_padding_mask,
                      implementation=self.config.attention_implementation, scale=self.head_dim**-0.5)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    """The dense SwiGLU MLP (kept for the layers that are not MoE): down(act(gate(x)) * up(x))."""

    def __init__(self, config: LlamaMoEConfig):
        super().__init__()
        D, F = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(D, F, bias=config.mlp_bias)
        self.up_proj = nn.Linear(D, F, bias=config.mlp_bias)
        self.down_proj = nn.Linear(F, D, bias=config.mlp_bias)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaMoEConfig, layer_index: int, is_moe: bool):
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_index)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.is_moe = is_moe
        if is_moe:
            self.mlp = MoELayer(
                config.moe_settings(), hidden_size=config.hidden_size, ffn_size=config.intermediate_size,
                activation=ACT2FN[config.hidden_act], gated=True, bias=False, layer_index=layer_index,
            )
        else:
            self.mlp = LlamaMLP(config)

    def forward(self, x: Tensor, cos_sin: tuple[Tensor, Tensor], key_padding_mask: Tensor | None,
                cache: LayerCache | None) -> tuple[Tensor, BatchRouting | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, key_padding_mask, cache)
        if not self.is_moe:
            return x + self.mlp(self.post_attention_layernorm(x)), None
        mlp_out, stats = self.mlp(self.post_attention_layernorm(x))
        return x + mlp_out, stats


class LlamaMoEModel(nn.Module):
    def __init__(self, config: LlamaMoEConfig):
        super().__init__()
        moe_layers = set(config.moe_layer_indices())
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, i in moe_layers) for i in range(config.num_hidden_layers)
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)  # inv_freq is a non-persistent buffer: not in checkpoints


class LlamaMoEForCausalLM(CausalLMForward, PreTrainedModel, GenerationMixin):
    config_class = LlamaMoEConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: LlamaMoEConfig):
        super().__init__(config)
        self.model = LlamaMoEModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # -- HF plumbing ---------------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Llama's initialisation: normal(0, initializer_range) for every matrix, RMSNorm weights 1.

        transformers' base method covers Linear, Embedding, RMSNorm and the rotary buffers; the `init`
        functions leave alone the tensors `from_pretrained` has already loaded.
        """
        super()._init_weights(module)
        # (transformers initialises the modules that own parameters directly, so the MoE parts are handled
        # here rather than through MoELayer, which owns none itself.)
        std = self.config.initializer_range
        if isinstance(module, Router):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, GroupedExperts):
            for weight in (module.w_gate, module.w_up, module.w_down):
                init.normal_(weight, mean=0.0, std=std)

    # -- inference helpers -----------------------------------------------------------------------------------
    def make_cache(self, batch_size: int, max_length: int) -> KVCache:
        """A static KV cache for up to `max_length` positions (prompt + generated), holding the Hkv heads."""
        if max_length > self.config.max_position_embeddings:
            from flash_experts.errors import UserError

            raise UserError(
                f"{max_length} positions requested but the model has {self.config.max_position_embeddings}"
            )
        param = self.get_input_embeddings().weight  # the activations' dtype, whatever the head holds
        return KVCache(self.config.num_hidden_layers, batch_size, self.config.num_key_value_heads, max_length,
                       self.config.head_dim, param.dtype, param.device)

    # -- forward: the backbone here; positions, padding, head and losses in common.py CausalLMForward ------
    def default_cache(self, batch_size: int) -> LayerCache:
        # A growing transformers DynamicCache: a static cache sized for the whole context of a long-context
        # model would waste memory; pass `make_cache(...)` for the preallocated one.
        return DynamicCache()

    def check_length(self, total_length: int) -> None:
        window = self.config.sliding_window
        if window is not None and total_length > window:
            raise ConfigError(
                f"sequence of {total_length} tokens is longer than the model's sliding attention window "
                f"({window}), which is not implemented here"
            )

    def backbone(self, input_ids: Tensor, position_ids: Tensor, key_padding_mask: Tensor | None,
                 cache: LayerCache | None) -> tuple[Tensor, list[BatchRouting]]:
        m = self.model
        x = m.embed_tokens(input_ids)
        cos_sin = m.rotary_emb(x, position_ids)  # each (B, T, Dh), computed once for all layers
        router_stats: list[BatchRouting] = []
        for layer in m.layers:
            x, stats = layer(x, cos_sin, key_padding_mask, cache)
            if stats is not None:
                router_stats.append(stats)
        return m.norm(x), router_stats
