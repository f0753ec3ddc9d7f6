"""`export --format mixtral|gguf`: our Llama-family MoE in formats other tools load.

References: transformers' own `MixtralForCausalLM` class (logits of the exported folder), the GGUF file read
back with the `gguf` package's reader, and llama.cpp itself through llama-cpp-python where it is installed
(greedy tokens of the GGUF file).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM, MixtralForCausalLM

from conftest import tiny_gpt2_config
from flash_experts.errors import UserError
from flash_experts.export import expert_tensors, export_gguf, export_mixtral
from flash_experts.export.common import fresh_output
from flash_experts.export.gguf import permute
from flash_experts.model import upcycle
from test_llama_moe import randomize, tiny_llama_config
from tiny_tokenizer import make_tokenizer

LAYER_PATTERNS = [("all", 2), ("every_other", 1), ("every_other", 2), ([0], 2), ([1, 2], 3)]


def trained_like_moe(moe_layers="every_other", top_k=2, tie=False, vocab=256) -> torch.nn.Module:
    """An upcycled model whose experts and routers all differ (random), as after fine-tuning: exports must map
    each expert to its own place, which identical copies would not show."""
    torch.manual_seed(0)
    dense = LlamaForCausalLM(tiny_llama_config(vocab_size=vocab, tie_word_embeddings=tie))
    return randomize(upcycle(dense, num_experts=4, top_k=top_k, moe_layers=moe_layers)).eval()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("pattern", LAYER_PATTERNS, ids=lambda p: f"{p[0]}-top{p[1]}")
def test_mixtral_export_computes_our_logits(tmp_path, pattern, tie):
    moe = trained_like_moe(*pattern, tie=tie)
    export_mixtral(moe, None, tmp_path / "mixtral")
    mixtral = MixtralForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    assert type(mixtral) is MixtralForCausalLM and mixtral.config.num_local_experts == 4
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = moe(ids).logits, mixtral(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_mixtral_export_greedy_equals_ours(tmp_path):
    moe = trained_like_moe()
    export_mixtral(moe, None, tmp_path / "mixtral")
    mixtral = MixtralForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    ids = torch.randint(2, 256, (1, 6), generator=torch.Generator().manual_seed(2))
    settings = dict(max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=1)
    assert torch.equal(mixtral.generate(ids, **settings), moe.generate(ids, **settings))


@pytest.mark.parametrize("change, message", [
    (dict(capacity_factor=1.25), "capacity_factor"),
    (dict(router_jitter=0.01), "router_jitter"),
    (dict(normalize_top_k=False), "normalize_top_k"),
    (dict(shared_expert_intermediate_size=16), "a shared expert"),
    (dict(moe_intermediate_size=8), "one feed-forward size"),
])
def test_settings_mixtral_cannot_hold_are_refused(tmp_path, change, message):
    moe = trained_like_moe()
    for key, value in change.items():
        setattr(moe.config, key, value)
    with pytest.raises(UserError, match=message):
        export_mixtral(moe, None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gpt2_moe_and_dense_models_are_refused_with_the_reason(tmp_path):
    gpt2_moe = upcycle(GPT2LMHeadModel(tiny_gpt2_config()), num_experts=2, top_k=1)
    with pytest.raises(UserError, match="remote code"):
        export_mixtral(gpt2_moe, None, tmp_path / "a")
    with pytest.raises(UserError, match="remote code"):
        export_gguf(gpt2_moe, make_tokenizer(), tmp_path / "a.gguf")
    with pytest.raises(UserError, match="llama_moe"):
        export_mixtral(LlamaForCausalLM(tiny_llama_config()), None, tmp_path / "b")
    with pytest.raises(UserError, match="no MoE layer"):
        export_mixtral(trained_like_moe(moe_layers=[]), None, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_nothing_and_an_existing_output_is_never_touched(tmp_path):
    with pytest.raises(RuntimeError):
        with fresh_output(tmp_path / "out", is_folder=True) as partial:
            (partial / "half-written.safetensors").write_bytes(b"\0" * 10)
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").write_text("earlier work")
    with pytest.raises(UserError, match="already exists"):
        export_gguf(trained_like_moe(vocab=300), make_tokenizer(), tmp_path / "kept")
    assert (tmp_path / "kept").read_text() == "earlier work"


# -- GGUF -----------------------------------------------------------------------------------------------------

def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer")}
    tensors = {t.name: t for t in reader.tensors}
    return reader, fields, tensors


def test_gguf_file_holds_our_tensors_in_llama_cpp_layout(tmp_path):
    """Read back with gguf's reader: hyperparameters, and every f32 tensor equal to ours (q/k permuted as
    llama.cpp's converter permutes them; experts stacked (E, out, in); dense layers as identical experts)."""
    tokenizer = make_tokenizer()
    moe = trained_like_moe(vocab=len(tokenizer))
    export_gguf(moe, tokenizer, tmp_path / "m.gguf", "f32")
    reader, fields, tensors = read_gguf(tmp_path / "m.gguf")
    config = moe.config
    assert fields["general.architecture"] == "llama"
    assert fields["llama.expert_count"] == 4 and fields["llama.expert_used_count"] == 2
    assert fields["llama.block_count"] == config.num_hidden_layers
    assert fields["llama.attention.head_count_kv"] == config.num_key_value_heads

    def array(name):
        tensor = tensors[name]
        return np.asarray(tensor.data).reshape([int(n) for n in reversed(tensor.shape)])

    np.testing.assert_array_equal(array("token_embd.weight"), moe.model.embed_tokens.weight.detach().numpy())
    layers = list(expert_tensors(moe))
    for index, layer in enumerate(moe.model.layers):
        q = layer.self_attn.q_proj.weight.detach()
        np.testing.assert_array_equal(array(f"blk.{index}.attn_q.weight"), permute(q, config.num_attention_heads))
        np.testing.assert_array_equal(array(f"blk.{index}.ffn_down_exps.weight"), layers[index].down_EDF.numpy())
        gate = array(f"blk.{index}.ffn_gate_exps.weight")
        if layer.is_moe:
            np.testing.assert_array_equal(gate, layer.mlp.experts.w_gate.detach().transpose(1, 2).numpy())
        else:
            np.testing.assert_array_equal(array(f"blk.{index}.ffn_gate_inp.weight"), 0)
            for expert in gate:
                np.testing.assert_array_equal(expert, layer.mlp.gate_proj.weight.detach().numpy())
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert tokens[: len(tokenizer)] == [tokenizer.convert_ids_to_tokens(i) for i in range(len(tokenizer))]


