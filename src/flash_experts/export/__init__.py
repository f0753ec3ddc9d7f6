"""Our models in other formats: a vanilla transformers Mixtral folder, and GGUF for llama.cpp."""

from flash_experts.export.common import check_exportable, expert_tensors
from flash_experts.export.gguf import GGUF_TYPES, export_gguf
from flash_experts.export.mixtral import export_mixtral, to_mixtral

__all__ = ["GGUF_TYPES", "check_exportable", "expert_tensors", "export_gguf", "export_mixtral", "to_mixtral"]
