"""Training config: YAML + overrides -> TrainConfig, checked against the raw YAML (PyYAML) and hand-written values."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flash_experts.errors import UserError
from flash_experts.training.config import (
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_overrides,
    save_config,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.yaml"))
EXPECTED = {"mtg_moe", "mtg_dense", "wikitext_moe", "wikitext_dense", "tiny", "pretrain_wikipedia"}


def test_the_promised_configs_exist():
    """Reference: the list of configs the project documents."""
    assert EXPECTED <= {p.stem for p in CONFIG_FILES}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_loads_and_matches_its_yaml(path: Path):
    """Reference: the file parsed by plain PyYAML; every value it sets must land in the same field."""
    cfg = load_config(path, [])
    raw = yaml.safe_load(path.read_text())
    assert isinstance(cfg, TrainConfig)
    for section, values in raw.items():
        if values is None:
            assert getattr(cfg, section) is None
            continue
        for key, value in values.items():
            loaded = getattr(getattr(cfg, section), key)
            if isinstance(loaded, tuple):
                loaded = list(loaded)
            if isinstance(loaded, float):
                assert loaded == pytest.approx(float(value)), f"{section}.{key}"
            else:
                assert loaded == value, f"{section}.{key}"
    assert cfg.run.out_dir == (raw["run"].get("out_dir") or f"runs/{raw['run']['name']}")


def test_config_family_details():
    """Reference: the documented intent of each config (hand-written)."""
    moe = load_config(CONFIG_DIR / "mtg_moe.yaml", [])
    assert (moe.moe.num_experts, moe.moe.num_experts_per_tok, moe.moe.moe_layers) == (8, 2, "every_other")
    assert load_config(CONFIG_DIR / "mtg_dense.yaml", []).moe is None
    assert load_config(CONFIG_DIR / "wikitext_dense.yaml", []).moe is None
    tiny = load_config(CONFIG_DIR / "tiny.yaml", [])
    assert (tiny.model.base, tiny.model.n_layer, tiny.model.n_embd, tiny.moe.num_experts) == ("scratch", 2, 64, 4)
    assert tiny.tracking.wandb == "off"
    assert load_config(CONFIG_DIR / "pretrain_wikipedia.yaml", []).model.base == "scratch"


def test_overrides_apply_with_type_coercion():
    """Reference: Python literals for the same values."""
    cfg = load_config(
        CONFIG_DIR / "mtg_moe.yaml",
        ["optim.lr=1e-4", "moe.num_experts=4", "--data.batch_size", "16", "--run.compile=yes",
         "optim.betas=[0.8, 0.99]", "moe.moe_layers=[1, 3]", "optim.max_steps=3e3", "run.name=1e3", "model.base=smollm2"],
    )
    assert cfg.optim.lr == 1e-4 and type(cfg.optim.lr) is float
    assert cfg.moe.num_experts == 4 and type(cfg.moe.num_experts) is int
    assert cfg.data.batch_size == 16 and type(cfg.data.batch_size) is int
    assert cfg.run.compile is True
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.moe.moe_layers == [1, 3]
    assert cfg.optim.max_steps == 3000 and type(cfg.optim.max_steps) is int
    assert cfg.run.name == "1e3" and cfg.run.out_dir == "runs/1e3"  # names stay verbatim
    assert cfg.model.base == "smollm2"


def test_yaml_strings_become_numbers(tmp_path: Path):
    """Reference: float("3e-4") -- PyYAML reads `3e-4` (no dot) as a string."""
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3e-4\n  warmup_steps: '10'\nmoe:\n  router_jitter: '0.01'\n")
    assert yaml.safe_load(path.read_text())["optim"]["lr"] == "3e-4"
    cfg = load_config(path, [])
    assert cfg.optim.lr == float("3e-4") and cfg.optim.warmup_steps == 10 and cfg.moe.router_jitter == 0.01
    assert cfg.optim.min_lr == pytest.approx(3e-5)  # default: lr / 10


def test_moe_null_makes_a_dense_model_and_keys_reenable_it():
    """Reference: the documented meaning of `moe: null` (dense) and the MoEConfig defaults."""
    assert load_config(CONFIG_DIR / "mtg_moe.yaml", ["moe=null"]).moe is None
    back = load_config(CONFIG_DIR / "mtg_dense.yaml", ["moe.num_experts_per_tok=1"])
    assert back.moe is not None and back.moe.num_experts_per_tok == 1 and back.moe.num_experts == 8


def test_parse_overrides_styles():
    """Reference: hand-split pairs."""
    assert parse_overrides(["a.b=1", "--c.d", "2", "--e.f=x=y"]) == [("a.b", "1"), ("c.d", "2"), ("e.f", "x=y")]
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["optim.lr"])
    with pytest.raises(ValueError, match="section.key=value"):
        parse_overrides(["--optim.lr"])


@pytest.mark.parametrize(
    "override, named, suggestion",
    [("optim.lrr=1", "optim.lrr", "optim.lr"), ("optm.lr=1", "optm", "optim"), ("moe.num_expert=1", "moe.num_expert", "moe.num_experts"),
     ("data.batchsize=2", "data.batchsize", "data.batch_size")],
)
def test_unknown_keys_name_the_key_and_suggest(override: str, named: str, suggestion: str):
    """Reference: the misspelt key and its intended spelling, written by hand."""
    with pytest.raises(ValueError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert f"'{named}'" in message and f"did you mean {suggestion}" in message


def test_unknown_key_in_yaml(tmp_path: Path):
    """Reference: a hand-written YAML with one misspelt key."""
    path = tmp_path / "c.yaml"
    path.write_text("eval:\n  intervall: 5\n")
    with pytest.raises(ValueError, match=r"eval\.intervall.*eval\.interval"):
        load_config(path, [])


@pytest.mark.parametrize(
    "overrides, field",
    [
        (["optim.lr=0"], "optim.lr"),
        (["optim.lr=-1e-3"], "optim.lr"),
        (["optim.lr=nan"], "optim.lr"),
        (["optim.lr=fast"], "optim.lr"),
        (["data.batch_size=0"], "data.batch_size"),
        (["data.batch_size=2.5"], "data.batch_size"),
        (["optim.warmup_steps=200", "optim.max_steps=100"], "optim.warmup_steps"),
        (["eval.interval=0"], "eval.interval"),
        (["moe.num_experts_per_tok=9", "moe.num_experts=8"], "moe.num_experts_per_tok"),
        (["optim.grad_clip=-1"], "optim.grad_clip"),
        (["run.precision=fp8"], "run.precision"),
        (["run.device=tpu"], "run.device"),
        (["model.attention=magic"], "model.attention"),
        (["tracking.wandb=maybe"], "tracking.wandb"),
        (["optim.betas=[0.9]"], "optim.betas"),
        (["optim.betas=[0.9, 1.0]"], "optim.betas"),
        (["optim.min_lr=1", "optim.lr=1e-3"], "optim.min_lr"),
        (["moe.moe_layers=sometimes"], "moe.moe_layers"),
        (["moe.moe_layers=[1, 1]"], "moe.moe_layers"),
        (["model.base=scratch", "model.n_layer=2", "moe.moe_layers=[5]"], "moe.moe_layers"),
        (["model.n_embd=100", "model.n_head=12"], "model.n_embd"),
        (["model.base=scratch", "model.n_positions=64", "data.block_size=128"], "data.block_size"),
        (["moe=null", "model.train=moe"], "model.train"),
        (["run.compile=perhaps"], "run.compile"),
        (["moe.router_jitter=1.5"], "moe.router_jitter"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
        (["optim.router_lr_scale=0"], "optim.router_lr_scale"),
        (["moe.router_detach_input=maybe"], "moe.router_detach_input"),
        (["optim.router_lr_scale=inf"], "optim.router_lr_scale"),
        (["optim.router_lr_scale=nan"], "optim.router_lr_scale"),
        (["moe=null", "optim.router_lr_scale=10"], "optim.router_lr_scale"),
        (["optim.time_budget=-1"], "optim.time_budget"),
        (["optim.time_budget=inf"], "optim.time_budget"),
        (["optim.time_budget=nan"], "optim.time_budget"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(overrides: list[str], field: str):
    """Reference: the documented rule for each field (hand-picked impossible values)."""
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_save_and_reload_round_trip(tmp_path: Path):
    """Reference: the config before saving (equality of dataclasses), and the YAML parsed by PyYAML."""
    cfg = load_config(CONFIG_DIR / "wikitext_moe.yaml", ["moe.moe_layers=[0, 2]", "optim.lr=5e-5"])
    save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert load_config(tmp_path / "sub" / "config.yaml", []) == cfg
    assert yaml.safe_load((tmp_path / "sub" / "config.yaml").read_text()) == config_to_dict(cfg)
    assert config_to_dict(cfg)["optim"]["betas"] == [0.9, 0.95]


def test_missing_or_broken_file_is_a_user_error(tmp_path: Path):
    """Reference: a path that does not exist and a file that is not YAML."""
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "nope.yaml", [])
    (tmp_path / "bad.yaml").write_text("optim: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml", [])


_SECTION_NAMES = ["run", "model", "moe", "data", "optim", "eval", "checkpoint", "tracking"]
_FIELD_NAMES = ["name", "lr", "top_k", "num_experts", "batch_size", "betas", "layers", "precision", "interval",
                "wandb", "base", "n_head", "dropout", "warmup_steps", "max_steps", "compile", "out_dir", "dir"]
_scalars = (st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(max_size=8) | st.sampled_from(["1e-4", "auto", "all", "every_other", "null", "2", "[1,2]"]))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
_keys = st.sampled_from(_FIELD_NAMES) | st.text(max_size=6) | st.integers()
_sections = st.none() | _values | st.dictionaries(_keys, _values, max_size=5)
_configs = st.dictionaries(st.sampled_from(_SECTION_NAMES) | st.text(max_size=6) | st.integers(), _sections, max_size=5)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_configs | _values)
def test_any_input_loads_or_raises_value_error(raw):
    """Reference: the contract 'bad config -> ValueError' -- no other exception type for any input."""
    try:
        cfg = config_from_dict(raw)
    except ValueError:
        return
    # what loads is valid and survives a round trip
    assert cfg.optim.lr > 0 and math.isfinite(cfg.optim.lr)
    assert config_from_dict(config_to_dict(cfg)) == cfg


@settings(max_examples=150, deadline=None)
@given(section=st.sampled_from(_SECTION_NAMES), key=st.sampled_from(_FIELD_NAMES) | st.text(max_size=6),
       text=st.text(max_size=12))
def test_any_override_string_loads_or_raises_value_error(section: str, key: str, text: str):
    """Reference: the same contract for CLI override strings."""
    try:
        load_config(None, [f"{section}.{key}={text}"])
    except ValueError:
        pass


def _schema_configs():
    """Real section and field names with plausible-or-wrong values, so that a good share of inputs load and
    the cross-field checks (top_k vs num_experts, warmup vs max_steps, ...) are exercised."""
    import dataclasses

    from flash_experts.training import config as config_module

    plausible = (st.integers(-2, 2048) | st.floats(-1.0, 2.0) | st.booleans() | st.none()
                 | st.sampled_from(["auto", "all", "every_other", "moe", "cpu", "bf16", "cosine", "off", "scratch", "gpt2",
                                    "3e-4", "true", "x", [0, 1], [0.9, 0.95], [1.0, 0.5, 0.1]]))
    sections = {}
    for name, cls in config_module.SECTIONS.items():
        names = [f.name for f in dataclasses.fields(cls)]
        sections[name] = st.dictionaries(st.sampled_from(names), plausible, max_size=len(names))
    return st.fixed_dictionaries({}, optional={name: strategy for name, strategy in sections.items()})


@settings(max_examples=300, deadline=None)
@given(raw=_schema_configs())
def test_schema_shaped_input_loads_or_raises_value_error(raw):
    """Reference: the contract 'bad config -> ValueError'; what loads obeys the documented invariants."""
    try:
        cfg = config_from_dict(raw)
    except ValueError:
        return
    assert cfg.optim.warmup_steps <= cfg.optim.max_steps and 0 <= cfg.optim.min_lr <= cfg.optim.lr
    assert cfg.moe is None or 1 <= cfg.moe.num_experts_per_tok <= cfg.moe.num_experts
    assert cfg.data.batch_size >= 1 and cfg.eval.interval >= 1
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_resolve_device_and_precision():
    """Reference: torch.cuda's own answers; the documented rules (auto = bf16 where supported, fp16 needs CUDA)."""
    import torch

    from flash_experts.training.config import resolve_device, resolve_precision

    has_cuda = torch.cuda.is_available()
    assert resolve_device("auto") == ("cuda" if has_cuda else "cpu")
    assert resolve_device("cpu") == "cpu"
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    if flags:  # reference: the kernel's CPU flags, independent of torch's own detection
        native_bf16 = bool(flags & {"avx512_bf16", "amx_bf16"})
        assert resolve_precision("auto", "cpu") == ("bf16" if native_bf16 else "fp32")
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(UserError, match="fp16"):
        resolve_precision("fp16", "cpu")
    if has_cuda:
        assert resolve_precision("auto", "cuda") == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    else:
        with pytest.raises(UserError, match="run.device=cuda"):
            resolve_device("cuda")


