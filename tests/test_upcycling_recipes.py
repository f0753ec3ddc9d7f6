"""Upcycling recipes: Drop-Upcycling, the re-warm peak of the experts' learning rate, and their bad values.

References: the dense source's own tensors (which hidden units kept the pretrained weights, bit for bit),
their mean and standard deviation in float64 (the statistics the redrawn units must follow), the warm-up and
cosine formulas written out by hand, and HF's dense logits (exact copies stay exact).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from flash_experts.errors import UserError
from flash_experts.model import upcycle
from flash_experts.model.moe import GroupedExperts
from test_trainer import make_data, metrics, tiny_config, tiny_overrides  # noqa: E402


def tiny_overrides_without(data, out, key: str) -> list[str]:
    return [o for o in tiny_overrides(data, out) if not o.startswith(key + "=")]


def dense_llama(intermediate: int = 256) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=intermediate, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a non-zero mean, so that the redrawn units' mean is checked too
        for layer in model.model.layers:
            layer.mlp.up_proj.weight.add_(0.05)
    return model


def source_unit_tensors(dense, layer: int, family: str) -> dict[str, torch.Tensor]:
    """Our expert tensor name -> the dense tensor it copies, in our (in, out) layout; the hidden unit is dim
    1 of the input projections and dim 0 of w_down and b_up."""
    if family == "llama":
        mlp = dense.model.layers[layer].mlp
        return {"w_up": mlp.up_proj.weight.t(), "w_gate": mlp.gate_proj.weight.t(), "w_down": mlp.down_proj.weight.t()}
    mlp = dense.transformer.h[layer].mlp
    return {"w_up": mlp.c_fc.weight, "b_up": mlp.c_fc.bias, "w_down": mlp.c_proj.weight}


pytestmark = pytest.mark.filterwarnings("ignore:no tokenizer found:UserWarning")

UNIT_DIM = {"w_up": 1, "w_gate": 1, "w_down": 0, "b_up": 0}


def redrawn_units(expert_tensor: torch.Tensor, source: torch.Tensor, dim: int) -> set[int]:
    """Hidden units (indices along `dim`) where the expert no longer equals the source exactly."""
    differs = (expert_tensor != source)
    if differs.ndim == 2:
        differs = differs.any(dim=1 - dim)
    return set(torch.nonzero(differs).flatten().tolist())


@pytest.fixture(scope="module")
def gpt2_dense(tiny_gpt2_dir):
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir).eval()
    with torch.no_grad():  # HF initialises biases at zero; zero statistics would redraw zeros, unseen
        for layer in model.transformer.h:
            layer.mlp.c_fc.bias.normal_(0.1, 0.02, generator=torch.Generator().manual_seed(5))
    return model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_drop_upcycling_redraws_exactly_the_share_of_each_experts_units(family, ratio, gpt2_dense):
    dense = gpt2_dense if family == "gpt2" else dense_llama()
    moe = upcycle(dense, num_experts=4, top_k=2, moe_layers="all", drop_ratio=ratio, seed=3)
    layers = [m for m in moe.modules() if isinstance(m, GroupedExperts)]
    unit_sets = []
    for layer_index, experts in enumerate(layers):
        sources = source_unit_tensors(dense, layer_index, family)
        hidden = sources["w_up"].shape[1]
        for e in range(4):
            per_tensor = {name: redrawn_units(getattr(experts, name)[e], source, UNIT_DIM[name])
                          for name, source in sources.items()}
            units = per_tensor["w_up"]
            assert len(units) == round(ratio * hidden)
            # one unit is one column of every input projection, one row of w_down, one entry of b_up
            assert all(found == units for found in per_tensor.values()), {k: len(v) for k, v in per_tensor.items()}
            unit_sets.append(frozenset(units))
        if family == "gpt2":  # the shared output bias is kept
            assert torch.equal(experts.b_down[0], dense.transformer.h[layer_index].mlp.c_proj.bias)
    if ratio < 1.0:  # each expert draws its own units
        assert len(set(unit_sets)) == len(unit_sets)


@pytest.mark.parametrize("name", ["w_up", "w_down", "w_gate"])
def test_redrawn_units_follow_the_source_tensors_mean_and_std(name):
    dense = dense_llama(intermediate=512)
    moe = upcycle(dense, num_experts=2, top_k=1, moe_layers=[0], drop_ratio=0.5, seed=0)
    experts = next(m for m in moe.modules() if isinstance(m, GroupedExperts))
    source = source_unit_tensors(dense, 0, "llama")[name]
    dim = UNIT_DIM[name]
    reference_mean, reference_std = source.double().mean().item(), source.double().std().item()
    for e in range(2):
        units = sorted(redrawn_units(experts.__getattr__(name)[e], source, dim))
        fresh = experts.__getattr__(name)[e].index_select(dim, torch.tensor(units)).double()
        n = fresh.numel()  # 64 x 256 values: the sample mean and std are known to about 1/sqrt(n)
        assert abs(fresh.mean().item() - reference_mean) < 5 * reference_std / math.sqrt(n)
        assert abs(fresh.std().item() / reference_std - 1) < 5 / math.sqrt(2 * n)


def test_drop_ratio_zero_keeps_exact_copies_and_the_dense_function(gpt2_dense):
    moe = upcycle(gpt2_dense, num_experts=4, top_k=2, moe_layers="every_other", drop_ratio=0.0).eval()
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (moe(ids).logits - gpt2_dense(ids).logits).abs().max().item() <= 1e-4


def test_drop_upcycling_is_seeded_and_changes_the_function(gpt2_dense):
    def w_up(seed: int) -> torch.Tensor:
        moe = upcycle(gpt2_dense, num_experts=2, top_k=1, moe_layers=[1], drop_ratio=0.5, seed=seed)
        return moe.transformer.h[1].mlp.experts.w_up.detach().clone()

    assert torch.equal(w_up(1), w_up(1)) and not torch.equal(w_up(1), w_up(2))
    moe = upcycle(gpt2_dense, num_experts=2, top_k=1, moe_layers=[1], drop_ratio=0.5, seed=1).eval()
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (moe(ids).logits - gpt2_dense(ids).logits).abs().max().item() > 1e-3


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_drop_ratio_outside_zero_one_is_refused(gpt2_dense, ratio):
    with pytest.raises(UserError, match="drop_ratio must be in"):
        upcycle(gpt2_dense, num_experts=2, top_k=1, drop_ratio=ratio)


# ------------------------------------------------------------------------------------------------ re-warm peak


def test_rewarm_peak_gives_experts_and_routers_their_own_schedule(tmp_path):
    """Reference: lr_at's formulas by hand. The dense parameters follow optim.lr; the experts and routers the
    same warm-up and cosine shape scaled to the re-warm peak (min_lr scaled alike)."""
    from flash_experts.training import distributed as dist_utils
    from flash_experts.training.model_setup import is_moe_parameter
    from flash_experts.training.trainer import Trainer

    lr, peak, min_lr, warmup, max_steps = 1e-3, 4e-3, 1e-4, 2, 6
    cfg = tiny_config(make_data(tmp_path / "data"), tmp_path / "rewarm", **{
        "optim.lr": lr, "optim.min_lr": min_lr, "optim.rewarm_peak": peak, "optim.warmup_steps": warmup,
        "optim.max_steps": max_steps, "checkpoint.interval": 0, "eval.interval": 6, "moe.moe_layers": [1]})
    trainer = Trainer(cfg, dist_utils.init_distributed("cpu"), resume=None)
    try:
        names = {id(p): n for n, p in trainer.raw_model.named_parameters()}
        kinds = [{is_moe_parameter(names[id(p)]) for p in group["params"]} for group in trainer.optimizer.param_groups]
        assert kinds == [{False}, {False}, {True}, {True}]  # dense decay / no decay, experts decay / no decay
        for step in range(max_steps):
            if step < warmup:
                schedule = lr * (step + 1) / warmup
            else:
                progress = (step - warmup) / (max_steps - warmup)
                schedule = min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)
            trainer.train_step()  # advances trainer.step
            group_lrs = [group["lr"] for group in trainer.optimizer.param_groups]
            assert group_lrs == pytest.approx([schedule, schedule, schedule * peak / lr, schedule * peak / lr])
    finally:
        trainer.close()


@pytest.mark.parametrize("rewarm_peak", [None, 4e-3])
def test_router_lr_scale_gives_the_routers_their_own_rate(tmp_path, rewarm_peak):
    """Reference: the rule written out: the routers (and only they) in groups of their own, at router_lr_scale
    times the rate of their neighbours (the experts': optim.lr, or the re-warm peak's scale)."""
    from flash_experts.training import distributed as dist_utils
    from flash_experts.training.model_setup import is_moe_parameter, is_router_parameter
    from flash_experts.training.trainer import Trainer

    lr, scale = 1e-3, 25.0
    cfg = tiny_config(make_data(tmp_path / "data"), tmp_path / "router", **{
        "optim.lr": lr, "optim.router_lr_scale": scale, "checkpoint.interval": 0, "moe.moe_layers": [1],
        **({} if rewarm_peak is None else {"optim.rewarm_peak": rewarm_peak})})
    trainer = Trainer(cfg, dist_utils.init_distributed("cpu"), resume=None)
    try:
        names = {id(p): n for n, p in trainer.raw_model.named_parameters()}
        trainer.train_step()
        experts = 1.0 if rewarm_peak is None else rewarm_peak / lr
        for group in trainer.optimizer.param_groups:
            # without a re-warm the experts share the groups of the rest of the model
            kinds = {(is_router_parameter(names[id(p)]), is_moe_parameter(names[id(p)]) and rewarm_peak is not None)
                     for p in group["params"]}
            assert len(kinds) == 1, kinds
            router, rewarmed = kinds.pop()
            expected = scale * experts if router else experts if rewarmed else 1.0
            assert group["lr_scale"] == pytest.approx(expected)
            assert group["lr"] == pytest.approx(group["lr_scale"] * trainer.optimizer.param_groups[0]["lr"])
        routers = [g for g in trainer.optimizer.param_groups if is_router_parameter(names[id(g["params"][0])])]
        assert routers and sum(len(g["params"]) for g in routers) == 1  # the one MoE layer's router
    finally:
        trainer.close()


def test_rewarm_peak_run_resumes_exactly(tmp_path):
    """Reference: the same run without interruption (its four parameter groups and their rates come back)."""
    from flash_experts.training.trainer import train

    data = make_data(tmp_path / "data")
    extra = {"optim.rewarm_peak": 1e-2, "checkpoint.interval": 3}
    full = train(tiny_config(data, tmp_path / "full", **extra))
    assert full.losses[6] < full.losses[1]
    resumed = train(tiny_config(data, tmp_path / "resumed", **extra),
                    resume=str(tmp_path / "full" / "checkpoints" / "step_00000003"))
    assert [resumed.losses[s] for s in (4, 5, 6)] == [full.losses[s] for s in (4, 5, 6)]
    assert metrics(resumed.run_dir, "train/lr")[6] == metrics(full.run_dir, "train/lr")[6]


@pytest.mark.parametrize("override,message", [
    ("moe.drop_ratio=1.5", "moe.drop_ratio must be in [0, 1]"),
    ("moe.drop_ratio=-0.5", "moe.drop_ratio must be in [0, 1]"),
    ("optim.rewarm_peak=0", "optim.rewarm_peak must be > 0"),
    ("optim.rewarm_peak=-1e-3", "optim.rewarm_peak must be > 0"),
    ("moe.num_experts_per_tok=5", "moe.num_experts_per_tok (top_k) = 5 must be <= num_experts (4)"),
    ("moe.drop_ratio=0.5", "moe.drop_ratio applies to experts upcycled from a pretrained base"),  # model.base=scratch here
])
def test_absurd_recipe_values_are_one_error_line_and_exit_2(tmp_path, capsys, override, message):
    from flash_experts.cli.main import main

    data = make_data(tmp_path / "data")
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
    args = ["finetune", "--config", str(config), *tiny_overrides_without(data, tmp_path / "run", override.split("=")[0]),
            override]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--drop-ratio", "1.01", "--drop-ratio must be in [0, 1]"),
    ("--expert-noise", "-1", "--expert-noise must be a finite number >= 0"),
    ("--top-k", "9", "--top-k must be in [1, --experts=8]"),
])
def test_upcycle_cli_absurd_recipe_values(tiny_gpt2_dir, tmp_path, capsys, flag, value, message):
    from flash_experts.cli.main import main

    assert main(["upcycle", str(tiny_gpt2_dir), str(tmp_path / "x"), flag, value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x").exists()


def test_upcycle_cli_drop_ratio_says_parity_is_given_up(tiny_gpt2_dir, tmp_path, capsys):
    from flash_experts.cli.main import main

    assert main(["upcycle", str(tiny_gpt2_dir), str(tmp_path / "x"), "--drop-ratio", "0.5", "--experts", "2"]) == 0
    assert "symmetry broken on purpose" in capsys.readouterr().out
