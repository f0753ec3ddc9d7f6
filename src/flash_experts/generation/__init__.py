"""Text generation: sampling controls, the KV-cache decode loop, output cleaning (card names: `flash_experts.mtg`)."""

from flash_experts.generation.cleaning import clean_text
from flash_experts.generation.generate import GenerationResult, generate
from flash_experts.generation.sampling import SamplingConfig, build_processors

__all__ = [
    "GenerationResult",
    "SamplingConfig",
    "build_processors",
    "clean_text",
    "generate",
]
