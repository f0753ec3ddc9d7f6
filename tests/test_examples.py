"""The original scripts (examples/*.py) as the two original READMEs use them: each chain run in order, offline,
in a fresh folder, every script with no arguments but the base, finding the previous one's output.

Reference: the chain's contract written in examples/common.py (data/mtg -> models/mtg-names -> generation;
data/... -> models/wikitext-moe -> comparison), the trainer's files in a run folder, and the CLI's error
contract (one `error:` line, exit code 2). Tiny sizes come from FLASH_EXPERTS_EXAMPLES_TINY=1 and a tiny
GPT-2 base (conftest.tiny_base) with the real GPT-2 tokenizer (offline BPE files), so no hub is needed.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
WORDS = ("Ancient Blazing Silent Grim Verdant Shadow Storm Iron Golden Hollow Feral Crystal Ember Frost Tidal "
         "Dragon Serpent Knight Oracle Wurm Phoenix Golem Titan Specter Angel Rite Bolt Vault Gate Crown").split()


@pytest.fixture(scope="module")
def card_file(tmp_path_factory) -> Path:
    """An MTGJSON v3 file with 225 card names (enough for every split of the hash split to hold some)."""
    names = [f"{a} {b}" for a in WORDS[:15] for b in WORDS[15:]]  # 15 x 15
    colors = ["Green", "Red", "Blue", "Black", "White"]
    cards = [{"name": name, "layout": "normal", "type": "Creature — Elf" if i % 2 else "Instant",
              "types": ["Creature" if i % 2 else "Instant"], "colors": [colors[i % 5]], "rarity": "Common"}
             for i, name in enumerate(names)]
    file = tmp_path_factory.mktemp("cards") / "AllSets.json"
    file.write_text(json.dumps({"TST": {"name": "Test Set", "code": "TST", "type": "expansion",
                                        "releaseDate": "2020-01-01", "cards": cards}}), encoding="utf-8")
    return file


def run_script(name: str, *args: str, cwd: Path, tiny: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "FLASH_EXPERTS_EXAMPLES_TINY": "1" if tiny else "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def one_error_line(result: subprocess.CompletedProcess, expected: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_mtg_chain_runs_in_order_and_each_script_finds_the_previous_output(tiny_base, card_file, tmp_path):
    out = ok(run_script("prepare_mtg_data", "--source", str(card_file), "--base", str(tiny_base), cwd=tmp_path))
    meta = json.loads((tmp_path / "data/mtg/meta.json").read_text())
    assert meta["base"] == str(tiny_base) and meta["format"] == "mtg-names"
    assert all(meta["splits"][split]["documents"] > 0 for split in ("train", "val", "test"))
    assert len((tmp_path / "data/mtg/card_names.txt").read_text().splitlines()) == 225
    assert "next: python examples/finetune_mtg_names.py" in out

    out = ok(run_script("finetune_mtg_names", cwd=tmp_path))  # no arguments: data/mtg and its base
    run = tmp_path / "models/mtg-names"
    trained = yaml.safe_load((run / "config.yaml").read_text())
    assert trained["model"]["base"] == str(tiny_base) and trained["data"]["dir"] == "data/mtg"
    assert (run / "best/config.json").is_file() and (run / "metrics.jsonl").is_file()
    assert list((run / "wandb").glob("offline-run-*")), "W&B offline files"
    assert "validation perplexity" in out

    out = ok(run_script("generate_mtg_names", cwd=tmp_path))
    assert "models/mtg-names/best (plain names); 225 real names" in out  # the names from data/mtg, not elsewhere
    assert out.count("validity ") == 5  # four selection settings, then the reported names
    assert "== temperature" in out

    out = ok(run_script("generate_names", cwd=tmp_path))
    assert out.strip().splitlines()[-1].startswith("validity ")


def test_mtg_chain_conditioned_asks_for_type_lines(tiny_base, card_file, tmp_path):
    ok(run_script("prepare_mtg_data", "--conditioned", "--source", str(card_file), "--base", str(tiny_base),
                  cwd=tmp_path))
    ok(run_script("finetune_mtg_names", cwd=tmp_path))
    out = ok(run_script("generate_mtg_names", "--count", "2", cwd=tmp_path))
    assert "conditioned on type and colours" in out
    assert "Creature — Elf | G |" in out and out.count("validity ") == 3  # one setting x 3 type lines


def write_wikitext(folder: Path, splits=("train", "valid", "test")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    article = " = {title} = \n\n The {title} is a river in the north . It is known for its bridges and its fish . \n\n"
    for split in splits:
        text = "".join(article.format(title=f"{split.title()} River {i}") for i in range(40))
        (folder / f"wiki.{split}.raw").write_text(text, encoding="utf-8")
    return folder


def test_wikitext_chain_trains_measures_before_after_and_compares(tiny_base, tmp_path):
    wikitext = write_wikitext(tmp_path / "wikitext-2-raw")
    out = ok(run_script("finetune_moe_flash", "--base", str(tiny_base), "--wikitext", str(wikitext), cwd=tmp_path))
    assert "training text: wikitext-2-raw-v1 -> data/wikitext" in out
    before, after = out.split("WikiText-2 test perplexity")[1].split("\n")[0].split("base ")[1].split(" -> fine-tuned ")
    assert float(before) > 0 and float(after) > 0
    run = tmp_path / "models/wikitext-moe"
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["attention"] == "flash"

    out = ok(run_script("combined_moe_flash", "--wikitext", str(wikitext), cwd=tmp_path))  # finds models/wikitext-moe
    for setting in ("greedy", "temperature 0.8", "top-k 50, top-p 0.9", "repetition penalty", "banned words"):
        assert f"--- {setting}" in out
    assert "[pretrained]" in out and "[fine-tuned MoE]" in out
    report = (run / "comparison/report.md").read_text()
    assert "pretrained" in report and "fine-tuned MoE" in report and "WikiText-2 raw test split" in report
    assert (run / "comparison/generations.md").read_text().count("**fine-tuned MoE**") == 10  # 2 prompts x 5


def test_wikitext_offline_without_a_train_split_trains_on_wikipedia(tmp_path, monkeypatch):
    """Reference: the offline rule — WikiText-2's train split is only on the hub; a folder with the test split
    alone (as ../shared/data has) is no training text, so the Wikipedia summaries are used and it says so."""
    pytest.importorskip("flash_experts.data.text")
    from flash_experts.data.text import WIKI_OFFLINE, WIKI_OFFLINE_FILE, installed_data_file

    if installed_data_file(WIKI_OFFLINE[0], WIKI_OFFLINE_FILE) is None:
        pytest.skip(f"{WIKI_OFFLINE[0]} is not installed (requirements-offline.txt)")
    monkeypatch.setenv("FLASH_EXPERTS_WIKITEXT_DIR", str(write_wikitext(tmp_path / "test-only", splits=("test",))))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from finetune_moe_flash import training_text

    source, documents = training_text(None)
    assert source == "wikipedia-summaries" and len(documents["train"]) > 1000


@pytest.fixture
def run_here(tmp_path, monkeypatch, capsys):
    """Run an example script in this process, as `python examples/NAME.py ARGS` would in `tmp_path` (fast: no
    new interpreter); returns (exit code, stdout, stderr lines). The real-process runs above cover the rest."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.syspath_prepend(str(EXAMPLES))

    def run(name: str, *args: str, tiny: bool = True) -> tuple[int, str, list[str]]:
        monkeypatch.setenv("FLASH_EXPERTS_EXAMPLES_TINY", "1" if tiny else "0")
        monkeypatch.setattr(sys, "argv", [str(EXAMPLES / f"{name}.py"), *map(str, args)])
        code = 0
        try:
            runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        return code, out, [line for line in re.split(r"[\r\n]", err) if line.strip()]

    return run


