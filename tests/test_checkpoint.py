"""Checkpoint files: atomic saves (SIGKILL mid-save), latest pointer, pruning, weights_only state, RNG states."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from flash_experts.errors import UserError
from flash_experts.training import checkpoint as ckpt


def tiny_hf_gpt2(fill: float | None = None, n_embd: int = 32):
    """An HF GPT2LMHeadModel (independent of our model code); `fill` sets every parameter to that value."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=n_embd, n_head=4, vocab_size=64, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    if fill is not None:
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(fill)
    return model


def test_rng_states_survive_weights_only_round_trip(tmp_path):
    """Reference: the draws made right after capturing; restoring the saved state must replay them."""
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in Python's state: it must be kept too
    state = ckpt.capture_rng_state()
    expected = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], random.gauss(0, 1))
    torch.save({"rng": state}, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=True)["rng"]
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    ckpt.restore_rng_state(loaded)
    again = (torch.rand(4), np.random.rand(4), [random.random() for _ in range(4)], random.gauss(0, 1))
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1])
    assert expected[2] == again[2] and expected[3] == again[3]


def test_step_checkpoints_latest_pointer_and_pruning(tmp_path):
    """Reference: the steps saved and keep_last=2; weights read back equal what was written (an HF model)."""
    for step in (1, 2, 3):
        ckpt.save_step_checkpoint(tmp_path, step, tiny_hf_gpt2(fill=float(step)), None, {"step": step}, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]
    latest = ckpt.find_latest(tmp_path)
    assert latest.name == "step_00000003" and ckpt.load_trainer_state(latest) == {"step": 3}
    model = tiny_hf_gpt2(fill=0.0)
    ckpt.load_model_weights(model, latest)
    assert all(torch.all(p == 3.0) for p in model.parameters())  # lm_head is tied: restored through wte
    # without the pointer, the highest complete step folder is the latest
    (root / "latest").unlink()
    assert ckpt.find_latest(tmp_path).name == "step_00000003"
    assert ckpt.resolve_resume(str(tmp_path), tmp_path / "elsewhere").name == "step_00000003"
    assert ckpt.resolve_resume("auto", tmp_path / "empty") is None
    with pytest.raises(UserError, match="no checkpoint"):
        ckpt.resolve_resume(str(tmp_path / "missing"), tmp_path)


def test_load_model_weights_rejects_a_different_architecture(tmp_path):
    """Reference: a model of another width; loading into it must fail with a UserError, not half-load."""
    ckpt.save_checkpoint(tmp_path / "c", tiny_hf_gpt2(), None, {"step": 0})
    with pytest.raises(UserError, match=r"another architecture.*transformer.wte.weight \(64, 32\) vs \(64, 64\)"):
        ckpt.load_model_weights(tiny_hf_gpt2(n_embd=64), tmp_path / "c")
    from transformers import GPT2Config, GPT2LMHeadModel

    deeper = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=64, n_positions=32))
    with pytest.raises(UserError, match="does not match"):
        ckpt.load_model_weights(deeper, tmp_path / "c")


def test_interrupted_best_replacement_is_recovered(tmp_path):
    """Reference: the state of a save killed between its two renames (old folder moved aside, new not in place)."""
    ckpt.save_checkpoint(tmp_path / "best", tiny_hf_gpt2(fill=1.0), None, {"step": 1})
    os.rename(tmp_path / "best", tmp_path / ".old-best-deadbeef")
    (tmp_path / ".tmp-best-x").mkdir()
    (tmp_path / ".tmp-latest-0123abcd").write_text("step_00000002\n")  # a pointer write killed before its rename
    ckpt.recover_interrupted_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert ckpt.load_trainer_state(tmp_path / "best") == {"step": 1}


SAVE_LOOP = textwrap.dedent(
    """
    import sys, torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from flash_experts.training.checkpoint import save_step_checkpoint
    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=512, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(step))
        save_step_checkpoint(sys.argv[1], step, model, None, {"step": step}, keep_last=2)
        print(step, flush=True)
    """
)


def test_sigkill_during_saves_leaves_latest_checkpoint_loadable(tmp_path):
    """Reference: each checkpoint's weights were all filled with its step number; after SIGKILL at arbitrary
    moments (most of the loop's time is spent saving), `latest` must load and its weights must equal its step."""
    from transformers import GPT2Config, GPT2LMHeadModel

    script = tmp_path / "save_loop.py"
    script.write_text(SAVE_LOOP)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for delay in (0.05, 0.31):
        run_dir = tmp_path / f"run_{delay}"
        process = subprocess.Popen([sys.executable, str(script), str(run_dir)], stdout=subprocess.PIPE, text=True, env=env)
        first = process.stdout.readline()  # at least one complete save before the kill
        assert first.strip(), "the save loop died before its first save"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        process.stdout.close()

        latest = ckpt.find_latest(run_dir)
        state = ckpt.load_trainer_state(latest)
        model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=512, n_positions=64))
        ckpt.load_model_weights(model, latest)
        assert all(torch.all(p == float(state["step"])) for p in model.parameters()), latest
        assert latest.name == ckpt.step_dir_name(state["step"])
        ckpt.prune_checkpoints(run_dir / "checkpoints", keep_last=2)  # what the next save does first
        assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
        assert ckpt.find_latest(run_dir) == latest


class _RunsCodeWhenUnpickled:
    """A pickle payload that creates a file when unpickled: what a malicious trainer_state.pt would hold."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_loading_never_unpickles_code_and_damaged_files_are_user_errors(tmp_path):
    """Reference: a marker file that only exists if pickled code ran; torch.load(weights_only=True) must refuse
    the payload, and a damaged state or weights file must be a UserError naming the file."""
    folder = ckpt.save_checkpoint(tmp_path / "c", tiny_hf_gpt2(), None, {"step": 1})
    marker = tmp_path / "code_ran"
    torch.save({"step": 1, "payload": _RunsCodeWhenUnpickled(marker)}, folder / ckpt.STATE_FILE)
    with pytest.raises(UserError, match="trainer_state.pt.*not a flash-experts trainer state"):
        ckpt.load_trainer_state(folder)
    assert not marker.exists()
    (folder / ckpt.STATE_FILE).write_bytes(b"\x80\x04 truncated")
    with pytest.raises(UserError, match="cannot read .*trainer_state.pt"):
        ckpt.load_trainer_state(folder)
    (folder / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="cannot read .*model.safetensors"):
        ckpt.load_model_weights(tiny_hf_gpt2(), folder)


def test_every_torch_load_in_the_package_is_weights_only():
    """Reference: the source text; a torch.load without weights_only=True could run pickled code."""
    import re
    from pathlib import Path

    import flash_experts

    root = Path(flash_experts.__file__).parent
    calls = [(path.name, match.group(0)) for path in root.rglob("*.py")
             for match in re.finditer(r"torch\.load\([^)]*\)", path.read_text())]
    assert calls, "expected at least the trainer-state loader"
    assert all("weights_only=True" in call for _, call in calls), calls