@pytest.mark.parametrize("old,new", [("top_k", "num_experts_per_tok"), ("layers", "moe_layers"),
                                     ("aux_loss_coef", "router_aux_loss_coef"), ("jitter", "router_jitter")])
def test_the_trainers_old_moe_keys_name_their_new_name(old, new):
    """One MoE schema: the trainer's section is the model's MoESettings (model/moe.py) plus the upcycling options,
    the model config holds the same fields, and a config written with the old short names gets the new one in
    its error."""
    import dataclasses

    from flash_experts.model.config import GPT2MoEConfig
    from flash_experts.model.moe import MoESettings
    from flash_experts.training.config import MoEConfig

    settings = {f.name for f in dataclasses.fields(MoESettings)}
    assert {f.name for f in dataclasses.fields(MoEConfig)} == settings | {"expert_noise", "drop_ratio"}
    assert MoEConfig().settings() == MoESettings()
    assert GPT2MoEConfig(n_layer=2).moe_settings() == MoESettings()
    with pytest.raises(ValueError, match=f"'moe.{old}' is now 'moe.{new}'"):
        load_config(None, [f"moe.{old}=1"])


@pytest.mark.parametrize("override, message", [
    ("run.precision=bfloat16", "run.precision='bfloat16' is spelled 'bf16' here"),
    ("run.precision=Half", "run.precision='Half' is spelled 'fp16' here"),
    # other choice fields are not precisions: their own choices are named, not a precision word
    ("run.device=half", "run.device must be one of 'auto', 'cpu', 'cuda', got 'half'"),
    ("model.train=float32", "model.train must be one of 'all', 'moe', got 'float32'"),
])
def test_precision_spellings_are_named_only_for_the_precision_field(override: str, message: str):
    """Reference: the one precision vocabulary (fp32 | bf16 | fp16, every verb's --dtype words)."""
    with pytest.raises(UserError) as caught:
        load_config(None, [override])
    assert message in str(caught.value)
