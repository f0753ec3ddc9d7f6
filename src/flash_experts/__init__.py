"""flash-experts: GPT-2 (and Llama-family) models upcycled to Mixture-of-Experts, with our Flash Attention."""

from flash_experts.attention import attention, flash_attention
from flash_experts.model import GPT2MoEConfig, GPT2MoEForCausalLM, LlamaMoEConfig, upcycle, upcycle_gpt2

__version__ = "0.1.0"

__all__ = [
    "GPT2MoEConfig",
    "GPT2MoEForCausalLM",
    "LlamaMoEConfig",
    "attention",
    "flash_attention",
    "upcycle",
    "upcycle_gpt2",
]
