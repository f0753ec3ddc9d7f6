"""Text generation: sampling controls, the KV-cache decode loop, output cleaning, MTG card names."""

from flash_experts.generation.cleaning import clean_card_name, clean_text, is_valid_card_name
from flash_experts.generation.generate import CARD_NAME_REGEX, GenerationResult, generate, generate_card_names
from flash_experts.generation.sampling import SamplingConfig, build_processors

__all__ = [
    "CARD_NAME_REGEX",
    "GenerationResult",
    "SamplingConfig",
    "build_processors",
    "clean_card_name",
    "clean_text",
    "generate",
    "generate_card_names",
    "is_valid_card_name",
]
