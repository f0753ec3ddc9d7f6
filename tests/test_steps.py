"""Training steps timed side by side (training/steps.py), bits per character, the validation-vs-compute curve,
and a time-budgeted run's resume.

References: the trainer itself (a timed step must be the step the trainer takes: the same parameters after
it), a fake clock (the turn order and the medians, exactly), float64 log-softmax of one forward over the
whole stream (bits per character), and a metrics file written by hand (the curve).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flash_experts.training import steps
from flash_experts.training.steps import interleaved_medians, training_step
from test_trainer import make_data, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore:no tokenizer found:UserWarning")


def test_contenders_take_turns_and_medians_are_per_contender(monkeypatch):
    """Reference: a fake clock that each call advances by its own cost; the order of calls recorded."""
    now = [0.0]
    order = []
    monkeypatch.setattr(steps.time, "perf_counter", lambda: now[0])

    def call(name, costs):
        def run():
            order.append(name)
            now[0] += costs.pop(0)
        return run

    a = call("a", [9.0, 1.0, 2.0, 30.0])  # warm-up 9, then 1, 2, 30: median 2
    b = call("b", [9.0, 5.0, 4.0, 6.0])  # median 5
    medians = interleaved_medians({"a": a, "b": b}, rounds=3)
    assert order == ["a", "b", "a", "b", "a", "b", "a", "b"]  # warm-ups first, then turns
    assert medians == {"a": 2.0, "b": 5.0}


@pytest.mark.parametrize("trained_part", ["all", "moe"])
def test_the_timed_step_is_the_trainers_step(tmp_path, trained_part):
    """Reference: the trainer's own first step (warm-up of 1, so its rate is the configured peak). The timed
    step built by training/steps.py's parts (build_model, prepare_for_training, training_step) on the same batch
    leaves the same parameters, frozen ones included."""
    from flash_experts.data.tokens import load_split
    from flash_experts.training.checkpoint import load_model_weights
    from flash_experts.training.data import TrainBatches
    from flash_experts.training.model_setup import build_model, prepare_for_training, seed_everything
    from flash_experts.training.trainer import train

    data = make_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "run", **{"optim.max_steps": 1, "optim.warmup_steps": 1,
                                                  "eval.interval": 1, "model.train": trained_part})
    result = train(cfg)

    seed_everything(cfg.run.seed)
    model, _ = build_model(cfg)
    model.train()
    params, optimizer = prepare_for_training(model, cfg, "cpu")
    if trained_part == "moe":
        assert {id(p) for p in params} == {id(p) for n, p in model.named_parameters() if ".mlp." in n}
    batches = TrainBatches(load_split(data, "train", 64), block_size=16, batch_size=4, grad_accum=1,
                           seed=cfg.run.seed)
    ids = batches.micro_batch(0, 0)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    training_step(model, optimizer, torch.float32)(ids)

    seed_everything(cfg.run.seed)
    reference, _ = build_model(cfg)
    load_model_weights(reference, result.checkpoint)
    trained = reference.state_dict()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, trained[name], rtol=1e-5, atol=1e-6, msg=name)
    changed = {name for name, value in model.state_dict().items() if not torch.equal(value, before[name])}
    assert changed  # the step did something, and only to what the config trains
    assert all(".mlp." in name for name in changed) if trained_part == "moe" else len(changed) > len(params) // 2


def test_measure_step_seconds_times_every_config(tmp_path):
    """Reference: one positive time per config, and the models really stepped (the fake clock is not used
    here: only that the calls run and are timed)."""
    data = make_data(tmp_path / "data")
    configs = {"moe": tiny_config(data, tmp_path / "a"),
               "dense": tiny_config(data, tmp_path / "b", **{"moe.moe_layers": "[]", "moe.num_experts": 1,
                                                             "moe.num_experts_per_tok": 1})}
    rounds = []
    seconds = steps.measure_step_seconds(configs, rounds=2, on_round=rounds.append)
    assert set(seconds) == {"moe", "dense"} and all(s > 0 for s in seconds.values())
    assert rounds == [0, 1]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # timing writes no run folder


def test_bits_per_character_scores_every_token(tiny_gpt2_dir):
    """Reference: one forward over [start] + tokens, float64 log-softmax, every token's NLL summed, / ln 2 /
    characters; the windowed evaluation (context 8, so many windows) must give the same total."""
    from flash_experts.evaluation.perplexity import bits_per_character
    from flash_experts.model.loading import load_model

    model, _ = load_model(str(tiny_gpt2_dir))
    model.eval()
    tokens = np.random.default_rng(0).integers(1, 512, size=40)
    stream = torch.tensor([0, *tokens.tolist()])
    with torch.no_grad():
        logits = model(input_ids=stream[None]).logits[0].double()
    nll = -torch.log_softmax(logits[:-1], dim=-1).gather(1, stream[1:, None]).sum().item()
    characters = 123
    expected = nll / math.log(2) / characters
    whole = bits_per_character(model, tokens, characters, context=64, start_token_id=0)
    assert whole == pytest.approx(expected, rel=1e-5)
    # Many windows: each token scored once, with less history (so a different value, but every token counted).
    windowed = bits_per_character(model, tokens, characters, context=8, start_token_id=0)
    assert math.isfinite(windowed) and windowed > 0


def test_bits_per_character_refuses_no_characters(tiny_gpt2_dir):
    from flash_experts.errors import UserError
    from flash_experts.evaluation.perplexity import bits_per_character
    from flash_experts.model.loading import load_model

    model, _ = load_model(str(tiny_gpt2_dir))
    with pytest.raises(UserError, match="at least one character"):
        bits_per_character(model, [1, 2, 3], 0, context=8, start_token_id=0)


def test_validation_curve_and_plot(tmp_path):
    """Reference: a metrics file written by hand: (step x seconds per step, val loss) per evaluation."""
    from flash_experts.contest.plots import plot_validation_vs_compute, validation_curve

    run = tmp_path / "run"
    run.mkdir()
    records = [{"step": 0, "val/loss": 6.0}, {"step": 1, "train/loss": 5.0}, {"step": 10, "val/loss": 4.0},
               {"step": 20, "val/loss": 3.5}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    curve = validation_curve(run, 2.5)
    assert curve == [(0.0, 6.0), (25.0, 4.0), (50.0, 3.5)]
    png = plot_validation_vs_compute({"dense": curve, "MoE": [(0.0, 6.0), (30.0, 4.2)]}, tmp_path / "c.png", "t")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_budget_run_resumes_where_its_compute_stopped(tmp_path, monkeypatch):
    """Reference: the uninterrupted run on the same fake clock (1 s a step, budget 5 s): a run stopped after
    its third step and resumed takes the same remaining steps, at the same learning rates, and ends with the
    same realized compute (the spent seconds travel in the checkpoint)."""
    from flash_experts.training import trainer as trainer_module
    from test_trainer import metrics

    data = make_data(tmp_path / "data")
    now = [0.0]
    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: now[0])
    real_step = trainer_module.Trainer.train_step

    def step(self):
        out = real_step(self)
        now[0] += 1.0
        return out

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step)
    settings = {"optim.time_budget": 5, "optim.max_steps": 5, "optim.warmup_steps": 1, "tracking.log_interval": 1,
                "eval.interval": 100, "checkpoint.interval": 3}
    whole = trainer_module.train(tiny_config(data, tmp_path / "whole", **settings))
    assert (whole.steps, whole.train_seconds) == (5, 5.0)

    real_advance = trainer_module.Trainer.advance

    def stop_after_three(self):
        real_advance(self)
        if self.step == 3:
            self.stopped = "interrupted"

    monkeypatch.setattr(trainer_module.Trainer, "advance", stop_after_three)
    first = trainer_module.train(tiny_config(data, tmp_path / "parts", **settings))
    assert (first.stopped, first.steps) == ("interrupted", 3)
    monkeypatch.setattr(trainer_module.Trainer, "advance", real_advance)
    rest = trainer_module.train(tiny_config(data, tmp_path / "parts", **settings), resume="auto")
    assert (rest.steps, rest.train_seconds, rest.step_seconds) == (5, 5.0, 2.0)
    assert metrics(tmp_path / "parts", "train/lr") == pytest.approx(metrics(tmp_path / "whole", "train/lr"))
    assert metrics(tmp_path / "parts", "train/loss") == pytest.approx(metrics(tmp_path / "whole", "train/loss"))


class TinyLM(torch.nn.Module):
    """A causal LM small enough for float64 by hand: embedding -> linear head, loss = mean next-token CE."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(11, 6, dtype=torch.float64)
        self.head = torch.nn.Linear(6, 11, dtype=torch.float64)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> object:
        logits = self.head(self.embed(input_ids))
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
        return type("Out", (), {"loss": loss})()


