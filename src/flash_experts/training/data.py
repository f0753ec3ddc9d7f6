"""Training and evaluation batches from a prepared data folder (flat uint16/uint32 token memmaps).

Training windows are drawn at random offsets, by a counter-based generator: the offsets of global step `s`
come from PCG64 seeded with (seed, s) alone. So the generator's whole state is (seed, step), which the
checkpoint stores, and a resumed run replays exactly the batches the uninterrupted run would have seen.

Under data parallelism the *global* batch of a step (batch_size x grad_accum x world_size windows) is one
list of offsets; rank r takes the r-th contiguous slice of it and cuts that into grad_accum micro-batches.
The list depends only on (seed, step, global batch size), never on the world size, so 2 processes x 1
micro-batch see the same windows as 1 process x 2 micro-batches, in the same micro-batch groups, and a run
can resume on a different number of processes. (Windows hold `block_size` tokens; the model shifts labels
inside, as Hugging Face causal LMs do, so inputs and labels are the same tensor.)

Evaluation uses fixed, non-overlapping windows from the start of val.bin, dealt round-robin to the ranks.
"""

from __future__ import annotations

import numpy as np
import torch

from flash_experts.errors import UserError


def _windows(tokens: np.ndarray, offsets: np.ndarray, length: int) -> torch.Tensor:
    """(len(offsets), length) int64 tensor of the token windows starting at `offsets`."""
    rows = np.stack([np.asarray(tokens[o : o + length]) for o in offsets])
    return torch.from_numpy(rows.astype(np.int64))


class TrainBatches:
    """Random training windows, deterministic in (seed, step), sharded by rank. See the module docstring."""

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        block_size: int,
        batch_size: int,
        grad_accum: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(tokens) < block_size + 1:
            raise UserError(
                f"the training split holds {len(tokens)} tokens, fewer than one window of data.block_size="
                f"{block_size} (+1); lower data.block_size or prepare more data"
            )
        self.tokens = tokens
        self.block_size, self.batch_size, self.grad_accum = block_size, batch_size, grad_accum
        self.seed, self.rank, self.world_size = seed, rank, world_size

    @property
    def global_batch(self) -> int:
        """Windows per optimizer step, summed over micro-batches and ranks."""
        return self.batch_size * self.grad_accum * self.world_size

    def global_offsets(self, step: int) -> np.ndarray:
        """(global_batch,) start offsets of every window of optimizer step `step`, for all ranks."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, step])))
        return rng.integers(0, len(self.tokens) - self.block_size + 1, size=self.global_batch)

    def micro_batch(self, step: int, micro: int) -> torch.Tensor:
        """(batch_size, block_size) int64 windows: this rank's micro-batch `micro` of optimizer step `step`."""
        per_rank = self.batch_size * self.grad_accum
        start = self.rank * per_rank + micro * self.batch_size
        offsets = self.global_offsets(step)[start : start + self.batch_size]
        return _windows(self.tokens, offsets, self.block_size)

    def state_dict(self) -> dict:
        # The step itself is the trainer's; (seed, global batch) is all the sampler adds.
        return {"seed": self.seed, "global_batch": self.global_batch}


class EvalBatches:
    """Fixed evaluation windows: the first `max_windows` non-overlapping windows of val.bin, dealt round-robin."""

    def __init__(
        self,
        tokens: np.ndarray,
        *,
        block_size: int,
        batch_size: int,
        max_windows: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(tokens) < 2:
            raise UserError("the validation split holds fewer than 2 tokens; prepare more data")
        self.length = min(block_size, len(tokens))  # a tiny val.bin gives one shorter window
        count = max(1, min(max_windows, len(tokens) // self.length))
        self.offsets = np.arange(count, dtype=np.int64)[rank::world_size] * self.length
        self.tokens, self.batch_size = tokens, batch_size
        self.total_windows = count

    def __iter__(self):
        for start in range(0, len(self.offsets), self.batch_size):
            yield _windows(self.tokens, self.offsets[start : start + self.batch_size], self.length)

    def __len__(self) -> int:
        return -(-len(self.offsets) // self.batch_size)
