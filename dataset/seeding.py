"""Per-sample random streams: every augmentation draw is a function of (seed, epoch, index) only.

The data loader's global RNG state depends on how many workers ran and in which order they were
scheduled, so drawing from it makes augmentations change with ``num_workers`` and breaks exact
resume. A generator derived from (seed, epoch, index) gives every sample the same draws however
the epoch is split across ranks, workers or restarts.
"""

from __future__ import annotations

import numpy as np
import torch


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that mixes all three numbers (SeedSequence hashing: nearby triples decorrelate)."""
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {(seed, epoch, index)}")
    words = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU ``torch.Generator`` owned by one sample of one epoch."""
    generator = torch.Generator()
    generator.manual_seed(sample_seed(seed, epoch, index))
    return generator


def randint(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform integer in ``[low, high)`` from ``generator``."""
    return int(torch.randint(low, high, (1,), generator=generator).item())
