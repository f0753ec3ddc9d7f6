"""`flash-experts evaluate` and `compare` end to end on tiny saved models, checked against the library calls."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(min(2, torch.get_num_threads()))

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402

from flash_experts.cli.main import main  # noqa: E402
from flash_experts.evaluation.perplexity import evaluate_perplexity  # noqa: E402

TEXT = "the cat sat on the mat. the dog sat on the log. a bird sat on the wall.\n" * 3  # ~220 characters

@pytest.fixture(scope="module")
def saved_models(tmp_path_factory) -> tuple:
    """Two tiny GPT-2s (different seeds) saved with a character tokenizer; returns (folders, models)."""
    alphabet = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")
    folders, loaded = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=len(vocab), n_positions=64,
                                           eos_token_id=0, bos_token_id=0)).eval()
        folder = tmp_path_factory.mktemp(f"model{seed}")
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
        loaded.append(model)
    text_file = tmp_path_factory.mktemp("text") / "eval.txt"
    text_file.write_text(TEXT)
    return folders, loaded, tokenizer, text_file


def test_evaluate_cli_json_matches_library(saved_models, tmp_path):
    """Reference: evaluate_perplexity called directly on the same tokens with the same windows."""
    folders, loaded, tokenizer, text_file = saved_models
    out = tmp_path / "ppl.json"
    code = main(["evaluate", str(folders[0]), "--text", str(text_file), "--stride", "32", "--batch-size", "2",
                 "--device", "cpu", "--router-stats", "--quiet", "--json", str(out)])
    assert code == 0
    numbers = json.loads(out.read_text())
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    expected = evaluate_perplexity(loaded[0], ids, stride=32, quiet=True)
    assert numbers["perplexity"] == pytest.approx(expected.perplexity, rel=1e-5)
    assert numbers["tokens_scored"] == ids.numel() - 1 and numbers["context"] == 64
    assert numbers["routing"] == {"layers": [], "summary": {}}  # dense


def test_evaluate_cli_errors_are_one_line(saved_models, tmp_path, capsys):
    """Reference: the CLI contract (exit code 2, one `error:` line) for a missing file and a too-long context."""
    folders, _, _, text_file = saved_models
    assert main(["evaluate", str(folders[0]), "--text", str(tmp_path / "nope.txt"), "--device", "cpu"]) == 2
    assert main(["evaluate", str(folders[0]), "--text", str(text_file), "--context", "65", "--device", "cpu"]) == 2
    assert main(["evaluate", str(folders[0]), "--device", "cpu"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(lines) == 3
    assert "not found" in lines[0] and "exceeds" in lines[1] and "choose the evaluation data" in lines[2]


def test_compare_cli_writes_report(saved_models, tmp_path):
    """Reference: sum(p.numel()) of each saved model and the library perplexity on the same text."""
    folders, loaded, tokenizer, text_file = saved_models
    out = tmp_path / "cmp"
    code = main(["compare", str(folders[0]), str(folders[1]), "--name", "alpha", "--name", "beta", "--out", str(out),
                 "--text", str(text_file), "--prompt", "the", "--seed", "0", "1", "--max-new-tokens", "4",
                 "--speed-batch-size", "1", "--speed-seq-len", "16", "--device", "cpu", "--quiet"])
    assert code == 0
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    for name, model, entry in zip(("alpha", "beta"), loaded, results["models"]):
        assert name in report and entry["name"] == name
        assert entry["parameters"]["total"] == sum(p.numel() for p in model.parameters())
        assert f"{sum(p.numel() for p in model.parameters()):,}" in report
        expected = evaluate_perplexity(model, ids, quiet=True).perplexity
        assert entry["perplexity"]["perplexity"] == pytest.approx(expected, rel=1e-5)
        assert len(entry["generations"]) == 2
    assert results["settings"]["seeds"] == [0, 1]
    assert all((out / name).stat().st_size > 1000 for name in ("perplexity.png", "throughput.png", "parameters.png"))


@pytest.mark.parametrize("quantize, model_indices", [(["int8"], [0, 1]), (["none", "int8"], [0, 0])])
def test_compare_cli_quantize_int8_reports_int8_models(saved_models, tmp_path, quantize, model_indices):
    """Reference: the library on each model as loaded (`quantize_int8` of it where asked) for the perplexity,
    and the unquantized model's sum(p.numel()) for the parameter count (the storage does not change it).
    One --quantize value applies to every model; one per model compares a model with its int8 self."""
    import copy

    from flash_experts.model.quantize import quantize_int8

    folders, loaded, tokenizer, text_file = saved_models
    out = tmp_path / "cmp"
    code = main(["compare", *(str(folders[i]) for i in model_indices), "--out", str(out), "--text", str(text_file),
                 "--prompt", "the", "--max-new-tokens", "3", "--speed-batch-size", "1", "--speed-seq-len", "16",
                 "--device", "cpu", "--quiet", "--quantize", *quantize])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    ids = torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    for q, i, entry in zip(quantize * (3 - len(quantize)), model_indices, results["models"]):
        model = loaded[i]
        fp32_perplexity = evaluate_perplexity(model, ids, quiet=True).perplexity
        int8_perplexity = evaluate_perplexity(quantize_int8(copy.deepcopy(model)), ids, quiet=True).perplexity
        assert int8_perplexity != pytest.approx(fp32_perplexity, rel=1e-6)
        assert entry["dtype"] == ("int8 weights, float32" if q == "int8" else "float32")
        assert entry["name"].endswith(" (int8)") == (q == "int8")
        assert entry["parameters"]["total"] == sum(p.numel() for p in model.parameters())
        expected = int8_perplexity if q == "int8" else fp32_perplexity
        assert entry["perplexity"]["perplexity"] == pytest.approx(expected, rel=1e-5)


def test_evaluate_cli_router_stats_count_each_token_once(saved_models, tmp_path):
    """Plain arithmetic reference: with overlapping windows (stride 8 < context 64) the routing table still
    covers each token of the text once: tokens == len(ids) and assignments == len(ids) * top_k."""
    from flash_experts.model import upcycle_gpt2

    _, loaded, tokenizer, text_file = saved_models
    folder = tmp_path / "moe"
    upcycle_gpt2(loaded[0], num_experts=4, top_k=2, moe_layers="all").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "ppl.json"
    assert main(["evaluate", str(folder), "--text", str(text_file), "--stride", "8", "--device", "cpu",
                 "--router-stats", "--quiet", "--json", str(out)]) == 0
    numbers = json.loads(out.read_text())
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert numbers["windows"] > len(ids) // 64 + 1  # the perplexity windows overlap
    (layer,) = numbers["routing"]["layers"]
    assert layer["tokens"] == len(ids) and layer["assignments"] == 2 * len(ids)
    # The expert atlas routes the same windows once: its per-expert assignments are the routing table's.
    (atlas_layer,) = numbers["expert_atlas"]["layers"]
    assert numbers["expert_atlas"]["tokens"] == len(ids)
    assert [e["assignments"] for e in atlas_layer["experts"]] == layer["tokens_per_expert"]
    # How far apart the experts are comes with the table (the trainer logs it too): exact copies, 0.
    assert layer["expert_distance"] == 0.0


def test_evaluate_cli_router_stats_of_a_quantized_moe(saved_models, tmp_path):
    """Reference: the same model in float (the routing table counts the same tokens); quantized experts keep
    no float stacks, so their distance is not measured (NaN) instead of failing the evaluation."""
    from flash_experts.model import upcycle_gpt2

    _, loaded, tokenizer, text_file = saved_models
    folder = tmp_path / "moe"
    upcycle_gpt2(loaded[0], num_experts=4, top_k=2, moe_layers="all").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    tables = {}
    for quantize in ("none", "int8"):
        out = tmp_path / f"{quantize}.json"
        assert main(["evaluate", str(folder), "--text", str(text_file), "--device", "cpu", "--router-stats",
                     "--quantize", quantize, "--quiet", "--json", str(out)]) == 0
        (tables[quantize],) = json.loads(out.read_text())["routing"]["layers"]
    assert tables["int8"]["tokens"] == tables["none"]["tokens"]
    assert tables["none"]["expert_distance"] == 0.0 and tables["int8"]["expert_distance"] != tables["int8"]["expert_distance"]


@pytest.mark.parametrize(
    "verb_arguments, message",
    [
        (["evaluate", "{model}", "--text", "{folder}"], "is a folder"),
        (["evaluate", "{model}", "--text", "{text}", "--json", "{folder}"], "is a folder: name a file"),
        (["evaluate", "{model}", "--text", "{text}", "--json", "{folder}/missing/out.json"], "--json"),
        (["compare", "{model}", "{model2}", "--out", "{text}", "--text", "{text}"], "--out"),
        (["compare", "{model}", "{model2}", "--out", "{folder}/c", "--text", "{text}", "--speed-seq-len", "0"],
         "speed_seq_len"),
        (["compare", "{model}", "{model2}", "--out", "{folder}/c", "--text", "{text}", "--max-tokens", "-5"],
         "max_eval_tokens"),
        (["compare", "{model}", "{model2}", "--out", "{folder}/c", "--text", "{text}", "--quantize", "int8", "none",
          "int8"], "--quantize"),
    ],
)
def test_cli_absurd_arguments_are_one_line_errors(saved_models, tmp_path, capsys, verb_arguments, message):
    """Hand-listed absurd arguments: exit code 2 and one `error:` line naming the problem."""
    folders, _, _, text_file = saved_models
    values = {"model": folders[0], "model2": folders[1], "text": text_file, "folder": tmp_path}
    argv = [a.format(**values) for a in verb_arguments] + ["--device", "cpu", "--quiet"]
    assert main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and message in errors[0]
