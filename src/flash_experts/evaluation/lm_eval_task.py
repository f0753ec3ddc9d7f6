"""lm-evaluation-harness on local text (the hub is offline here), and our evaluator measuring the same thing.

`write_text_task` writes a task folder for `lm_eval --include_path DIR --tasks flash_experts_text`: the texts
as a JSON-lines file and a task YAML of lm-eval's `loglikelihood_rolling` type (its WikiText task without the
hub dataset), reporting word perplexity, byte perplexity and bits per byte.

`rolling_scores` computes those three numbers with our `evaluate_perplexity`, scoring exactly what lm-eval
scores: each document on its own, every token predicted, the first from lm-eval's prefix token (the BOS, else
the EOS). With `max_length` >= a document's tokens that is one window, and the two tools must agree to
float precision; on longer documents lm-eval's last window keeps a full `max_length` of history where ours
starts at the window boundary, so they differ slightly there.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from flash_experts.evaluation.perplexity import evaluate_perplexity

TASK_NAME = "flash_experts_text"

_TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def write_text_task(texts: list[str], folder: str | Path, name: str = TASK_NAME) -> str:
    """Write `folder/docs.jsonl` (one document per text) and `folder/{name}.yaml`; return the task name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(_TASK_YAML.format(name=name, data=data.resolve()), encoding="utf-8")
    return name


def prefix_token_id(tokenizer: Any) -> int:
    """lm-eval's (HFLM.prefix_token_id): what the first token of a document is predicted from."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def rolling_scores(model: torch.nn.Module, tokenizer: Any, texts: list[str], max_length: int) -> dict[str, float]:
    """word_perplexity, byte_perplexity, bits_per_byte and the total log-likelihood (nats) over `texts`.

    A document is the stream [prefix] + its tokens, in windows of `max_length` inputs; our windows of
    `max_length + 1` tokens with stride `max_length` give every token the history lm-eval gives it (one
    token of overlap: the previous window's last prediction target starts the next window's inputs).
    """
    loglikelihood, words, num_bytes = 0.0, 0, 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        stream = torch.tensor([prefix_token_id(tokenizer), *ids])
        context = min(max_length + 1, len(stream))  # a document that fits is one window of its own length
        result = evaluate_perplexity(model, stream, context=context, stride=context - 1, batch_size=1, quiet=True)
        loglikelihood -= result.nll * result.tokens_scored
        words += len(re.split(r"\s+", text))
        num_bytes += len(text.encode("utf-8"))
    return {
        "word_perplexity": math.exp(-loglikelihood / words),
        "byte_perplexity": math.exp(-loglikelihood / num_bytes),
        "bits_per_byte": -loglikelihood / num_bytes / math.log(2),
        "loglikelihood": loglikelihood,
    }
