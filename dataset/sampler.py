"""A distributed sampler that can resume in the middle of an epoch, on the same or another world size.

Two layouts:

- ``global_batch_size=None``: exactly ``torch.utils.data.DistributedSampler``'s order (permutation
  seeded by ``seed + epoch``, padded by wrapping or truncated to a multiple of the world size, rank
  ``r`` takes positions ``r, r + R, ...``), so a run started with torch's sampler resumes onto the
  same sequence. Which samples form a step depends on the world size.
- ``global_batch_size=G`` (the GPT trainer): one permutation per epoch (``seed + epoch``), truncated
  to a whole number of global batches and cut into global batches of ``G``; rank ``r`` of ``R`` takes
  the contiguous share ``[r G/R, (r + 1) G/R)`` of each. Step ``s`` trains on the same ``G`` samples
  at any world size, and :meth:`global_positions` names each sample's place in the epoch so that its
  random draws can follow the sample rather than the rank. A saved position (in global samples) loads
  at another world size as long as ``G`` is the same and it sits on a global-batch boundary.

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
# In the global-batch layout the world size may change: only the data and the global batch must not.
_GLOBAL_IDENTITY = ("num_items", "seed", "shuffle", "global_batch_size")


class ResumableDistributedSampler(Sampler[int]):
    def __init__(
        self,
        num_items: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        global_batch_size: int | None = None,
    ) -> None:
        if num_items <= 0:
            raise ValueError(f"num_items must be positive, got {num_items}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        if drop_last and num_items < num_replicas:
            raise ValueError(f"drop_last with {num_items} items and {num_replicas} ranks leaves nothing")
        if global_batch_size is not None:
            if global_batch_size <= 0 or global_batch_size % num_replicas:
                raise ValueError(f"global batch {global_batch_size} is not a positive multiple of {num_replicas} ranks")
            if not drop_last:
                raise ValueError("the global-batch layout drops the epoch's incomplete last global batch (drop_last)")
            if num_items < global_batch_size:
                raise ValueError(f"{num_items} items and a global batch of {global_batch_size} leaves nothing")
        self.global_batch_size = global_batch_size
        self.num_items = num_items
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start_index = 0
        if global_batch_size is not None:
            self.share = global_batch_size // num_replicas  # this rank's samples of each global batch
            self.num_samples = (num_items // global_batch_size) * self.share
        elif drop_last:
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
        if self.global_batch_size is not None:
            batches = self.num_items // self.global_batch_size
            shares = torch.tensor(order[: batches * self.global_batch_size]).view(batches, self.num_replicas, self.share)
            return shares[:, self.rank].flatten().tolist()
        if self.total_size > len(order):
            repeats = math.ceil(self.total_size / len(order))
            order = (order * repeats)[: self.total_size]
        else:
            order = order[: self.total_size]
        return order[self.rank : self.total_size : self.num_replicas]

    def global_positions(self, start: int, count: int) -> torch.Tensor:
        """Epoch positions (in the global order) of this rank's samples ``start .. start + count - 1``.

        Global-batch layout only: position ``b G + r G/R + o`` is the same sample at any world size.
        """
        if self.global_batch_size is None:
            raise ValueError("global positions need the global-batch layout (global_batch_size)")
        local = torch.arange(start, start + count)
        return (local // self.share) * self.global_batch_size + self.rank * self.share + local % self.share

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
        if self.global_batch_size is not None:
            # Global samples consumed, every rank having taken ``position % share`` of the current batch.
            batches, offset = divmod(position, self.share)
            state.update(global_batch_size=self.global_batch_size,
                         global_position=batches * self.global_batch_size + offset * self.num_replicas)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.global_batch_size is not None or state.get("global_batch_size") is not None:
            self._load_global(state)
            return
        mismatched = self._mismatches(state, _IDENTITY)
        if mismatched:
            raise ValueError(f"cannot resume the data order exactly; the sampler differs from the saved one ({mismatched})")
        self.set_epoch(int(state["epoch"]))
        self.set_start_index(int(state["start_index"]))

    def _mismatches(self, state: dict[str, Any], fields: tuple[str, ...]) -> str:
        """'field: saved X, now Y' for every identity field that differs ('' when none does)."""
        return "; ".join(f"{k}: saved {state.get(k)!r}, now {getattr(self, k)!r}"
                         for k in fields if state.get(k) != getattr(self, k))

    def _load_global(self, state: dict[str, Any]) -> None:
        mismatched = self._mismatches(state, _GLOBAL_IDENTITY)
        if mismatched:
            raise ValueError(f"cannot resume the data order; the sampler differs from the saved one ({mismatched}): "
                             "resume with the same data, seed and global batch size")
        position = int(state["global_position"])
        if state.get("num_replicas") == self.num_replicas:
            start = int(state["start_index"])
        elif position % self.global_batch_size == 0:
            start = position // self.global_batch_size * self.share
        else:
            raise ValueError(
                f"the saved position ({position} samples into epoch {state['epoch']}) is inside a global batch "
                f"of {self.global_batch_size}; resume with the {state.get('num_replicas')} ranks that saved it"
            )
        self.set_epoch(int(state["epoch"]))
        self.set_start_index(start)