@pytest.mark.parametrize("clip", [1.0, 0.05, float("inf")])
def test_the_one_step_over_micro_batches_equals_the_plain_step_on_the_whole_batch(clip):
    """Reference: plain PyTorch in float64 — the mean loss over the two halves (equal sizes: the whole batch's
    mean), backward, clip_grad_norm_, AdamW.step. optimizer_step's micro-batches, sync and clipping must give
    the same weights and the same reported numbers."""
    from flash_experts.training.steps import optimizer_step

    ids = torch.randint(0, 11, (4, 7), generator=torch.Generator().manual_seed(1))
    ours, plain = TinyLM(), TinyLM()
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=0.1)
    opt_plain = torch.optim.AdamW(plain.parameters(), lr=0.1)
    numbers = optimizer_step(ours, [ids[:2], ids[2:]], opt_ours, list(ours.parameters()), clip=clip)
    loss = (plain(ids[:2], ids[:2]).loss + plain(ids[2:], ids[2:]).loss) / 2
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(plain.parameters(), clip)
    opt_plain.step()
    assert numbers.loss == pytest.approx(float(loss.detach()), rel=1e-6)  # the reported numbers are summed in fp32
    assert numbers.grad_norm == pytest.approx(float(norm), rel=1e-12)
    for a, b in zip(ours.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert a.grad is None  # cleared after the step


def test_a_non_finite_step_stops_before_any_weight_moves():
    from flash_experts.training.steps import NonFiniteStep, optimizer_step

    model = TinyLM()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteStep, match="the loss is nan"):
        optimizer_step(model, [torch.zeros(2, 5, dtype=torch.long)], torch.optim.AdamW(model.parameters()),
                       list(model.parameters()))
    assert all(torch.equal(a, b) or (a.isnan() == b.isnan()).all() for a, b in zip(before, model.parameters()))


def test_each_process_layout_picks_its_gradient_sync():
    """Reference: the table of strategies in training/gradient_sync.py, read by hand."""
    from flash_experts.training import gradient_sync as g
    from flash_experts.training.processes import ProcessLayout

    model, wrapped = TinyLM(), torch.nn.Module()
    assert isinstance(ProcessLayout().gradient_sync(model), g.LocalGradients)
    two = ProcessLayout(0, 2, 1)
    assert type(two.gradient_sync(model, wrapped=wrapped)) is g.DDPGradients
    assert type(two.gradient_sync(model, wrapped=wrapped, fsdp=True)) is g.FSDPGradients
    assert type(two.gradient_sync(model, wrapped=wrapped, experts=object())) is g.ExpertParallelGradients
    assert two.share(torch.arange(6)).tolist() == [0, 1, 2] and ProcessLayout(1, 2).share(torch.arange(6)).tolist() == [3, 4, 5]
