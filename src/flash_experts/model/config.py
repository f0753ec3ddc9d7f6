"""Configurations of our MoE models: HF-compatible `PretrainedConfig`s with validated MoE settings.

Both families (GPT-2 and Llama) share one set of Mixture-of-Experts fields, defined once in `MoESettings`
(model/moe.py) and validated once in `validate_moe_fields`. Every invalid value raises a `ValueError` that
names the field.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from flash_experts.attention.dispatch import ATTENTION_IMPLEMENTATIONS
from flash_experts.errors import ConfigError
from flash_experts.model.moe import MoESettings

# The attention every layer runs (attention/dispatch.py); "auto" is the fastest measured for the device.
DEFAULT_ATTENTION = "auto"


def _moe_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the MoE fields (`MoESettings`) and the attention choice out of `kwargs`, so the rest can go to
    PretrainedConfig, with their defaults. `top_k` is accepted as another name for `num_experts_per_tok`."""
    if "top_k" in kwargs:
        kwargs["num_experts_per_tok"] = kwargs.pop("top_k")
    fields = {name: kwargs.pop(name, getattr(MoESettings, name)) for name in MoESettings.names()}
    fields["attention_implementation"] = kwargs.pop("attention_implementation", DEFAULT_ATTENTION)
    return fields


def resolve_moe_layers(moe_layers: str | list[int] | tuple[int, ...], num_layers: int | None) -> list[int]:
    """Turn the `moe_layers` setting into a sorted list of layer indices, or raise ConfigError.
    `num_layers=None` (the depth not known yet): the indices are checked, a preset resolves to []."""
    if isinstance(moe_layers, str):
        if moe_layers in ("all", "every_other") and num_layers is None:
            return []
        if moe_layers == "all":
            return list(range(num_layers))
        if moe_layers == "every_other":
            return list(range(1, num_layers, 2))
        raise ConfigError(f"moe_layers must be 'all', 'every_other' or a list of layer indices (got {moe_layers!r})")
    if not isinstance(moe_layers, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in moe_layers
    ):
        raise ConfigError(f"moe_layers must be 'all', 'every_other' or a list of layer indices (got {moe_layers!r})")
    for index in moe_layers:
        if index < 0 or (num_layers is not None and index >= num_layers):
            raise ConfigError(f"moe_layers index {index} is out of range for a model of {num_layers} layers")
    if len(set(moe_layers)) != len(moe_layers):
        raise ConfigError(f"moe_layers has repeated indices: {list(moe_layers)}")
    return sorted(moe_layers)


def validate_moe_fields(config: Any, num_layers: int | None) -> None:
    """Check every MoE field of `config` (a model config, or the trainer's moe section, which uses the same
    names); raise a ConfigError naming the first bad one. `num_layers=None`: layer indices are checked
    against the depth later, when the base is loaded."""

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not is_int(config.num_experts) or config.num_experts < 1:
        raise ConfigError(f"num_experts must be an integer >= 1 (got {config.num_experts!r})")
    top_k = config.num_experts_per_tok
    if not is_int(top_k) or top_k < 1:
        raise ConfigError(f"num_experts_per_tok (top_k) must be an integer >= 1 (got {top_k!r})")
    if top_k > config.num_experts:
        raise ConfigError(f"num_experts_per_tok (top_k) = {top_k} must be <= num_experts ({config.num_experts})")
    for name in ("router_aux_loss_coef", "router_z_loss_coef", "router_jitter", "capacity_factor"):
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or value != value:
            raise ConfigError(f"{name} must be a number >= 0 (got {value!r})")
    if config.router_jitter >= 1:
        raise ConfigError(f"router_jitter must be < 1 (got {config.router_jitter!r})")
    if config.moe_intermediate_size is not None and (not is_int(config.moe_intermediate_size)
                                                     or config.moe_intermediate_size < 1):
        raise ConfigError(f"moe_intermediate_size must be an integer >= 1 or null (got {config.moe_intermediate_size!r})")
    shared = config.shared_expert_intermediate_size
    if not is_int(shared) or shared < 0:
        raise ConfigError(f"shared_expert_intermediate_size must be an integer >= 0 (got {shared!r})")
    for name in ("normalize_top_k", "router_detach_input", "renormalize_through_sum"):
        if not isinstance(getattr(config, name), bool):
            raise ConfigError(f"{name} must be true or false (got {getattr(config, name)!r})")
    if config.renormalize_through_sum and (top_k < 2 or not config.normalize_top_k):
        # top-1 through the sum is p / p = 1: the router would get no gradient from the language-model loss
        raise ConfigError(f"renormalize_through_sum needs normalize_top_k and num_experts_per_tok >= 2 (got top-{top_k}, "
                          f"normalize_top_k {config.normalize_top_k}): top-1's weight would be p / p = 1, no gradient")
    attention = getattr(config, "attention_implementation", "auto")  # the trainer keeps it in model.attention
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(
            f"attention_implementation must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)} (got {attention!r})"
        )
    resolve_moe_layers(config.moe_layers, num_layers)


class MoEConfigMixin:
    """The MoE helpers shared by both families' configs."""

    num_experts: int
    num_experts_per_tok: int
    moe_layers: str | list[int]

    def moe_layer_indices(self) -> list[int]:
        return resolve_moe_layers(self.moe_layers, self.num_hidden_layers)  # type: ignore[attr-defined]

    def moe_settings(self) -> MoESettings:
        """The MoE fields, as the layers read them."""
        return MoESettings.of(self)


