"""Bad input through the CLI: one line on stderr starting with "error:", a non-zero exit, never a traceback.

Reference: the CLI contract of docs/ARCHITECTURE.md (a user's mistake -> `error: <message>`, exit code 2).
Every case is run through `flash_experts.cli.main.main([...])` in this process (fast); two run as real
subprocesses, where stderr is exactly what a user sees. Beyond the contract, each case names a fragment of
the message it expects, so a case cannot pass by failing for an unrelated reason (exit 1, "error: IndexError:
...", is an internal error, not a clear message, and counts as a failure).

"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from flash_experts.cli.main import main
from flash_experts.training.config import load_config, save_config
from tiny_tokenizer import CORPUS, make_tokenizer  # noqa: E402

# Verbs that load a model print the transformers "Loading weights" progress bar to stderr before any error.

# --------------------------------------------------------------------------------------------- fixtures


def save_hf_model(folder: Path, vocab_size: int, tokenizer=None) -> Path:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=vocab_size, n_positions=64,
                                       bos_token_id=0, eos_token_id=0))
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def w(tmp_path_factory) -> dict[str, Path]:
    """A workspace: a prepared data folder (the real prepare_token_splits), a config, models, a checkpoint."""
    from flash_experts.data.tokens import prepare_token_splits

    root = tmp_path_factory.mktemp("bad_input")
    tokenizer = make_tokenizer()
    data = root / "data"
    prepare_token_splits({"train": CORPUS * 20, "val": CORPUS * 4}, tokenizer, data, source="test")
    config = root / "tiny.yaml"
    save_config(load_config(None, [
        f"run.out_dir={root / 'run'}", "run.device=cpu", "run.quiet=true", "run.precision=fp32",
        "model.base=scratch", "model.n_layer=1", "model.n_embd=32", "model.n_head=4", "model.n_positions=64",
        "moe.num_experts=4", "moe.num_experts_per_tok=2", "moe.moe_layers=all",
        f"data.dir={data}", "data.block_size=16", "data.batch_size=2", "optim.max_steps=1", "optim.warmup_steps=0",
        "eval.interval=1", "eval.batches=1", "tracking.wandb=off", "tracking.tensorboard=false",
    ]), config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["pretrain", "--config", str(config)]) == 0  # a real checkpoint to resume from / damage
    paths = {"root": root, "data": data, "config": config, "checkpoint": root / "run" / "checkpoints" / "step_00000001",
             "model": save_hf_model(root / "model", len(tokenizer), tokenizer),
             "small_vocab_model": save_hf_model(root / "small_vocab_model", 100, tokenizer),
             "small_vocab_base": save_hf_model(root / "small_vocab_base", 100)}
    (root / "empty.txt").write_text("")
    (root / "notes.txt").write_text("some text\n")
    (root / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    (root / "folder.yaml").mkdir()
    (root / "no_text_files").mkdir()
    (root / "binary.yaml").write_bytes(b"\xff\xfe\x00\x80 not text")
    (root / "list.yaml").write_text("- optim\n- data\n")
    (root / "broken.yaml").write_text("optim: [unclosed\n")
    (root / "unknown_key.yaml").write_text("optim:\n  lrr: 0.1\n")
    (root / "cards_unknown.json").write_text('{"cards": [1, 2]}')
    (root / "cards_malformed.json").write_text('{"LEA": {"name": "Alpha", "cards": [1, "Black Lotus"]}}')
    (root / "cards_no_names.json").write_text('{"LEA": {"name": "Alpha", "cards": []}}')
    (root / "cards_numeric_cost.json").write_text(
        '{"LEA": {"name": "Alpha", "cards": [{"name": "Grizzly Bears", "manaCost": 2, "type": "Creature — Bear", '
        '"types": ["Creature"], "text": "", "power": "2", "toughness": "2", "layout": "normal"}]}}')
    (root / "a_file").write_text("not a folder")
    for name, content in {"metrics_garbage": "not json\n{oops\n", "metrics_empty": "", "metrics_list": "[1, 2]\n"}.items():
        (root / name).mkdir()
        (root / name / "metrics.jsonl").write_text(content)
    return paths


def data_variant(w: dict[str, Path], name: str, change) -> Path:
    """A copy of the prepared data folder with `change(folder)` applied."""
    folder = w["root"] / f"data_{name}"
    if not folder.exists():
        shutil.copytree(w["data"], folder)
        change(folder)
    return folder


def checkpoint_variant(w: dict[str, Path], name: str) -> Path:
    """A copy of the trained checkpoint, damaged as `name` says."""
    folder = w["root"] / f"ckpt_{name}"
    if not folder.exists():
        shutil.copytree(w["checkpoint"], folder)
        if name == "state":
            (folder / "trainer_state.pt").write_bytes(b"garbage")
        elif name == "weights":
            (folder / "model.safetensors").write_bytes(b"garbage")
        elif name == "code":
            torch.save({"step": 1, "x": RunsCodeWhenUnpickled(folder / "code_ran")}, folder / "trainer_state.pt")
    return folder


def edit_meta(folder: Path, **changes) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            meta["splits"][section][field] = value
        else:
            meta[key] = value
    (folder / "meta.json").write_text(json.dumps(meta))


class RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def run_cli(argv: list[str], capsys) -> tuple[int, list[str], str]:
    """(exit code, stderr lines as a terminal shows them, stdout); shown warnings count as stderr lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = main([str(arg) for arg in argv])
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
    out, err = capsys.readouterr()
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]  # a progress bar redraws with \r
    shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    lines += [f"{w.category.__name__}: {w.message}" for w in shown]
    return code, lines, out


