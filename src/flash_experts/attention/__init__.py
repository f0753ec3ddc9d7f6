"""Attention: one dispatch over our Flash Attention (PyTorch and Triton), PyTorch SDPA and eager."""

from flash_experts.attention.contract import eager_attention
from flash_experts.attention.dispatch import ATTENTION_IMPLEMENTATIONS, attention
from flash_experts.attention.flash import flash_attention

__all__ = ["ATTENTION_IMPLEMENTATIONS", "attention", "eager_attention", "flash_attention"]
