"""Training-time random draws that belong to a sample, not to a rank.

With torch's RNG, a dropout mask depends on which rank a sample lands on and where in the rank's
batch it sits, so a run resumed on another number of ranks leaves the trajectory of the run it
continues. Here every draw is a hash of (sample key, draw site, element): the sample key comes from
the run's seed and the sample's place in the epoch's global order
(``dataset.sampler.ResumableDistributedSampler.global_positions``), the draw site is the module's
place in the network. The same sample then gets the same masks on any rank, at any world size, with
or without gradient accumulation or activation checkpointing (the recomputation hashes the same
values), and a resumed run needs no RNG state at all.

:func:`install` swaps the GPT's label dropout, dropout layers and stochastic depth for the
hash-driven versions (no parameters change, so state dicts and exports are unaffected); the trainer
sets the keys of each micro-batch with :func:`sample_keys` + :meth:`SampleKeys.use`. Without keys
(a forward outside the trainer) the modules draw from torch's RNG as before. Attention dropout runs
inside the fused attention kernel and keeps torch's RNG; no recipe uses it.

The hash works on 32-bit values held in int64 tensors (multipliers below 2**31, so no product
overflows): the same integers on every device, and a handful of element-wise operations that
``torch.compile`` fuses.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoregressive.model import GPT, DropPath, LabelEmbedder

_MASK = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective integer hash of 32-bit values (int64 tensor in [0, 2**32)), element-wise."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK
    return x ^ (x >> 16)


def sample_keys(seed: int, epoch: int, positions: torch.Tensor) -> torch.Tensor:
    """(B,) int64 keys in [0, 2**32) of the samples at ``positions`` of epoch ``epoch``'s global order."""
    base = torch.tensor([seed & _MASK, (seed >> 32) & _MASK, epoch & _MASK], dtype=torch.int64)
    h = mix32(base[0:1] ^ 0x5EED)
    h = mix32((h + base[1]) & _MASK)
    h = mix32((h + base[2]) & _MASK)
    return mix32((h.to(positions.device) + positions.to(torch.int64)) & _MASK)


def uniform_bits(keys: torch.Tensor, site: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(B, *shape) int64 values in [0, 2**32), a function of (sample key, site, element index) only."""
    per_sample = mix32((keys ^ mix32(torch.tensor(site & _MASK, dtype=torch.int64))) & _MASK)  # (B,)
    elements = torch.arange(math.prod(shape), device=keys.device).view(shape)
    return mix32(mix32((per_sample.view(-1, *([1] * len(shape))) + elements) & _MASK))


def keep_mask(keys: torch.Tensor, site: int, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """Bool (B, *shape): True with probability 1 - p, per element."""
    return uniform_bits(keys, site, shape) >= round(p * 2**32)


class SampleKeys:
    """The current micro-batch's sample keys, shared by every hash-driven module of one model."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None

    def for_rows(self, rows: int) -> torch.Tensor | None:
        """The keys of a batch of ``rows`` samples; None outside :meth:`use`."""
        if self.keys is not None and self.keys.shape[0] != rows:
            raise RuntimeError(f"{self.keys.shape[0]} sample keys for a batch of {rows}: set the keys of this batch")
        return self.keys

    @contextlib.contextmanager
    def use(self, keys: torch.Tensor) -> Iterator[None]:
        """Keys for the forward and backward (recomputation) inside the block."""
        self.keys = keys
        try:
            yield
        finally:
            self.keys = None


class SampleDropout(nn.Module):
    """``nn.Dropout`` whose mask is drawn per sample from its key."""

    def __init__(self, p: float, site: int, source: SampleKeys) -> None:
        super().__init__()
        self.p = p
        self.site = site
        self._source = [source]  # a list: not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keys = self._source[0].for_rows(x.shape[0])
        if keys is None:
            return F.dropout(x, self.p, True)
        keep = keep_mask(keys, self.site, tuple(x.shape[1:]), self.p)
        return x * keep.to(x.dtype) * (1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, site={self.site}"


class SampleDropPath(DropPath):
    """Stochastic depth with one keep/drop draw per sample from its key."""

    def __init__(self, p: float, site: int, source: SampleKeys) -> None:
        super().__init__(p)
        self.site = site
        self._source = [source]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keys = self._source[0].for_rows(x.shape[0]) if self.training else None
        if not self.training or self.p == 0.0 or keys is None:
            return super().forward(x)
        keep = keep_mask(keys, self.site, (), self.p).view(-1, *([1] * (x.dim() - 1)))
        return x * keep.to(x.dtype) / (1.0 - self.p)


class SampleLabelEmbedder(LabelEmbedder):
    """Label dropout (to the null class) with one draw per sample from its key; shares the class table."""

    def __init__(self, original: LabelEmbedder, site: int, source: SampleKeys) -> None:
        nn.Module.__init__(self)
        self.num_classes = original.num_classes
        self.dropout_prob = original.dropout_prob
        self.embedding_table = original.embedding_table
        self.site = site
        self._source = [source]

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        keys = self._source[0].for_rows(labels.shape[0]) if self.training else None
        if not self.training or self.dropout_prob == 0 or keys is None:
            return super().forward(labels)
        drop = ~keep_mask(keys, self.site, (), self.dropout_prob)
        labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)


def install(model: GPT) -> SampleKeys:
    """Replace the GPT's random modules by hash-driven ones in place (before sharding or wrapping).

    Sites are the modules' order in ``named_modules``, fixed by the architecture.
    """
    source = SampleKeys()
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, (nn.Dropout, DropPath, LabelEmbedder))]
    for site, (name, module) in enumerate(targets, start=1):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(module, LabelEmbedder):
            replacement: nn.Module = SampleLabelEmbedder(module, site, source)
        elif isinstance(module, DropPath):
            replacement = SampleDropPath(module.p, site, source)
        else:
            replacement = SampleDropout(module.p, site, source)
        replacement.train(module.training)
        setattr(parent, child, replacement)
    model._sample_keys = source  # found again through FSDP / compile, which keep the module object
    return source


def keys_of(model: nn.Module) -> SampleKeys:
    """The :class:`SampleKeys` that :func:`install` attached to ``model``."""
    return model._sample_keys
