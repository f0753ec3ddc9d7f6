"""lm-evaluation-harness runs on our checkpoints (remote code, a local-file task) and agrees with our evaluator.

Reference: lm-eval's own numbers (`lm_eval --model hf --model_args pretrained=FOLDER,trust_remote_code=True`,
run as the command a user types) against `flash_experts.evaluation.lm_eval_task.rolling_scores` on the same
texts and model. Skipped where lm-eval is not installed (`pip install lm-eval`; not in CI's default path).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import LlamaForCausalLM

from flash_experts.evaluation.lm_eval_task import rolling_scores, write_text_task
from flash_experts.model import upcycle
from test_llama_moe import randomize, tiny_llama_config
from tiny_tokenizer import CORPUS, make_tokenizer


def saved_moe(folder):
    """A random-weight Llama MoE with a BOS-bearing tokenizer, saved to `folder`; returns (model, tokenizer)."""
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    dense = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id))
    moe = randomize(upcycle(dense, num_experts=4, top_k=2))
    moe.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return moe, tokenizer


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
def test_lm_eval_rolling_perplexity_equals_ours(tmp_path):
    moe, tokenizer = saved_moe(tmp_path / "model")
    texts = [CORPUS[2] + ", " + CORPUS[5], CORPUS[1] + ". " + CORPUS[4], " ".join(reversed(CORPUS)) * 2]
    task = write_text_task(texts, tmp_path / "task")
    max_length = 48  # the last text is longer: several windows
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={tmp_path / 'model'},trust_remote_code=True,max_length={max_length},dtype=float32",
               "--include_path", str(tmp_path / "task"), "--tasks", task, "--device", "cpu", "--batch_size", "1",
               "--output_path", str(tmp_path / "out"), "--log_samples"]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               HF_MODULES_CACHE=str(tmp_path / "modules"), HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"][task]
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("samples_*.jsonl")).read_text().splitlines()]
    theirs_per_doc = {s["doc_id"]: float(s["resps"][0][0]) for s in samples}  # each document's total log-likelihood
    moe.eval()
    fits = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) <= max_length for t in texts]
    assert fits == [True, True, False]
    for index, text in enumerate(texts):
        ours = rolling_scores(moe, tokenizer, [text], max_length)["loglikelihood"]
        # one window: the very same sums; several: lm-eval's last window keeps more history (module docstring)
        assert ours == pytest.approx(theirs_per_doc[index], rel=1e-5 if fits[index] else 3e-2), index
    ours_all = rolling_scores(moe, tokenizer, texts, max_length)
    for name in ("word_perplexity", "byte_perplexity"):  # exp(-mean log-likelihood): compared as logs
        assert math.log(ours_all[name]) == pytest.approx(math.log(results[f"{name},none"]), rel=3e-2), name
    assert ours_all["bits_per_byte"] == pytest.approx(results["bits_per_byte,none"], rel=3e-2)


def test_evaluate_prefix_bos_scores_every_token_as_rolling_scores_does(tmp_path):
    """`flash-experts evaluate --prefix-bos` (the CLI) against `rolling_scores` on a text that spans several
    windows: the same bits per byte, and the lm-eval task folder holds the text as one document."""
    from flash_experts.cli.main import main

    moe, tokenizer = saved_moe(tmp_path / "model")
    text = " ".join(CORPUS) + "\n" + " ".join(reversed(CORPUS))
    (tmp_path / "text.txt").write_text(text)
    argv = ["evaluate", str(tmp_path / "model"), "--text", str(tmp_path / "text.txt"), "--prefix-bos",
            "--context", "33", "--stride", "32", "--quiet", "--device", "cpu", "--json", str(tmp_path / "out.json"),
            "--lm-eval-task", str(tmp_path / "task")]
    assert main(argv) == 0
    numbers = json.loads((tmp_path / "out.json").read_text())
    assert numbers["windows"] > 1
    expected = rolling_scores(moe.eval(), tokenizer, [text], max_length=32)
    assert numbers["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], rel=1e-6)
    documents = (tmp_path / "task" / "docs.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in documents] == [text]
