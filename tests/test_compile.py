"""`run.compile`: torch.compile in the trainer, failing safe. Reference: the same run without compilation."""

from __future__ import annotations

import functools

import pytest
import torch

from flash_experts.training import trainer as trainer_module
from flash_experts.training.compile import compile_fail_safe
from test_trainer import make_data, metrics, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:no tokenizer found:UserWarning")


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("this backend always fails")


@pytest.fixture
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    with torch._dynamo.config.patch(suppress_errors=False):  # a failure must be caught by compile_fail_safe itself
        yield
    torch._dynamo.reset()


def train_losses(tmp_path, name: str, compile: bool) -> dict[int, float]:
    """Training loss by step, and validation loss by -(step + 1)."""
    cfg = tiny_config(make_data(tmp_path / "data"), tmp_path / name, **{"run.compile": compile})
    result = trainer_module.train(cfg)
    assert result.steps == cfg.optim.max_steps
    return {**metrics(result.run_dir, "train/total_loss"),
            **{-step - 1: loss for step, loss in metrics(result.run_dir, "val/loss").items()}}


def test_a_backend_that_fails_falls_back_to_the_eager_loss_curve(tmp_path, monkeypatch, fresh_dynamo):
    reference = train_losses(tmp_path, "eager", compile=False)
    monkeypatch.setattr(trainer_module, "compile_fail_safe",
                        functools.partial(compile_fail_safe, backend=failing_backend))
    with pytest.warns(UserWarning, match="a graph failed to compile .*this backend always fails.*runs eagerly"):
        compiled = train_losses(tmp_path, "compiled", compile=True)
    assert compiled.keys() == reference.keys() and len(reference) >= 9
    assert compiled == reference  # the fallback runs exactly the eager code


def test_a_working_backend_gives_the_eager_loss_curve(tmp_path, monkeypatch, fresh_dynamo):
    reference = train_losses(tmp_path, "eager", compile=False)
    calls = []

    def counting_backend(graph_module, example_inputs):
        calls.append(len(graph_module.graph.nodes))
        return graph_module.forward  # run the captured graph as is

    monkeypatch.setattr(trainer_module, "compile_fail_safe",
                        functools.partial(compile_fail_safe, backend=counting_backend))
    compiled = train_losses(tmp_path, "compiled", compile=True)
    assert calls, "dynamo captured no graph: the model was not compiled"
    assert compiled.keys() == reference.keys()
    for step, loss in reference.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step


def test_compiled_model_saves_the_plain_weights(fresh_dynamo):
    model = torch.nn.Linear(3, 2)
    compiled = compile_fail_safe(model, backend="eager")
    assert compiled._orig_mod is model
    assert list(compiled._orig_mod.state_dict()) == ["weight", "bias"]


@pytest.mark.slow
def test_inductor_gives_the_eager_loss_curve(tmp_path, fresh_dynamo):
    """The real backend (C++ code generation on CPU, about a minute for the tiny model): same losses."""
    reference = train_losses(tmp_path, "eager", compile=False)
    compiled = train_losses(tmp_path, "compiled", compile=True)
    assert compiled.keys() == reference.keys()
    for step, loss in reference.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
