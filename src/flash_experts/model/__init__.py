"""Our MoE models, registered with the transformers Auto classes on import."""

from transformers import AutoConfig, AutoModelForCausalLM

from flash_experts.model.config import GPT2MoEConfig, LlamaMoEConfig
from flash_experts.model.gpt2_moe import GPT2MoEForCausalLM
from flash_experts.model.kv_cache import KVCache
from flash_experts.model.llama_moe import LlamaMoEForCausalLM
from flash_experts.model.moe import MoELayer, RouterStats
from flash_experts.model.upcycle import upcycle, upcycle_gpt2

AutoConfig.register(GPT2MoEConfig.model_type, GPT2MoEConfig, exist_ok=True)
AutoModelForCausalLM.register(GPT2MoEConfig, GPT2MoEForCausalLM, exist_ok=True)
AutoConfig.register(LlamaMoEConfig.model_type, LlamaMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(LlamaMoEConfig, LlamaMoEForCausalLM, exist_ok=True)

__all__ = [
    "GPT2MoEConfig",
    "GPT2MoEForCausalLM",
    "KVCache",
    "LlamaMoEConfig",
    "MoELayer",
    "RouterStats",
    "upcycle",
    "upcycle_gpt2",
]