def assert_one_line_error(argv: list[str], capsys, expected: str) -> None:
    code, lines, out = run_cli(argv, capsys)
    assert "Traceback" not in "\n".join(lines) + out
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert code == 2, (code, lines)  # a user error; exit 1 means an internal error leaked through
    assert re.search(expected, lines[0]), (expected, lines[0])


# ------------------------------------------------------------------------------------------------- cases

def _train(w, *extra):
    return ["pretrain", "--config", w["config"], f"run.out_dir={w['root'] / 'runs_that_fail'}", *extra]


def _finetune(w, *extra):
    return ["finetune", "--config", w["config"], f"run.out_dir={w['root'] / 'runs_that_fail'}", *extra]


TRAINING_CASES = {
    # configs: missing / unreadable files, wrong layout, unknown keys, impossible values
    "config missing": (lambda w: ["pretrain", "--config", w["root"] / "nope.yaml"], "config file not found"),
    "config is a folder": (lambda w: ["pretrain", "--config", w["root"] / "folder.yaml"], "folder.yaml"),
    "config not utf-8": (lambda w: ["pretrain", "--config", w["root"] / "binary.yaml"], "binary.yaml"),
    "config not a mapping": (lambda w: ["pretrain", "--config", w["root"] / "list.yaml"], "must be a mapping"),
    "config broken yaml": (lambda w: ["pretrain", "--config", w["root"] / "broken.yaml"], "not valid YAML"),
    "config unknown key": (lambda w: ["pretrain", "--config", w["root"] / "unknown_key.yaml"], "unknown config key 'optim.lrr'"),
    "override unknown key": (lambda w: _train(w, "optim.lrr=1"), "unknown config key 'optim.lrr'.*optim.lr"),
    "override without =": (lambda w: _train(w, "optim.lr"), "section.key=value"),
    "negative lr": (lambda w: _train(w, "optim.lr=-1"), "optim.lr must be > 0"),
    "block size 0": (lambda w: _train(w, "data.block_size=0"), "data.block_size must be >= 1"),
    "top_k > experts": (lambda w: _train(w, "moe.num_experts_per_tok=9"), "moe.num_experts_per_tok"),
    "batch size not a number": (lambda w: _train(w, "data.batch_size=abc"), "data.batch_size must be a number"),
    # data folders: missing, wrong JSON layout, empty, damaged
    "data dir not set": (lambda w: _train(w, "data.dir=null"), "data.dir is not set"),
    "data dir missing": (lambda w: _train(w, f"data.dir={w['root'] / 'nodata'}"), "not a prepared data folder"),
    "meta.json not json": (lambda w: _train(w, "data.dir=" + str(data_variant(
        w, "badjson", lambda f: (f / "meta.json").write_text("{oops")))), "meta.json is not valid JSON"),
    "meta.json wrong layout": (lambda w: _train(w, "data.dir=" + str(data_variant(
        w, "list", lambda f: (f / "meta.json").write_text("[1, 2]")))), "not a flash-experts data meta file"),
    "empty train split": (lambda w: _train(w, "data.dir=" + str(data_variant(
        w, "empty", lambda f: ((f / "train.bin").write_bytes(b""), edit_meta(f, train__tokens=0))))),
        "training split holds 0 tokens"),
    "train.bin truncated": (lambda w: _train(w, "data.dir=" + str(data_variant(
        w, "truncated", lambda f: (f / "train.bin").write_bytes(b"\0\0\0")))), "train.bin has 3 bytes"),
    "no val split": (lambda w: _train(w, "data.dir=" + str(data_variant(
        w, "noval", lambda f: ((f / "val.bin").unlink(), edit_meta(f, splits={"train": json.loads(
            (f / "meta.json").read_text())["splits"]["train"]}))))), "has no val split"),
    # sequences longer than the model's positions; tokenizer/model vocabulary mismatch
    "block size > positions (scratch)": (lambda w: _train(w, "data.block_size=128"), "data.block_size must be <= model.n_positions"),
    "block size > base positions": (lambda w: _finetune(w, f"model.base={w['model']}", "model.n_positions=128",
                                                          "data.block_size=128"), "exceeds the model's 64 positions"),
    "data vocabulary > model vocabulary": (lambda w: _finetune(w, f"model.base={w['small_vocab_base']}"),
                                           "vocabulary of 300 but the model has 100"),
    "base model missing": (lambda w: _finetune(w, f"model.base={w['root'] / 'no_model'}"), "no_model"),
    # checkpoints: missing, another architecture, damaged, code in the pickle
    "resume missing": (lambda w: _train(w, "--resume", w["root"] / "no_ckpt"), "no checkpoint there"),
    "resume another width": (lambda w: _train(w, "model.n_embd=64", "--resume", w["checkpoint"]),
                             r"another architecture.*\(64, 32\) vs \(64, 64\)"),
    "resume another expert count": (lambda w: _train(w, "moe.num_experts=8", "--resume", w["checkpoint"]),
                                    r"another architecture.*router.weight \(4, 32\) vs \(8, 32\)"),
    "resume dense from moe": (lambda w: _train(w, "moe=null", "--resume", w["checkpoint"]), "does not match|another architecture"),
    "resume corrupt state": (lambda w: _train(w, "--resume", checkpoint_variant(w, "state")),
                             "cannot read .*trainer_state.pt"),
    "resume corrupt weights": (lambda w: _train(w, "--resume", checkpoint_variant(w, "weights")),
                               "cannot read .*model.safetensors"),
}

