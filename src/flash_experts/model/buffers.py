"""Memory reused from one training step to the next, for the MoE layer's weight-sized tensors.

On CPU every tensor is fresh memory from the C allocator, and one larger than its reuse threshold (glibc: at
most 32 MB; an expert stack is E x D x F floats, 75 MB for 8 GPT-2 experts) is mapped anew each time: the
first write to it page-faults every 4 KiB page, which costs several times the write itself (measured in
BENCHMARKS.md). A dense layer's weight-sized tensors (its bf16 weight copy, its gradient) are 1/E of that. A
ReusableBuffer hands out the same memory again whenever nothing but the buffer still refers to it, and fresh
memory otherwise, so reuse never overwrites a tensor someone still reads: a copy an autograd graph saved, a
gradient an optimizer has not consumed, a view a caller kept.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _held_elsewhere(tensor: Tensor) -> bool:
    """True when anything besides `tensor` itself refers to its memory: the same tensor object saved by an
    autograd graph (a second reference to it), or another tensor on the same storage (a view, e.g. a
    gradient handed out earlier). Where this torch cannot say, the memory counts as held: no reuse."""
    try:
        # The storage is referred to by `tensor` and by the temporary storage object made to ask: 2.
        return tensor._use_count() > 1 or torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) > 2
    except (AttributeError, RuntimeError):
        return True


class ReusableBuffer:
    """One tensor's memory, reused across calls while nothing else holds it."""

    def __init__(self) -> None:
        self._tensor: Tensor | None = None

    def take(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A tensor of this shape, dtype and device, with unspecified contents: the buffer's own memory when
        that is free, else new memory (which the buffer keeps for next time)."""
        tensor = self._tensor
        if (tensor is None or tensor.shape != torch.Size(shape) or tensor.dtype != dtype or tensor.device != device
                or _held_elsewhere(tensor)):
            tensor = self._tensor = torch.empty(shape, dtype=dtype, device=device)
        return tensor

    # Scratch memory, not state: a copied or pickled model starts without it.
    def __deepcopy__(self, memo: dict) -> "ReusableBuffer":
        return ReusableBuffer()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._tensor = None


class ExpertWeightBuffers:
    """The two weight-sized tensors an expert stack needs each training step: its copy in the compute dtype
    (written by the forward, read again by the backward) and its gradient."""

    def __init__(self) -> None:
        self.compute_copy = ReusableBuffer()
        self.gradient = ReusableBuffer()
