"""Checkpoints that survive being killed at any moment, and exact resume.

A checkpoint is a folder: the model (`save_pretrained`, safetensors), the tokenizer, and `trainer_state.pt`
(optimizer, step, tokens seen, best validation loss, RNG states, sampler, config). The state file holds only
tensors, dicts, lists, numbers and strings, so it loads with `torch.load(weights_only=True)`.

Run folder layout:

    <out_dir>/checkpoints/step_00000500/    one per checkpoint.interval, the last checkpoint.keep_last kept
    <out_dir>/checkpoints/latest            text file naming the newest complete step folder
    <out_dir>/best/                         lowest validation loss so far (eval.keep_best)

Atomicity: a checkpoint is written into a temporary folder beside its final place, every file is fsynced,
and only then is the folder renamed into place (a rename is atomic on POSIX) and the `latest` pointer
replaced (`os.replace` of a fsynced temporary file). A process killed mid-save leaves at worst a `.tmp-*`
folder, which is ignored and cleaned up later; the previous checkpoint and pointer stay intact.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flash_experts.errors import UserError
from flash_experts.model.loading import quiet_transformers_progress

STATE_FILE = "trainer_state.pt"
LATEST_FILE = "latest"
CHECKPOINTS = "checkpoints"
BEST = "best"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# --------------------------------------------------------------------------------------------- writing


def save_checkpoint(folder: str | os.PathLike, model: torch.nn.Module, tokenizer: Any, state: dict,
                    model_state: dict | None = None, move_in: dict[str, Path] | None = None) -> Path:
    """Write model + tokenizer + trainer state to `folder` atomically (replacing an existing folder).

    `model_state`: the weights to write instead of `model.state_dict()` (an FSDP run's gathered full weights);
    `move_in`: {name: folder} moved into the checkpoint before it appears (an FSDP run's sharded optimizer)."""
    folder = Path(folder)
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{folder.name}-", dir=parent))
    try:
        with quiet_transformers_progress():
            model.save_pretrained(tmp, **({} if model_state is None else {"state_dict": model_state}))
        for name, source in (move_in or {}).items():
            os.rename(source, tmp / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)
        _fsync_tree(tmp)
        if folder.exists():  # a folder cannot be renamed over a non-empty one: move the old one aside first
            old = parent / f".old-{folder.name}-{uuid.uuid4().hex[:8]}"
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def save_step_checkpoint(
    run_dir: str | os.PathLike, step: int, model: torch.nn.Module, tokenizer: Any, state: dict, keep_last: int,
    model_state: dict | None = None, move_in: dict[str, Path] | None = None,
) -> Path:
    """Save `checkpoints/step_XXXXXXXX`, point `latest` at it, then prune to the newest `keep_last`."""
    root = Path(run_dir) / CHECKPOINTS
    folder = save_checkpoint(root / step_dir_name(step), model, tokenizer, state, model_state, move_in)
    _write_atomic(root / LATEST_FILE, folder.name + "\n")
    prune_checkpoints(root, keep_last)
    return folder


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step folders (never the one `latest` names), and stale temp folders."""
    latest = _read_latest_pointer(root)
    steps = sorted(_complete_step_dirs(root), key=lambda p: _step_of(p))
    for folder in steps[: max(0, len(steps) - keep_last)]:
        if latest is None or folder.resolve() != latest.resolve():
            shutil.rmtree(folder, ignore_errors=True)
    recover_interrupted_saves(root)


# --------------------------------------------------------------------------------- sharded optimizer (FSDP)

# An FSDP run's checkpoint keeps AdamW's state sharded, one file per rank written by torch.distributed.checkpoint
# (DCP), in this subfolder; DCP reshards on loading, so it resumes on any number of processes (one included).
OPTIMIZER_DIR = "optimizer"


def _adamw_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter tensors keyed by parameter name ("<name>/exp_avg", ...), created (zero, step 0)
    where a parameter has none yet: names, unlike the optimizer's own numbering, mean the same thing on any
    number of ranks, and DCP reshards each (DTensor or whole) tensor to whatever holds it on loading. Only
    tensors: the hyperparameters come from the config on resuming."""
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    state = {}
    for name, param in model.named_parameters():  # tied weights appear once
        group = group_of.get(id(param))
        if group is None:
            continue
        moments = optimizer.state[param]
        if not moments:
            # As AdamW's own first step makes them: its fused and capturable kernels keep `step` on the
            # parameter's device (a CUDA run resuming on one process uses the fused kernel), the others on the CPU.
            on_device = group.get("fused") or group.get("capturable")
            moments.update(step=torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu"),
                           exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
        for key, value in moments.items():
            state[f"{name}/{key}"] = value
    return state


def save_sharded_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Collective: every rank writes its shard of AdamW's state into `folder`."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_adamw_state_by_name(model, optimizer), checkpoint_id=str(folder))


def load_sharded_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """AdamW's state of `folder` (written by any number of ranks) into this run's optimizer, sharded or not."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    # no_dist: one process (no process group) loads the whole of every tensor, resharded from all ranks' files;
    # DCP warns that it assumes exactly that, which is the intent here.
    single = not (dist.is_available() and dist.is_initialized())
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(_adamw_state_by_name(model, optimizer), checkpoint_id=str(folder), no_dist=single)  # in place


def gathered_model_state(model: torch.nn.Module) -> dict:
    """Collective: the full (unsharded) weights of an FSDP model on rank 0, on the CPU (empty on other ranks)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def recover_interrupted_saves(parent: Path) -> None:
    """Clean up after a killed save: drop `.tmp-*` folders and files; put back an `.old-*` whose replacement never landed."""
    if not parent.is_dir():
        return
    for path in parent.iterdir():
        if path.name.startswith(".tmp-"):
            # a killed save leaves a temp folder (save_checkpoint) or a temp file (the `latest` pointer)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        elif path.name.startswith(".old-"):
            original = parent / path.name[len(".old-") :].rsplit("-", 1)[0]
            if original.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, original)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        _fsync_dir(path)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some platforms (Windows) cannot open folders; renames there are still ordered
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- finding


def _step_of(folder: Path) -> int:
    match = _STEP_DIR.match(folder.name)
    return int(match.group(1)) if match else -1


def _complete_step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]


def _read_latest_pointer(root: Path) -> Path | None:
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    folder = root / pointer.read_text().strip()
    return folder if (folder / STATE_FILE).is_file() else None


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder: what `latest` names, else the highest step folder."""
    root = Path(run_dir) / CHECKPOINTS
    latest = _read_latest_pointer(root)
    if latest is not None:
        return latest
    steps = _complete_step_dirs(root)
    return max(steps, key=_step_of) if steps else None


def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder `--resume` means.

    "auto": the latest checkpoint of `run_dir`, or None (start fresh) when it has none, so the same command
    line works for the first launch and every restart of a preemptible job. A path: a checkpoint folder, or a
    run folder (its latest checkpoint); a path with no checkpoint is an error.
    """
    if resume == "auto":
        return find_latest(run_dir)
    path = Path(resume).expanduser()
    if (path / STATE_FILE).is_file():
        return path
    if path.is_dir():
        latest = find_latest(path)
        if latest is not None:
            return latest
    raise UserError(
        f"--resume {resume}: no checkpoint there (expected a folder with {STATE_FILE}, or a run folder "
        f"with {CHECKPOINTS}/{LATEST_FILE})"
    )


# --------------------------------------------------------------------------------------------- reading


def load_trainer_state(folder: str | os.PathLike) -> dict:
    """The trainer state of a checkpoint folder (weights_only: no code runs while loading)."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not a training checkpoint ({STATE_FILE} missing)")
    try:
        with warnings.catch_warnings():  # a damaged file also makes torch warn; the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError, ...
        # weights_only refuses anything but tensors and plain containers, so a file that would run code
        # ends up here too, unexecuted.
        raise UserError(
            f"cannot read {path}: it is corrupt or not a flash-experts trainer state "
            f"(only tensors, numbers, strings, lists and dicts are loaded; {type(error).__name__})"
        ) from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a flash-experts trainer state (a {type(state).__name__}, not a dict)")
    return state


def load_model_weights(model: torch.nn.Module, folder: str | os.PathLike) -> None:
    """Load a checkpoint's safetensors weights into an already built model of the same architecture.

    Keys that `save_pretrained` leaves out because they are tied to another saved tensor (GPT-2's lm_head is
    the token embedding) may be missing; any other missing or unexpected key is an error.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} holds no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:  # one file, or the shards of a large model
        try:
            state.update(load_file(str(file)))
        except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ...
            raise UserError(f"cannot read {file}: corrupt safetensors file ({' '.join(str(error).split())})") from None
    own = model.state_dict(keep_vars=True)
    resized = [f"{name} {tuple(state[name].shape)} vs {tuple(tensor.shape)}"
               for name, tensor in own.items() if name in state and state[name].shape != tensor.shape]
    if resized:  # checked first: load_state_dict would raise a long RuntimeError
        raise UserError(
            f"checkpoint {folder} is another architecture than the model built from the config "
            f"(checkpoint vs config shapes: {', '.join(resized[:3])}{', ...' if len(resized) > 3 else ''})"
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    names_by_storage: dict[int, set[str]] = {}
    for name, tensor in own.items():
        names_by_storage.setdefault(tensor.data_ptr(), set()).add(name)
    untied = [k for k in missing if not (names_by_storage[own[k].data_ptr()] & state.keys())]
    if untied or unexpected:
        raise UserError(
            f"checkpoint {folder} does not match the model built from the config: "
            f"missing {untied[:5]}, unexpected {list(unexpected)[:5]}"
        )


# --------------------------------------------------------------------------------------------- RNG states


def capture_rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generator states, as weights_only-safe values."""
    version, internal, gauss_next = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["internal"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": npy["bit_generator"],
            "state": {"key": npy["key"].numpy().astype(np.uint32), "pos": npy["pos"]},
            "has_gauss": npy["has_gauss"],
            "gauss": npy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