def test_permute_matches_pairwise_rotation_of_halves():
    """Reference: RoPE by halves (transformers) on the original rows == RoPE by adjacent pairs (llama.cpp) on
    the permuted rows, for one head's query, computed in float64."""
    torch.manual_seed(0)
    head_dim, heads, width = 8, 2, 5
    weight = torch.randn(heads * head_dim, width, dtype=torch.float64)
    x = torch.randn(width, dtype=torch.float64)
    angle = torch.rand(head_dim // 2, dtype=torch.float64) * 3
    cos, sin = angle.cos(), angle.sin()

    def by_halves(v):  # transformers: pairs (i, i + d/2)
        a, b = v[: head_dim // 2], v[head_dim // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin])

    def by_pairs(v):  # llama.cpp (rope type NORM): pairs (2i, 2i + 1)
        a, b = v[0::2], v[1::2]
        return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=1).reshape(-1)

    q, q_permuted = weight @ x, permute(weight, heads) @ x
    for h in range(heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        halves, pairs = by_halves(q[rows]), by_pairs(q_permuted[rows])
        # the same rotated vector, with its entries in llama.cpp's order
        torch.testing.assert_close(pairs, torch.stack([halves[: head_dim // 2], halves[head_dim // 2:]], 1).reshape(-1))


@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_gguf_lower_precisions_are_written_as_asked(tmp_path, outtype):
    tokenizer = make_tokenizer()
    export_gguf(trained_like_moe(vocab=len(tokenizer)), tokenizer, tmp_path / "m.gguf", outtype)
    _, _, tensors = read_gguf(tmp_path / "m.gguf")
    want = {"f16": "F16", "q8_0": "Q8_0"}[outtype]
    assert tensors["blk.0.ffn_up_exps.weight"].tensor_type.name == want
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"  # routing stays exact
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"


HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (it builds from source, ~12 min: "
                                              "CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python)")
@pytest.mark.parametrize("pattern", [("every_other", 2), ("all", 1)], ids=["every_other-top2", "all-top1"])
def test_llama_cpp_greedy_tokens_equal_ours(tmp_path, pattern):
    """llama.cpp (the reference) decodes the f32 GGUF: 32 greedy tokens equal ours. In a subprocess, so that
    llama.cpp's threads do not share the test process."""
    tokenizer = make_tokenizer()
    moe = trained_like_moe(*pattern, vocab=len(tokenizer))
    export_gguf(moe, tokenizer, tmp_path / "m.gguf", "f32")
    prompt = [5, 17, 42, 99, 7]
    expected = moe.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None,
                            pad_token_id=1)[0, len(prompt):].tolist()
    code = (
        "import sys, llama_cpp\n"
        f"llm = llama_cpp.Llama(model_path={str(tmp_path / 'm.gguf')!r}, n_ctx=64, n_threads=1, verbose=False)\n"
        "out = []\n"
        f"for token in llm.generate({prompt}, top_k=1, temp=0.0, repeat_penalty=1.0):\n"
        "    out.append(token)\n"
        "    if len(out) == 32: break\n"
        "print(out)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert eval(result.stdout.strip().splitlines()[-1]) == expected


def test_export_command_writes_a_mixtral_folder_and_a_gguf_file(tmp_path, capsys):
    """The CLI end to end on a saved checkpoint folder with its tokenizer; the Mixtral folder reloaded by
    transformers' class computes our logits, the GGUF file is read back."""
    from flash_experts.cli.main import main

    tokenizer = make_tokenizer()
    moe = trained_like_moe(vocab=len(tokenizer))
    moe.save_pretrained(tmp_path / "ours")
    tokenizer.save_pretrained(tmp_path / "ours")
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "mixtral"), "--format", "mixtral"]) == 0
    assert "max |logit difference| from ours" in capsys.readouterr().out
    mixtral = MixtralForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    ids = torch.randint(0, len(tokenizer), (1, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (mixtral(ids).logits - moe(ids).logits).abs().max().item() < 1e-4
    assert (tmp_path / "mixtral" / "tokenizer.json").is_file()
    assert not list((tmp_path / "mixtral").glob("*.py"))  # a vanilla folder: no remote code
    assert main(["export", str(tmp_path / "ours"), str(tmp_path / "m.gguf"), "--format", "gguf",
                 "--outtype", "q8_0"]) == 0
    _, fields, _ = read_gguf(tmp_path / "m.gguf")
    assert fields["llama.expert_count"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "mixtral", "ours"]  # no partial left
