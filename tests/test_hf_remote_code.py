"""Checkpoint folders that load anywhere, and a plain `import flash_experts` that registers the Auto classes.

References: the in-process model's own logits and greedy tokens, compared with what a separate Python makes
of the saved folder: one where `flash_experts` cannot be imported at all (`sys.modules["flash_experts"] =
None`, so any import of it raises) and only torch and transformers are there, loading with
`trust_remote_code=True`; and ones that import only the package root.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from conftest import tiny_gpt2_config
from flash_experts.model import upcycle
from test_llama_moe import randomize, tiny_llama_config

PROMPT = [[5, 17, 42, 99, 7, 3]]


def saved_moe(tmp_path, family: str):
    torch.manual_seed(0)
    dense = LlamaForCausalLM(tiny_llama_config()) if family == "llama" else GPT2LMHeadModel(tiny_gpt2_config())
    moe = randomize(upcycle(dense, num_experts=4, top_k=2)).eval()
    folder = tmp_path / f"{family}-moe"
    moe.save_pretrained(folder)
    return moe, folder


def run_python(code: str, tmp_path) -> dict:
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "hf_modules"), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


REPORT = f"""
import json, torch
def report(model, torch_early=False):
    ids = torch.tensor({PROMPT})
    with torch.no_grad():
        logits = model(ids).logits[0].tolist()
    greedy = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=1)[0].tolist()
    return dict(module=type(model).__module__, logits=logits, greedy=greedy, torch_early=torch_early)
"""


def expected(moe) -> tuple[torch.Tensor, list[int]]:
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        logits = moe(ids).logits[0]
    greedy = moe.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=1)[0].tolist()
    return logits, greedy


def test_folders_load_with_remote_code_where_flash_experts_cannot_be_imported(tmp_path):
    """Both families, and a model loaded that way saving a folder of its own that loads again (one
    subprocess for all three: each costs seconds of imports)."""
    models, folders = {}, {}
    for family in ("llama", "gpt2"):
        models[family], folders[family] = saved_moe(tmp_path, family)
        config = json.loads((folders[family] / "config.json").read_text())
        model_file = config["auto_map"]["AutoModelForCausalLM"].split(".")[0]
        assert (folders[family] / f"{model_file}.py").is_file()
        for file in folders[family].glob("*.py"):  # the bundle names no module of ours: relative imports only
            for node in ast.walk(ast.parse(file.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0:
                    assert not (node.module or "").startswith("flash_experts"), (file.name, node.module)
    again = tmp_path / "saved_again"
    code = (
        "import sys, json\n"
        "sys.modules['flash_experts'] = None  # any import of our package now raises ImportError\n"
        "from transformers import AutoModelForCausalLM\n"
        + REPORT +
        "reports = {}\n"
        f"folders = {{'llama': {str(folders['llama'])!r}, 'gpt2': {str(folders['gpt2'])!r}, 'again': {str(again)!r}}}\n"
        "for name in ('llama', 'gpt2', 'again'):\n"
        "    if name == 'again':\n"
        "        AutoModelForCausalLM.from_pretrained(folders['llama'], trust_remote_code=True).save_pretrained("
        "folders['again'])\n"
        "    model = AutoModelForCausalLM.from_pretrained(folders[name], trust_remote_code=True).eval()\n"
        "    reports[name] = report(model)\n"
        "print(json.dumps(reports))\n"
    )
    reports = run_python(code, tmp_path)
    for name, family in (("llama", "llama"), ("gpt2", "gpt2"), ("again", "llama")):
        report = reports[name]
        assert report["module"].startswith("transformers_modules."), name
        logits, greedy = expected(models[family])
        torch.testing.assert_close(torch.tensor(report["logits"]), logits, atol=1e-5, rtol=1e-5)
        assert report["greedy"] == greedy, name
    assert sorted(p.name for p in again.glob("*.py")) == sorted(p.name for p in folders["llama"].glob("*.py"))


@pytest.mark.parametrize("order", ["flash_experts first", "transformers first", "flash_experts.model"])
def test_package_import_registers_the_auto_classes(tmp_path, order):
    """A plain `import flash_experts` registers our types whichever package the program imports first (issue
    35: with flash_experts first, `from_pretrained` asked for trust_remote_code); no import hook: the package's
    last lines run as read. Reference: the in-process model's logits and greedy tokens."""
    moe, folder = saved_moe(tmp_path, "llama")
    imports = {"flash_experts first": "import flash_experts\nfrom transformers import AutoModelForCausalLM\n",
               "transformers first": "from transformers import AutoModelForCausalLM\nimport flash_experts\n",
               "flash_experts.model": "import flash_experts.model\nfrom transformers import AutoModelForCausalLM\n"}
    code = imports[order] + REPORT + (
        f"model = AutoModelForCausalLM.from_pretrained({str(folder)!r}).eval()\n"
        "print(json.dumps(report(model)))\n"
    )
    report = run_python(code, tmp_path)
    assert report["module"] == "flash_experts.model.llama_moe"
    logits, greedy = expected(moe)
    torch.testing.assert_close(torch.tensor(report["logits"]), logits, atol=1e-6, rtol=1e-6)
    assert report["greedy"] == greedy


