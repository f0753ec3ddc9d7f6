"""`flash-experts upcycle`: the saved MoE model equals the HF dense source (reference: HF GPT2LMHeadModel)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from flash_experts.cli.main import main


def test_upcycle_cli_saves_a_model_equal_to_hf_dense(tiny_gpt2_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["upcycle", str(tiny_gpt2_dir), str(out), "--experts", "4", "--top-k", "2", "--layers", "0,2"]) == 0
    assert "parity with the dense model" in capsys.readouterr().out

    dense = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    moe = AutoModelForCausalLM.from_pretrained(out).eval()
    assert moe.config.num_experts == 4 and moe.config.moe_layer_indices() == [0, 2]
    tokens = torch.randint(0, dense.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(moe(input_ids=tokens).logits, dense(input_ids=tokens).logits, atol=1e-4, rtol=0)


def test_upcycle_cli_bad_layers_is_one_error_line(tiny_gpt2_dir, tmp_path, capsys):
    assert main(["upcycle", str(tiny_gpt2_dir), str(tmp_path / "x"), "--layers", "0,seven"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --layers")
    assert not (tmp_path / "x").exists()  # nothing written on bad input


@pytest.mark.parametrize("noise", ["nan", "inf", "-0.1"])
def test_upcycle_refuses_expert_noise_that_is_not_a_finite_number_above_zero(noise, tiny_gpt2_dir, tmp_path, capsys):
    """nan would be taken as "no noise" while the output says the symmetry was broken, inf would save a model
    whose logits are NaN: one error line, nothing written."""
    assert main(["upcycle", str(tiny_gpt2_dir), str(tmp_path / "x"), "--expert-noise", noise]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --expert-noise must be a finite number >= 0")
    assert not (tmp_path / "x").exists()


def test_upcycle_refuses_an_output_folder_that_holds_files(tiny_gpt2_dir, tmp_path, capsys):
    """As `export` does (the same helper): an older model's files would stay beside the new one's. Reference:
    the folder's contents before the call, byte for byte. An empty folder is fine."""
    out = tmp_path / "older-model"
    out.mkdir()
    (out / "model-00002-of-00002.safetensors").write_bytes(b"an older model's second shard")
    assert main(["upcycle", str(tiny_gpt2_dir), str(out), "--experts", "2", "--top-k", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out} already exists")
    assert [p.name for p in out.iterdir()] == ["model-00002-of-00002.safetensors"]
    assert (out / "model-00002-of-00002.safetensors").read_bytes() == b"an older model's second shard"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["upcycle", str(tiny_gpt2_dir), str(empty), "--experts", "2", "--top-k", "1"]) == 0
    assert (empty / "config.json").exists()
