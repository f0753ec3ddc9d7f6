"""Our Llama-family MoE as one GGUF file for llama.cpp, written with the `gguf` package (llama.cpp's writer).

llama.cpp runs Mixtral-style MoE as its `llama` architecture: per layer a router `ffn_gate_inp` (E, D) and
stacked experts `ffn_{gate,up,down}_exps`, softmax gating, top-k weights renormalised, SiLU. Choices follow
llama.cpp's own converter (`convert_hf_to_gguf.py`, `LlamaModel`):
- q_proj / k_proj rows are permuted: llama.cpp rotates adjacent pairs of a head's dimensions, transformers
  rotates its two halves (`permute` below is that converter's, verbatim in effect);
- norms, 1-D tensors and the router stay float32 in every file type (routing decisions are precision-sensitive);
- the tokenizer is written as llama.cpp's "gpt2" BPE model (vocabulary, merges, special ids via
  `gguf.SpecialVocab`), its pre-tokenizer named by llama.cpp's fingerprint (hash of the ids of a fixed text).
"""

from __future__ import annotations

import json
import tempfile
from hashlib import sha256
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from flash_experts.errors import UserError
from flash_experts.export.common import check_exportable, expert_tensors, fresh_output

GGUF_TYPES = ("f32", "f16", "q8_0")

# llama.cpp's pre-tokenizer fingerprint (conversion/base.py, get_vocab_base_pre): the text and, for the
# tokenizers this project meets, the sha256 of str(token ids) -> the name llama.cpp knows the rules by.
FINGERPRINT_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS = {
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM
}


def permute(weight: Tensor, num_heads: int) -> Tensor:
    """Reorder each head's rows from halves-rotation (transformers) to pairs-rotation (llama.cpp)."""
    return weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape
    )


def pre_tokenizer_name(tokenizer: PreTrainedTokenizerBase) -> str:
    digest = sha256(str(tokenizer.encode(FINGERPRINT_TEXT)).encode()).hexdigest()
    return KNOWN_PRE_TOKENIZERS.get(digest, "default")


def _is_bpe(tokenizer: PreTrainedTokenizerBase | None) -> bool:
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        return False
    return json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"] == "BPE"


def export_gguf(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path, file_type: str = "f16"
                ) -> Path:
    """Write `model` (with its BPE tokenizer) as a GGUF file at `out`, which must not exist."""
    import gguf

    if file_type not in GGUF_TYPES:
        raise UserError(f"GGUF type must be one of {', '.join(GGUF_TYPES)} (got {file_type!r})")
    check_exportable(model, "gguf")
    if not _is_bpe(tokenizer):
        raise UserError("GGUF export writes byte-level BPE tokenizers (GPT-2, SmolLM2); the model folder has none")
    config = model.config
    with fresh_output(Path(out), is_folder=False) as partial:
        writer = gguf.GGUFWriter(str(partial), "llama")
        _write_hyperparameters(writer, config, file_type)
        _write_tokenizer(writer, tokenizer, config.vocab_size)
        for name, tensor in _tensors(model):
            _add_tensor(writer, name, tensor, file_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(out)


def _write_hyperparameters(writer, config, file_type: str) -> None:  # noqa: ANN001
    import gguf

    writer.add_name("flash-experts MoE")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _write_tokenizer(writer, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:  # noqa: ANN001
    """As llama.cpp's converter does (`get_vocab_base`, `_set_vocab_gpt2`): every id up to the model's vocabulary
    size, added special tokens marked CONTROL, unused ids as [PAD{i}] placeholders."""
    import gguf

    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            special = index in added and added[index].special
            types.append(gguf.TokenType.CONTROL if special else
                         gguf.TokenType.USER_DEFINED if index in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as folder:  # SpecialVocab reads merges and special ids from files
        tokenizer.save_pretrained(folder)
        gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer)


@torch.no_grad()
def _tensors(model: PreTrainedModel):
    """(GGUF name, float32 tensor in nn.Linear's (out, in) layout) for every tensor llama.cpp reads."""
    config = model.config
    yield "token_embd.weight", model.model.embed_tokens.weight
    yield "output_norm.weight", model.model.norm.weight
    if not config.tie_word_embeddings:  # llama.cpp falls back to token_embd when output is absent
        yield "output.weight", model.lm_head.weight
    for index, (layer, experts) in enumerate(zip(model.model.layers, expert_tensors(model))):
        attention = layer.self_attn
        block = f"blk.{index}"
        yield f"{block}.attn_norm.weight", layer.input_layernorm.weight
        yield f"{block}.attn_q.weight", permute(attention.q_proj.weight, config.num_attention_heads)
        yield f"{block}.attn_k.weight", permute(attention.k_proj.weight, config.num_key_value_heads)
        yield f"{block}.attn_v.weight", attention.v_proj.weight
        yield f"{block}.attn_output.weight", attention.o_proj.weight
        yield f"{block}.ffn_norm.weight", layer.post_attention_layernorm.weight
        yield f"{block}.ffn_gate_inp.weight", experts.router_ED
        yield f"{block}.ffn_gate_exps.weight", experts.gate_EFD
        yield f"{block}.ffn_up_exps.weight", experts.up_EFD
        yield f"{block}.ffn_down_exps.weight", experts.down_EDF


def _add_tensor(writer, name: str, tensor: Tensor, file_type: str) -> None:  # noqa: ANN001
    import gguf

    data = tensor.detach().float().contiguous().numpy()
    keep_f32 = data.ndim <= 1 or name.endswith("_norm.weight") or ".ffn_gate_inp." in name
    if file_type == "f32" or keep_f32:
        writer.add_tensor(name, data.astype(np.float32))
    elif file_type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        quantized = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:  # f16, and q8_0 rows that are not whole 32-value blocks (llama.cpp's converter does the same)
        writer.add_tensor(name, data.astype(np.float16))
