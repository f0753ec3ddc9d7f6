"""A faster LM head while decoding on CPU, applied beside the model for the length of one `generate` call.

Decoding asks for the logits of a few rows at a time. On CPU, `x @ W.T` with W stored (vocab, width), as
nn.Linear keeps it, runs about twice as slow as `x @ W_t` with a contiguous (width, vocab) copy (BENCHMARKS.md
has the measured figures). The copy costs one more head's worth of memory, so it lives only inside
`transposed_lm_head`: the model itself (training included) keeps a plain nn.Linear and one copy of its head.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

MAX_ROWS = 16  # more rows than this amortise the strided read; the plain product is then as fast


@contextlib.contextmanager
def transposed_lm_head(model: nn.Module) -> Iterator[None]:
    """While inside, the model's output projection computes decode-sized products (no gradients, no
    autocast, at most MAX_ROWS rows) against a transposed copy of its weight. The same weight, the same
    logits as F.linear; anything else takes nn.Linear's own path. Does nothing off CPU, for a head with a
    bias, or for a head that is not a plain nn.Linear (an int8 head, for instance)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None or head.weight.device.type != "cpu":
        yield
        return
    weight_t = head.weight.detach().t().contiguous()
    linear_forward = head.forward

    def forward(x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if (torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or rows > MAX_ROWS
                or x.dtype != weight_t.dtype):
            return linear_forward(x)
        # As one (rows, width) @ (width, vocab) product: `matmul` on (B, 1, width) would broadcast the weight
        # and copy it once per row.
        return (x.reshape(rows, x.shape[-1]) @ weight_t).view(*x.shape[:-1], weight_t.shape[1])

    head.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
    try:
        yield
    finally:
        del head.forward