def assert_one_error(result: tuple[int, str, list[str]], expected: str) -> None:
    code, _, err = result
    errors = [line for line in err if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and expected in errors[0], err
    assert not any("Traceback" in line for line in err)


def test_scripts_without_the_previous_step_say_what_to_run(run_here, tmp_path):
    assert_one_error(run_here("finetune_mtg_names"),
                     "no prepared card names in data/mtg: run examples/prepare_mtg_data.py first")
    for script in ("generate_mtg_names", "generate_names"):
        assert_one_error(run_here(script),
                         "no fine-tuned model in models/mtg-names: run examples/finetune_mtg_names.py first")
    assert_one_error(run_here("combined_moe_flash"),
                     "no fine-tuned model in models/wikitext-moe: run examples/finetune_moe_flash.py first")
    # And as a user sees it: a real process, stderr exactly one line.
    one_error_line(run_script("generate_names", cwd=tmp_path), "run examples/finetune_mtg_names.py first")


OFF = "tracking.wandb=off"  # W&B's offline files are checked in the real-process chain above


def test_scripts_bad_input_is_one_error_line(run_here, tiny_base, card_file, tmp_path):
    assert_one_error(run_here("prepare_mtg_data", "--source", tmp_path / "missing.json"), "missing.json")
    assert run_here("prepare_mtg_data", "--source", card_file, "--base", tiny_base)[0] == 0
    assert_one_error(run_here("finetune_mtg_names", "optim.lr=-1"), "optim.lr must be > 0")
    assert_one_error(run_here("finetune_mtg_names", "optim.max_steps=4", "optim.warmup_steps=9"),
                     "optim.warmup_steps must be <= optim.max_steps=4")
    assert_one_error(run_here("finetune_moe_flash", "--base", tiny_base, "moe.num_experts_per_tok=9"), "moe.num_experts_per_tok")
    assert_one_error(run_here("finetune_mtg_names", "--base", "not-a-model/x/y"), "model folder not found")
    assert_one_error(run_here("generate_names", tmp_path / "no-model"), "no fine-tuned model in")
    assert_one_error(run_here("generate_mtg_names", "--count", "0"), "--count must be >= 1")
    assert not (tmp_path / "models").exists()  # nothing was trained, nothing half-written


def test_a_second_fine_tune_never_overwrites_the_first(run_here, tiny_base, card_file, tmp_path):
    assert run_here("prepare_mtg_data", "--source", card_file, "--base", tiny_base)[0] == 0
    assert run_here("finetune_mtg_names", OFF)[0] == 0
    best = tmp_path / "models/mtg-names/best/model.safetensors"
    saved = best.read_bytes()
    assert_one_error(run_here("finetune_mtg_names", OFF), "already holds a run: pass --resume")
    assert best.read_bytes() == saved
    code, out, _ = run_here("finetune_mtg_names", "--resume", "optim.max_steps=3", OFF)
    assert code == 0 and "completed: 3 steps" in out  # continued from step 2, not restarted


def test_max_steps_below_the_scripts_warmup_shortens_it(run_here, tiny_base, card_file, tmp_path):
    """Reference: load_config's rule for dependent defaults — the warm-up keeps its share of the run."""
    assert run_here("prepare_mtg_data", "--source", card_file, "--base", tiny_base)[0] == 0
    code, _, err = run_here("finetune_mtg_names", "optim.max_steps=3", "eval.interval=3", "data.block_size=16",
                            "data.batch_size=2", "eval.batches=1", OFF, tiny=False)
    assert code == 0, err
    assert any("warm-up shortened to 0 steps, its share of the planned 60" in line for line in err)
    assert yaml.safe_load((tmp_path / "models/mtg-names/config.yaml").read_text())["optim"]["warmup_steps"] == 0


def test_setup_env_puts_src_first_on_pythonpath():
    result = subprocess.run(["bash", "-c", f"source {ROOT / 'setup_env.sh'} >/dev/null && echo $PYTHONPATH"],
                            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "/elsewhere"})
    assert result.stdout.strip() == f"{ROOT / 'src'}:/elsewhere"


