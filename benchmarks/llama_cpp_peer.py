"""llama.cpp as a contender of bench_generate: the offline SmolLM2 GGUF re-encoded, decoded greedily in-process.

llama-cpp-python is optional and builds from source (~12 min on 2 cores; BENCHMARKS.md says how):
`CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python==0.3.36`. Without it the rows are skipped with
that reason.

Same weights: the offline file is Q4_1; our loader dequantizes it to fp32. llama.cpp re-encodes that file
(`llama_model_quantize` with requantizing allowed: dequantize, then quantize) to F16 and Q8_0, and runs the
Q4_1 file itself, so all of its rows hold the values our fp32 model holds, rounded to each format.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path
from typing import Callable

import torch

LLAMA_CPP_FORMATS = ("F16", "Q8_0", "Q4_1")


def llama_cpp_missing() -> str | None:
    """Why the llama.cpp rows cannot run here, or None."""
    if importlib.util.find_spec("llama_cpp") is None:
        return ("llama-cpp-python is not installed (CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install "
                "llama-cpp-python==0.3.36, ~12 min on 2 cores)")
    return None


def reencoded_gguf(source: Path, fmt: str, folder: Path) -> Path:
    """`source` in llama.cpp format `fmt` (a file in `folder`, made once); Q4_1 is the source itself."""
    import llama_cpp

    if fmt == "Q4_1":
        return source
    path = folder / f"{source.stem}.{fmt}.gguf"
    if not path.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = {"F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16, "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[fmt]
        params.allow_requantize = True
        params.nthread = torch.get_num_threads()
        partial = path.with_suffix(".partial")
        code = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
        if code != 0:
            raise RuntimeError(f"llama_model_quantize to {fmt} failed with code {code}")
        partial.rename(path)
    return path


def llama_cpp_call(path: Path, context: int, threads: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """A contender: greedy decoding of exactly `new_tokens` tokens (EOS does not stop it) from each prompt row,
    prefill included; rows run one after another (llama.cpp's high-level API decodes one sequence)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, n_threads=threads,
                          n_threads_batch=threads, verbose=False)

    def run(ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
        rows = []
        for prompt in ids.tolist():
            llm.reset()  # no prefix reuse between calls: every call pays its prefill, as ours does
            out = []
            for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
                out.append(token)
                if len(out) == new_tokens:
                    break
            rows.append(out)
        return torch.tensor(rows)
    return run
