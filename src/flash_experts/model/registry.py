"""Our two model types, registered with the transformers Auto classes (`AutoModelForCausalLM.from_pretrained`
then loads our checkpoints). Importing this module registers them; `flash_experts.model` imports it."""

from transformers import AutoConfig, AutoModelForCausalLM

from flash_experts.model.config import GPT2MoEConfig, LlamaMoEConfig
from flash_experts.model.gpt2_moe import GPT2MoEForCausalLM
from flash_experts.model.llama_moe import LlamaMoEForCausalLM

AutoConfig.register(GPT2MoEConfig.model_type, GPT2MoEConfig, exist_ok=True)
AutoModelForCausalLM.register(GPT2MoEConfig, GPT2MoEForCausalLM, exist_ok=True)
AutoConfig.register(LlamaMoEConfig.model_type, LlamaMoEConfig, exist_ok=True)
AutoModelForCausalLM.register(LlamaMoEConfig, LlamaMoEForCausalLM, exist_ok=True)