TORCH_AT_IMPORT = "import sys\n{setup}\nimport flash_experts\nprint('torch' in sys.modules)\n"


@pytest.mark.parametrize(("setup", "imports_torch"), [
    ("", True),  # a user's program: flash_experts registers, which loads torch
    ("sys.argv[0] = '/venv/bin/flash-experts'", False),  # the console script sets torch's environment first
    ("sys.argv[0] = 'C:/venv/Scripts/flash-experts.exe'", False),
    ("sys.argv[0] = '/venv/bin/other-tool'", True),
])
def test_only_our_own_programs_import_the_package_without_torch(tmp_path, setup, imports_torch):
    """Reference: `sys.modules` after the import, in a fresh interpreter. The command line must set OpenMP's
    wait policy and the allocator's settings before torch loads (cli/main.py), and `--help` stays instant."""
    result = subprocess.run([sys.executable, "-c", TORCH_AT_IMPORT.format(setup=setup)], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == [str(imports_torch)]


@pytest.mark.parametrize("program", ["-m flash_experts.cli.main --help", "benchmarks/common.py",
                                     "examples/common.py"])  # common.py: what each benchmark / example imports first
def test_our_programs_load_torch_after_setting_its_environment(program):
    """`python -X importtime` lists every module in the order it was imported: torch must come after
    flash_experts.cpu_memory (which sets the wait policy libgomp reads when torch loads it), or not at all."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    arguments = program.split() if program.startswith("-m") else [os.path.join(root, program)]
    result = subprocess.run([sys.executable, "-X", "importtime", *arguments], capture_output=True, text=True,
                            timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr[-2000:]
    modules = [line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")]
    assert "flash_experts.cpu_memory" in modules
    assert "torch" not in modules[:modules.index("flash_experts.cpu_memory")]
    if program.startswith("-m"):
        assert "torch" not in modules  # --help stays instant


def test_a_source_loaded_from_gguf_leaves_no_quantization_config_in_our_folders(tmp_path):
    """SmolLM2 comes dequantized from a GGUF file; transformers records that as `quantization_config`. Our
    float weights must not carry it: transformers would look for that GGUF file when loading the folder."""
    torch.manual_seed(0)
    dense = LlamaForCausalLM(tiny_llama_config())
    gguf_record = {"quant_method": "gguf", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf", "dequantize": False}
    dense.config.quantization_config = dict(gguf_record)
    moe = upcycle(dense, num_experts=2, top_k=1)
    assert getattr(moe.config, "quantization_config", None) is None
    moe.config.quantization_config = dict(gguf_record)  # as in folders upcycled before the fix
    moe.save_pretrained(tmp_path / "moe")
    assert "quantization_config" not in json.loads((tmp_path / "moe" / "config.json").read_text())
