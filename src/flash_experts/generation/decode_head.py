"""A faster LM head while decoding on CPU: the decode loop's own logits function, beside the model.

Decoding asks for the logits of a few rows at a time. On CPU, `x @ W.T` with W stored (vocab, width), as
nn.Linear keeps it, runs slower than `x @ W_t` with a contiguous (width, vocab) copy (BENCHMARKS.md has the
measured figures). The copy costs one more head's worth of memory, so it lives only as long as the
function `decode_head` returns (one `generate` call): the model itself keeps a plain nn.Linear and one copy.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

MAX_ROWS = 16  # more rows than this amortise the strided read; the plain product is then as fast


def decode_head(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """The logits of hidden states (..., width) through `model`'s output projection: for decode-sized products
    (no gradients, no autocast, at most MAX_ROWS rows, the weight's dtype) against a transposed copy of the
    weight, the same weight and the same logits as F.linear; anything else through the head itself. The head
    itself off CPU, with a bias, or when it is not a plain nn.Linear (an int8 head, for instance)."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None or head.weight.device.type != "cpu":
        return head
    weight_t = head.weight.detach().t().contiguous()

    def logits(x: Tensor) -> Tensor:
        rows = x.numel() // x.shape[-1]
        if (torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or rows > MAX_ROWS
                or x.dtype != weight_t.dtype):
            return head(x)
        # As one (rows, width) @ (width, vocab) product: `matmul` on (B, 1, width) would broadcast the weight
        # and copy it once per row.
        return (x.reshape(rows, x.shape[-1]) @ weight_t).view(*x.shape[:-1], weight_t.shape[1])

    return logits
