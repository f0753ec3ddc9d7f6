"""Our MoE models, registered with the transformers Auto classes on import."""

from flash_experts.model import registry  # noqa: F401  (registers our model types with the Auto classes)
from flash_experts.model.config import GPT2MoEConfig, LlamaMoEConfig
from flash_experts.model.gpt2_moe import GPT2MoEForCausalLM
from flash_experts.model.kv_cache import KVCache
from flash_experts.model.llama_moe import LlamaMoEForCausalLM
from flash_experts.model.moe import BatchRouting, MoELayer, MoESettings
from flash_experts.model.upcycle import upcycle, upcycle_gpt2

__all__ = [
    "GPT2MoEConfig",
    "GPT2MoEForCausalLM",
    "KVCache",
    "LlamaMoEConfig",
    "LlamaMoEForCausalLM",
    "MoELayer",
    "MoESettings",
    "BatchRouting",
    "upcycle",
    "upcycle_gpt2",
]
