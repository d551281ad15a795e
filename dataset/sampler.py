"""A distributed sampler that can resume in the middle of an epoch.

The order is exactly ``torch.utils.data.DistributedSampler``'s (permutation seeded by
``seed + epoch``, padded by wrapping or truncated to a multiple of the world size, rank ``r`` takes
positions ``r, r + R, ...``), so a run started with torch's sampler resumes onto the same sequence.

Exact resume needs the number of indices the training loop has *consumed*, which the sampler cannot
know: the data loader prefetches ahead of the loop. The trainer passes it in:
``state_dict(consumed=batches_done_this_epoch * per_rank_batch_size)``; after loading that state,
iteration yields the rest of the epoch. Skipped (bad) files still occupy their sampler slots, so this
count is the same whatever was skipped.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Sampler

# Fields that must match for a saved position to mean the same samples.
_IDENTITY = ("num_items", "num_replicas", "rank", "seed", "shuffle", "drop_last")


class ResumableDistributedSampler(Sampler[int]):
    def __init__(
        self,
        num_items: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if num_items <= 0:
            raise ValueError(f"num_items must be positive, got {num_items}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        if drop_last and num_items < num_replicas:
            raise ValueError(f"drop_last with {num_items} items and {num_replicas} ranks leaves nothing")
        self.num_items = num_items
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start_index = 0
        if drop_last:
            self.num_samples = num_items // num_replicas
        else:
            self.num_samples = math.ceil(num_items / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation and restart at its beginning."""
        self.epoch = epoch
        self.start_index = 0

    def set_start_index(self, start_index: int) -> None:
        """Skip the first ``start_index`` samples of this rank's order for the current epoch."""
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start_index {start_index} outside [0, {self.num_samples}]")
        self.start_index = start_index

    def epoch_indices(self) -> list[int]:
        """This rank's full order for the current epoch (ignores ``start_index``)."""
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.num_items, generator=generator).tolist()
        else:
            order = list(range(self.num_items))
        if self.total_size > len(order):
            repeats = math.ceil(self.total_size / len(order))
            order = (order * repeats)[: self.total_size]
        else:
            order = order[: self.total_size]
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.start_index :])

    def __len__(self) -> int:
        return self.num_samples - self.start_index

    def state_dict(self, consumed: int = 0) -> dict[str, Any]:
        """Position after ``consumed`` more samples of the current iteration were used."""
        position = self.start_index + consumed
        if not 0 <= position <= self.num_samples:
            raise ValueError(f"position {position} outside this rank's epoch of {self.num_samples}")
        state = {name: getattr(self, name) for name in _IDENTITY}
        state.update(epoch=self.epoch, start_index=position)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mismatched = [
            f"{k}: saved {state.get(k)!r}, now {getattr(self, k)!r}"
            for k in _IDENTITY
            if state.get(k) != getattr(self, k)
        ]
        if mismatched:
            raise ValueError(
                "cannot resume the data order exactly; the sampler differs from the saved one ("
                + "; ".join(mismatched)
                + ")"
            )
        self.set_epoch(int(state["epoch"]))
        self.set_start_index(int(state["start_index"]))