class GPT2MoEConfig(MoEConfigMixin, PretrainedConfig):
    """GPT-2's configuration plus the MoE fields (see `MoESettings`)."""

    model_type = "gpt2_moe"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
    }

    def __init__(
        self,
        vocab_size: int = 50257,
        n_positions: int = 1024,
        n_embd: int = 768,
        n_layer: int = 12,
        n_head: int = 12,
        n_inner: int | None = None,
        activation_function: str = "gelu_new",
        resid_pdrop: float = 0.1,
        embd_pdrop: float = 0.1,
        attn_pdrop: float = 0.1,
        layer_norm_epsilon: float = 1e-5,
        initializer_range: float = 0.02,
        scale_attn_weights: bool = True,
        scale_attn_by_inverse_layer_idx: bool = False,
        qk_norm: bool = False,
        bos_token_id: int = 50256,
        eos_token_id: int = 50256,
        tie_word_embeddings: bool = True,
        **kwargs: Any,
    ) -> None:
        moe = _moe_kwargs(kwargs)
        self.vocab_size = vocab_size
        self.n_positions = n_positions
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        self.n_inner = n_inner
        self.activation_function = activation_function
        self.resid_pdrop = resid_pdrop
        self.embd_pdrop = embd_pdrop
        self.attn_pdrop = attn_pdrop
        self.layer_norm_epsilon = layer_norm_epsilon
        self.initializer_range = initializer_range
        self.scale_attn_weights = scale_attn_weights
        self.scale_attn_by_inverse_layer_idx = scale_attn_by_inverse_layer_idx
        # A LayerNorm over each head's queries and keys before their product (not in GPT-2; Dehghani et al. 2023,
        # Wortsman et al. 2023): the attention logits cannot grow without bound, the instability of small models
        # at high learning rates. Off for every GPT-2 checkpoint; the race's twins use it (docs/FROM_SCRATCH.md).
        self.qk_norm = qk_norm
        self.__dict__.update(moe)
        # GPT-2 checkpoints carry fields we do not use (summary_*, reorder_and_upcast_attn, ...): keep them
        # so that a round trip does not lose them.
        kwargs.pop("model_type", None)
        super().__init__(
            bos_token_id=bos_token_id, eos_token_id=eos_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs
        )
        for name, value in (("n_layer", n_layer), ("n_embd", n_embd), ("n_head", n_head), ("vocab_size", vocab_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1 (got {value!r})")
        if n_embd % n_head:
            raise ConfigError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        validate_moe_fields(self, n_layer)

    @property
    def intermediate_size(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd


class LlamaMoEConfig(MoEConfigMixin, PretrainedConfig):
    """A Llama-family configuration plus the MoE fields: the HF Mixtral layout (SwiGLU experts).

    RoPE settings live in `rope_parameters` (transformers 5: {"rope_type": ..., "rope_theta": ..., ...}), which
    transformers' own `LlamaRotaryEmbedding` reads; the older `rope_theta` / `rope_scaling` arguments are
    folded into it. `attention_out_bias` (None = same as `attention_bias`) covers Qwen2, whose q/k/v
    projections have biases but whose output projection has none. `sliding_window` is carried so that a
    Mistral model refuses sequences longer than its window (our attention has no window).
    """

    model_type = "llama_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 576,
        intermediate_size: int = 1536,
        num_hidden_layers: int = 30,
        num_attention_heads: int = 9,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 2048,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-5,
        rope_parameters: dict[str, Any] | None = None,
        rope_theta: float | None = None,
        attention_bias: bool = False,
        attention_out_bias: bool | None = None,
        mlp_bias: bool = False,
        sliding_window: int | None = None,
        tie_word_embeddings: bool = True,
        **kwargs: Any,
    ) -> None:
        moe = _moe_kwargs(kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = _standard_rope_parameters(rope_parameters, kwargs.pop("rope_scaling", None), rope_theta)
        self.attention_bias = attention_bias
        self.attention_out_bias = attention_out_bias
        self.mlp_bias = mlp_bias
        self.sliding_window = sliding_window
        self.__dict__.update(moe)
        kwargs.pop("model_type", None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        for name, value in (("num_hidden_layers", num_hidden_layers), ("hidden_size", hidden_size),
                            ("num_attention_heads", num_attention_heads), ("vocab_size", vocab_size)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1 (got {value!r})")
        if num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        validate_moe_fields(self, num_hidden_layers)
        if mlp_bias and self.moe_layer_indices():
            raise ConfigError("mlp_bias: SwiGLU experts have no biases, so a model with MLP biases cannot have MoE layers")

    @property
    def o_proj_bias(self) -> bool:
        return self.attention_bias if self.attention_out_bias is None else self.attention_out_bias


def _standard_rope_parameters(rope_parameters: dict[str, Any] | None, rope_scaling: dict[str, Any] | None,
                              rope_theta: float | None) -> dict[str, Any]:
    """One flat transformers-5 `rope_parameters` dict from the new or the legacy (rope_theta, rope_scaling) form."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = dict(rope_parameters or rope_scaling or {})
    rope.setdefault("rope_type", rope.pop("type", "default"))
    rope.setdefault("rope_theta", rope_theta if rope_theta is not None else 10000.0)
    if rope["rope_type"] != "default" and rope["rope_type"] not in ROPE_INIT_FUNCTIONS:
        raise ConfigError(
            f"rope_parameters: unknown rope_type {rope['rope_type']!r} "
            f"(known: default, {', '.join(sorted(ROPE_INIT_FUNCTIONS))})"
        )
    return rope