def test_mtg_cards_chain_prepares_trains_and_judges_whole_cards(tiny_base, card_file, tmp_path):
    """The cards chain (docs/CARDS.md): whole-card documents, the same fine-tuning script, then generated cards
    each with the grammar's verdict. The test's cards (the names file above) have no rules text and no P/T, and
    the grammar, which the preparing script runs over the real cards, passes none of them."""
    out = ok(run_script("prepare_mtg_data", "--cards", "--source", str(card_file), "--base", str(tiny_base),
                        cwd=tmp_path))
    meta = json.loads((tmp_path / "data/mtg-cards/meta.json").read_text())
    assert meta["format"] == "mtg-cards" and meta["base"] == str(tiny_base)
    # none passes: its creatures have no P/T and its instants no rules text (names-only test data)
    assert "the card grammar passes 0 of 225 real cards" in out, out
    assert len(json.loads((tmp_path / "data/mtg-cards/cards.json").read_text())) == 225
    ok(run_script("finetune_mtg_names", "--data", "data/mtg-cards", "--out", "models/mtg-cards", cwd=tmp_path))
    out = ok(run_script("generate_mtg_cards", cwd=tmp_path))
    assert re.search(r"\d+ samples: parse \d+%, pass every rule check \d+%", out)
    one_error_line(run_script("prepare_mtg_data", "--cards", "--conditioned", cwd=tmp_path), "two different formats")
