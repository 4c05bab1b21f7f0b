"""A batch sampler that splits global batches across data-parallel ranks and resumes exactly where it stopped.

Why not torch's DistributedSampler: it cannot restart mid-epoch. Here the position is one integer, the number of
samples consumed by all ranks together (Megatron's `consumed_samples`), which a checkpoint stores; restarting with it
yields exactly the batches an uninterrupted run would have yielded next.

Each step takes the next `micro_batch_size x dp_size` indices of the (optionally shuffled) order; rank r gets the r-th
slice of `micro_batch_size`. Pretraining datasets are already shuffled, so `shuffle=False` (Megatron's default);
instruction data uses `shuffle=True`: a fresh permutation per epoch from (seed, epoch).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from qwenlink.errors import QwenlinkError


class ResumableBatchSampler:
    """Yields lists of `micro_batch_size` dataset indices for one data-parallel rank; the tail that cannot fill a
    whole global batch is dropped (every rank then runs the same number of steps)."""

    def __init__(self, total_samples: int, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                 consumed_samples: int = 0, shuffle: bool = False, seed: int = 0, num_epochs: int | None = 1) -> None:
        if not 0 <= dp_rank < dp_size:
            raise QwenlinkError(f"data-parallel rank {dp_rank} is outside 0..{dp_size - 1}")
        if micro_batch_size < 1:
            raise QwenlinkError(f"micro batch size must be >= 1, got {micro_batch_size}")
        self.total_samples = total_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.global_batch = micro_batch_size * dp_size
        self.per_epoch = (total_samples // self.global_batch) * self.global_batch  # usable samples per epoch
        if self.per_epoch == 0:
            raise QwenlinkError(f"{total_samples} samples cannot fill one batch of {micro_batch_size} x {dp_size} ranks")
        self.consumed_samples = consumed_samples
        self.shuffle = shuffle
        self.seed = seed
        self.num_epochs = num_epochs  # None: cycle forever

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.total_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.total_samples)

    def __iter__(self) -> Iterator[list[int]]:
        while self.num_epochs is None or self.consumed_samples < self.num_epochs * self.per_epoch:
            epoch, start = divmod(self.consumed_samples, self.per_epoch)
            if start % self.global_batch:
                raise QwenlinkError(f"consumed_samples {self.consumed_samples} is not a multiple of the global "
                                    f"batch {self.global_batch}; it must come from the same batch layout")
            order = self._order(epoch)
            for s in range(start, self.per_epoch, self.global_batch):
                lo = s + self.dp_rank * self.micro_batch_size
                self.consumed_samples += self.global_batch
                yield order[lo:lo + self.micro_batch_size].tolist()

    def __len__(self) -> int:
        """Batches left for this rank (within num_epochs)."""
        if self.num_epochs is None:
            raise TypeError("an endless sampler has no length")
        return max(self.num_epochs * self.per_epoch - self.consumed_samples, 0) // self.global_batch

    def state_dict(self) -> dict:
        """What a checkpoint saves. It counts batches handed out: with a prefetching DataLoader, save the count of
        batches actually trained on instead (consumed = steps x global batch)."""
        return {"consumed_samples": self.consumed_samples, "seed": self.seed, "shuffle": self.shuffle,
                "global_batch": self.global_batch, "total_samples": self.total_samples}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "shuffle", "global_batch", "total_samples"):
            if key in state and state[key] != getattr(self, key):
                raise QwenlinkError(f"sampler state has {key}={state[key]!r} but this run has {getattr(self, key)!r}; "
                                    f"resuming would not continue the same order")
        self.consumed_samples = int(state["consumed_samples"])