DATA_AND_PLOT_CASES = {
    "text file missing": (lambda w: ["prepare-data", "text", w["root"] / "missing.txt", "--out", w["root"] / "p",
                                     "--tokenizer", w["data"]], "not found"),
    "text file empty": (lambda w: ["prepare-data", "text", w["root"] / "empty.txt", "--out", w["root"] / "p",
                                   "--tokenizer", w["data"]], "no text found"),
    "folder without text files": (lambda w: ["prepare-data", "text", w["root"] / "no_text_files", "--out",
                                             w["root"] / "p", "--tokenizer", w["data"]], "holds no text files"),
    "binary file as text": (lambda w: ["prepare-data", "text", "/bin/ls", "--out", w["root"] / "p",
                                       "--tokenizer", w["data"]], r"/bin/ls is not a text file \(it holds NUL bytes"),
    "latin-1 file as text": (lambda w: ["prepare-data", "text", w["root"] / "latin1.txt", "--out", w["root"] / "p",
                                        "--tokenizer", w["data"]], "latin1.txt is not UTF-8 text"),
    "binary file to evaluate": (lambda w: ["evaluate", w["model"], "--text", "/bin/ls"], "/bin/ls is not a text file"),
    "tokenizer missing": (lambda w: ["prepare-data", "text", w["root"] / "notes.txt", "--out", w["root"] / "p",
                                     "--tokenizer", w["root"] / "no_tokenizer"], "tokenizer path does not exist"),
    "mtg source missing": (lambda w: ["prepare-data", "mtg", "--source", w["root"] / "nope.json", "--out",
                                      w["root"] / "p", "--no-fetch"], "card source not found"),
    "mtg unknown json layout": (lambda w: ["prepare-data", "mtg", "--source", w["root"] / "cards_unknown.json",
                                           "--out", w["root"] / "p", "--no-fetch"], "not a card file this reader knows"),
    "mtg malformed cards": (lambda w: ["prepare-data", "mtg", "--source", w["root"] / "cards_malformed.json",
                                       "--out", w["root"] / "p", "--no-fetch"], "malformed mtgjson-v3 data"),
    # issue 44's probes: internal errors before, one sentence now
    "mtg whole cards numeric mana cost": (
        lambda w: ["prepare-data", "mtg", "--cards", "--source", w["root"] / "cards_numeric_cost.json", "--out",
                   w["root"] / "p", "--no-fetch"], "malformed mtgjson-v3 data .TypeError: expected a string, got int 2"),
    "mtg names numeric mana cost": (
        lambda w: ["prepare-data", "mtg", "--source", w["root"] / "cards_numeric_cost.json", "--out",
                   w["root"] / "p", "--no-fetch"], "malformed mtgjson-v3 data"),
    "prepare-data --out a file": (lambda w: ["prepare-data", "text", w["root"] / "notes.txt", "--out",
                                             w["root"] / "a_file"], "a_file is a file: give a folder"),
    "prepare-data --out under a file": (lambda w: ["prepare-data", "text", w["root"] / "notes.txt", "--out",
                                                   w["root"] / "a_file" / "p"], "which is a file"),
    "mtg no cards": (lambda w: ["prepare-data", "mtg", "--source", w["root"] / "cards_no_names.json", "--out",
                                w["root"] / "p", "--no-fetch", "--tokenizer", w["data"]], "no documents"),
    "text with --conditioned": (lambda w: ["prepare-data", "text", w["root"] / "notes.txt", "--conditioned",
                                           "--out", w["root"] / "p"], "--conditioned applies to mtg only"),
    "plot run missing": (lambda w: ["plot", w["root"] / "no_run"], "run directory not found"),
    "plot corrupt metrics": (lambda w: ["plot", w["root"] / "metrics_garbage"], "every line is corrupt"),
    "plot empty metrics": (lambda w: ["plot", w["root"] / "metrics_empty"], "holds no metrics records"),
    "plot wrong json layout": (lambda w: ["plot", w["root"] / "metrics_list"], "every line is corrupt"),
}


def _generate(w, *extra, model="model"):
    return ["generate", w[model], "--prompt", "Sword of", "--device", "cpu", "--no-stream",
            "--max-new-tokens", "3", *extra]


OTHER_VERB_CASES = {
    "generate model missing": (lambda w: ["generate", w["root"] / "no_model", "--prompt", "x"], "model folder not found"),
    "generate negative temperature": (lambda w: _generate(w, "--temperature", "-1"), "temperature must be >= 0"),
    "generate nan temperature": (lambda w: _generate(w, "--temperature", "nan"), "temperature must be >= 0"),
    "generate top_p 2": (lambda w: _generate(w, "--top-p", "2"), r"top_p must be in \(0, 1\]"),
    "generate negative top_k": (lambda w: _generate(w, "--top-k", "-3"), "top_k must be an integer >= 0"),
    "generate min_p 5": (lambda w: _generate(w, "--min-p", "5"), "min_p must be in"),
    "generate repetition penalty 0": (lambda w: _generate(w, "--repetition-penalty", "0"), "repetition_penalty must be > 0"),
    "generate max_new_tokens 0": (lambda w: _generate(w, "--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
    "generate num_samples 0": (lambda w: _generate(w, "--num-samples", "0"), "--num-samples must be >= 1"),
    "generate bad regex": (lambda w: _generate(w, "--allow-regex", "("), "allowed_regex must be a valid regular expression"),
    "generate unknown device": (lambda w: _generate(w, "--device", "tpu"), "unknown device 'tpu'"),
    "generate-names 0 names": (lambda w: ["generate-names", w["model"], "-n", "0", "--device", "cpu"], "must be >= 1"),
    "evaluate text missing": (lambda w: ["evaluate", w["model"], "--text", w["root"] / "none.txt", "--device", "cpu"],
                              "not found"),
    "compare one model": (lambda w: ["compare", w["model"], "--out", w["root"] / "cmp"], "at least 2 models"),
    "generate longer than positions": pytest.param(
        lambda w: _generate(w, "--max-new-tokens", "100000"), "exceeds the model's 64 positions"),
    "generate empty stop string": pytest.param(
        lambda w: _generate(w, "--stop", ""), "stop strings must be non-empty"),
    "generate-cards 0 cards": (lambda w: ["generate-cards", w["model"], "-n", "0", "--device", "cpu"],
                               "--num-cards must be >= 1"),
    "generate-cards unknown colour": (lambda w: ["generate-cards", w["model"], "--colors", "Q", "--device", "cpu"],
                                      "unknown colour 'q'"),
    "generate-cards empty colours": (lambda w: ["generate-cards", w["model"], "--colors", "", "--device", "cpu"],
                                     "--colors must not be empty"),  # ran as colourless (issue 44)
    "generate-cards malformed cost": (lambda w: ["generate-cards", w["model"], "--cost", "{G}{1}", "--device", "cpu"],
                                      "is not a mana cost"),
    "generate-names unknown colour": (
        lambda w: ["generate-names", w["model"], "--type", "Creature", "--colors", "X", "--device", "cpu"],
        "unknown colour"),
    "evaluate context 0": pytest.param(
        lambda w: ["evaluate", w["model"], "--text", w["root"] / "notes.txt", "--context", "0", "--device", "cpu"],
        "context must be at least 2"),
    "evaluate context > positions": pytest.param(
        lambda w: ["evaluate", w["model"], "--text", w["root"] / "notes.txt", "--context", "100000", "--device", "cpu"],
        "exceeds the model's maximum of 64 positions"),
    "generate tokenizer vocabulary > model vocabulary": pytest.param(
        lambda w: _generate(w, model="small_vocab_model"), "vocabulary"),
    "evaluate data vocabulary > model vocabulary": pytest.param(
        lambda w: ["evaluate", w["small_vocab_model"], "--data", w["data"], "--device", "cpu", "--quiet"],
        "the model's vocabulary has 100 entries"),
    "generate temperature not a number": pytest.param(
        lambda w: _generate(w, "--temperature", "abc"), "temperature"),
    # one precision vocabulary: old or other spellings name the word to use
    "evaluate --bf16 (renamed)": (lambda w: ["evaluate", w["model"], "--text", w["root"] / "notes.txt", "--bf16"],
                                  "--bf16 is now --dtype bf16"),
    "generate --dtype bfloat16": (lambda w: _generate(w, "--dtype", "bfloat16"), "'bfloat16' is spelled bf16 here"),
    "evaluate --dtype fp16 on cpu": (lambda w: ["evaluate", w["model"], "--text", w["root"] / "notes.txt",
                                                "--device", "cpu", "--dtype", "fp16"], "fp16 needs a CUDA device"),
    "training run.precision=float32": (lambda w: _train(w, "run.precision=float32"),
                                       "run.precision='float32' is spelled 'fp32' here"),
    # export: models with no such format, damaged folders, an output that exists
    "export gpt2 moe": (lambda w: ["export", w["checkpoint"], w["root"] / "x", "--format", "mixtral"],
                        "GPT-2 MoE model has no Mixtral or GGUF form.*trust_remote_code=True"),
    "export dense model": (lambda w: ["export", w["model"], w["root"] / "x.gguf", "--format", "gguf"],
                           "model type llama_moe.*'gpt2'"),
    "export corrupt weights": (lambda w: ["export", checkpoint_variant(w, "weights"), w["root"] / "x",
                                          "--format", "mixtral"], "cannot load the model"),
    "export missing model": (lambda w: ["export", w["root"] / "no_model", w["root"] / "x", "--format", "mixtral"],
                             "model folder not found"),
    "export output exists": (lambda w: ["export", w["checkpoint"], w["root"] / "notes.txt", "--format", "gguf"],
                             "notes.txt already exists"),
    "studio run folder without metrics": (lambda w: ["studio", w["model"], "--run", w["root"] / "no_text_files"],
                                          "no metrics.jsonl there"),
    "studio port out of range": (lambda w: ["studio", w["model"], "--port", "70000"], "--port must be between"),
    "export unknown format": (lambda w: ["export", w["checkpoint"], w["root"] / "x", "--format", "onnx"],
                              "invalid choice: 'onnx'"),
}


@pytest.mark.parametrize(("argv", "expected"), TRAINING_CASES.values(), ids=TRAINING_CASES.keys())
def test_training_bad_input_is_one_error_line(w, capsys, argv, expected):
    """Reference: the CLI contract (one `error:` line naming the problem, exit 2, no traceback)."""
    assert_one_line_error(argv(w), capsys, expected)


@pytest.mark.parametrize(("argv", "expected"), DATA_AND_PLOT_CASES.values(), ids=DATA_AND_PLOT_CASES.keys())
def test_data_and_plot_bad_input_is_one_error_line(w, capsys, argv, expected):
    """Reference: the CLI contract (one `error:` line naming the problem, exit 2, no traceback)."""
    assert_one_line_error(argv(w), capsys, expected)


@pytest.mark.parametrize(("argv", "expected"), OTHER_VERB_CASES.values(), ids=OTHER_VERB_CASES.keys())
def test_generation_and_evaluation_bad_input_is_one_error_line(w, capsys, argv, expected):
    """Reference: the CLI contract (one `error:` line naming the problem, exit 2, no traceback)."""
    assert_one_line_error(argv(w), capsys, expected)


def test_checkpoint_pickle_code_never_runs(w, capsys):
    """Reference: a marker file that exists only if the pickled payload ran while --resume read the state."""
    folder = checkpoint_variant(w, "code")
    assert_one_line_error(_train(w, "--resume", folder), capsys, "not a flash-experts trainer state")
    assert not (folder / "code_ran").exists()


@pytest.mark.parametrize("argv, expected", [
    (lambda w: _train(w, "--resume", checkpoint_variant(w, "state")), "cannot read .*trainer_state.pt"),
    (lambda w: ["prepare-data", "mtg", "--source", w["root"] / "cards_malformed.json", "--out", w["root"] / "p",
                "--no-fetch"], "malformed mtgjson-v3 data"),
], ids=["corrupt checkpoint", "malformed mtg file"])
def test_real_process_stderr_is_exactly_one_error_line(w, argv, expected):
    """Reference: the CLI contract, checked on a real `python -m flash_experts.cli.main` process's stderr."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": src, "OMP_NUM_THREADS": "1", "HOME": str(w["root"])}
    run = subprocess.run([sys.executable, "-m", "flash_experts.cli.main", *map(str, argv(w))],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr + run.stdout
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(expected, lines[0]), run.stderr


# ------------------------------------------------------------------------------------ damaged weights (NaN)


@pytest.fixture(scope="module")
def nan_model(w) -> Path:
    """A loadable checkpoint whose weights hold NaN (one embedding row is enough to poison every logit)."""
    folder = w["root"] / "nan_model"
    if not folder.exists():
        from transformers import AutoTokenizer

        model = GPT2LMHeadModel.from_pretrained(w["model"])
        with torch.no_grad():
            model.transformer.wte.weight.fill_(float("nan"))
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(w["model"]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("verb", ["evaluate", "generate", "compare"])
def test_nan_weights_are_one_error_line_naming_the_model(verb, w, nan_model, capsys):
    """Reference: the CLI contract — a perplexity or a text computed from NaN logits is no result: `error:`
    naming the model, exit 2 (before: `perplexity nan`, exit 0)."""
    argv = {"evaluate": ["evaluate", nan_model, "--text", w["root"] / "notes.txt"],
            "generate": ["generate", nan_model, "--prompt", "some", "--max-new-tokens", "3"],
            "compare": ["compare", w["model"], nan_model, "--text", w["root"] / "notes.txt",
                        "--max-new-tokens", "3", "--out", w["root"] / "nan_compare"]}[verb]
    code, err, _ = run_cli(argv, capsys)
    errors = [line for line in err if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err
    assert "non-finite logits" in errors[0] and "nan_model" in errors[0]


def test_a_value_error_from_inside_a_library_is_an_internal_error_not_the_users(capsys):
    """A bare ValueError raised inside torch or transformers is a bug: exit 1 naming its type, while the
    library's own ConfigError (a user's bad value) stays exit 2. Reference: the two errors raised by hand."""
    from flash_experts.cli.main import report_errors
    from flash_experts.errors import ConfigError

    def raising(error: BaseException):
        def func():
            raise error
        return func

    for error, code, start in ((ValueError("inside torch"), 1, "error: ValueError: inside torch"),
                               (ConfigError("optim.lr must be > 0"), 2, "error: optim.lr must be > 0")):
        assert report_errors(raising(error)) == code
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(start), lines
