"""The sequential flow-matching objective, apart from the pixel-decoder network (docs/method.md §1 "Flow").

Everything here is network-agnostic: the time warp, the linear path and its target velocity, the
choice of condition window for training (from the unwarped time u) and for sampling (fixed grid with
a clip to N − Q), the loss, and a step-wise Euler / Adams–Bashforth-2 sampler whose every step also
yields the "preview" clean-image estimate (docs/checkpoint_format.md §3.4).

Conventions: the network works in *data_std-scaled* space (x1 = image · data_std, x0 ~ N(0, I));
times handed to the network are *warped* (sigma); images come back through ``x / data_std``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

SamplerName = Literal["euler", "adams2"]
SAMPLERS: tuple[str, ...] = ("euler", "adams2")
TimeSampling = Literal["uniform", "group_balanced"]
TIME_SAMPLINGS: tuple[str, ...] = get_args(TimeSampling)


def warp_time(t: Tensor, shift: float) -> Tensor:
    """sigma(t) = t / (t + s·(1 − t)): shift > 1 spends more of the schedule at high noise."""
    return t / (t + shift * (1 - t))


def interpolate(x0: Tensor, x1: Tensor, t: Tensor) -> Tensor:
    """x_t = t·x1 + (1 − t)·x0 with t (B,) broadcast over (B, C, H, W)."""
    t = t.view(-1, *([1] * (x1.dim() - 1)))
    return t * x1 + (1.0 - t) * x0


def target_velocity(x0: Tensor, x1: Tensor) -> Tensor:
    """d x_t / dt along the linear path."""
    return x1 - x0


def clean_estimate(x_t: Tensor, velocity: Tensor, t: Tensor) -> Tensor:
    """Jump from time t straight to t = 1: x_t + (1 − t)·v (same space as x_t)."""
    t = t.view(-1, *([1] * (x_t.dim() - 1)))
    return x_t + velocity * (1.0 - t)


def flow_loss(velocity: Tensor, target: Tensor, data_std: float) -> dict[str, Tensor]:
    """{"flow": MSE / data_std²}: the MSE in image units, since the path lives in data_std-scaled space."""
    return {"flow": torch.nn.functional.mse_loss(velocity, target) / (data_std**2)}


@dataclass(frozen=True)
class GroupSchedule:
    """Which condition tokens each denoising step sees, and the warped time grid.

    num_steps S, num_groups G, num_tokens N, tokens_per_step Q, time_shift s (docs/checkpoint_format.md §3.4).
    """

    num_steps: int
    num_groups: int
    num_tokens: int
    tokens_per_step: int
    time_shift: float

    def window(self, step: int) -> tuple[int, int]:
        """[begin, end) of the condition tokens used by sampling step ``step`` (0-based)."""
        if not 0 <= step < self.num_steps:
            raise ValueError(f"step {step} is outside 0..{self.num_steps - 1}")
        t = step / self.num_steps
        group_time = math.floor(t * self.num_groups + 0.5) / self.num_groups  # Python floats, as the reference
        begin = min(self.num_tokens - self.tokens_per_step, int(group_time * self.num_tokens))
        return begin, begin + self.tokens_per_step

    def tokens_needed(self, steps: int) -> int:
        """How many leading codes the first ``steps`` sampling steps read."""
        return max(self.window(i)[1] for i in range(steps))

    def sigmas(self, steps: int | None = None) -> Tensor:
        """Warped times [sigma(t_0), ..., sigma(t_{k-1}), 1.0] in float32, k = ``steps`` (default S).

        The trailing 1.0 makes the last of k steps jump to t = 1, which is what turns a clipped run
        into a preview. Computed in float32 like the reference, so the steps match it bit for bit.
        """
        steps = self.num_steps if steps is None else steps
        if not 1 <= steps <= self.num_steps:
            raise ValueError(f"steps must be in 1..{self.num_steps}, got {steps}")
        grid = [i / self.num_steps for i in range(steps)] + [1.0]
        return warp_time(torch.tensor(grid, dtype=torch.float32), self.time_shift)

    def window_intervals(self) -> list[tuple[float, float]]:
        """The u-intervals [low, high) that train each distinct condition window, in window order.

        Under the rounding rule the window changes at u = (k − ½)/G; neighbouring intervals whose windows
        coincide after the clip to N − Q (the last group and the one past it when N = G·Q) are merged.
        """
        edges = [0.0] + [(k - 0.5) / self.num_groups for k in range(1, self.num_groups + 1)] + [1.0]
        starts = [min(self.num_tokens - self.tokens_per_step, int(k / self.num_groups * self.num_tokens))
                  for k in range(self.num_groups + 1)]
        intervals: list[tuple[float, float]] = []
        for k, begin in enumerate(starts):
            if k > 0 and begin == starts[k - 1]:
                intervals[-1] = (intervals[-1][0], edges[k + 1])
            else:
                intervals.append((edges[k], edges[k + 1]))
        return intervals

    def group_balanced_times(self, r: Tensor) -> Tensor:
        """Map uniform r in [0, 1) to training times u that give every condition window the same share.

        Under u ~ U(0, 1) the rounding rule trains the first group on u < 1/(2G) only, half the share of
        the middle groups, and the last one (with the clip) on 3/(2G). Here r picks one of the J windows
        uniformly (j = ⌊r·J⌋) and its fractional part places u uniformly inside that window's interval,
        so the draws stay uniform within each window and only the windows' shares change.
        """
        intervals = self.window_intervals()
        count = len(intervals)
        low = torch.tensor([a for a, _ in intervals], dtype=r.dtype, device=r.device)
        width = torch.tensor([b - a for a, b in intervals], dtype=r.dtype, device=r.device)
        j = (r * count).floor().long().clamp(max=count - 1)
        within = r * count - j
        return (low[j] + within * width[j]).clamp(max=1.0 - 1e-6)

    def training_window_starts(self, u: Tensor) -> Tensor:
        """(B,) first condition token for each training time u (unwarped, in [0, 1))."""
        group_time = (u * self.num_groups + 0.5).floor().div(self.num_groups)
        starts = (group_time * self.num_tokens).long()
        return starts.clamp(min=0, max=self.num_tokens - self.tokens_per_step)


VelocityFn = Callable[[Tensor, Tensor], Tensor]


class SequentialSampler:
    """Step-wise Euler / Adams–Bashforth-2 sampler over a warped time grid, one network call per step.

    Usage (what ``DARTokenizer.decode`` and the streaming generator do)::

        sampler = SequentialSampler(noise, schedule.sigmas(), method="adams2")
        while not sampler.done:
            begin, end = schedule.window(sampler.step_index)
            x, preview = sampler.step(lambda x, t: net(x, t, cond[:, begin:end]))

    Each ``step`` evaluates ``velocity_fn(x, t)`` once, with x (B, C, H, W) the current state and
    t (B,) the warped time, forms the update direction u (v at the first step or for Euler,
    1.5·v − 0.5·v_prev afterwards, fixed coefficients as in the reference), and returns

    - the next state x + (sigma_{k+1} − sigma_k)·u, and
    - the preview x + (1 − sigma_k)·u, i.e. the image this step would produce if it were the last.

    The preview after step k equals a full run of the first k + 1 steps with the last one jumping
    to t = 1, and the preview of the final step is the final state, so previews are free. Both are in
    the network's data_std-scaled space; divide by data_std for images.
    """

    def __init__(self, noise: Tensor, sigmas: Tensor, method: SamplerName = "adams2") -> None:
        if method not in SAMPLERS:
            raise ValueError(f"unknown sampler {method!r}; choose one of {SAMPLERS}")
        if sigmas.dim() != 1 or sigmas.numel() < 2:
            raise ValueError("sigmas must be a 1-D grid with at least two entries")
        self.method = method
        self.x = noise
        self.sigmas = sigmas.to(device=noise.device)
        self._steps = self.sigmas[1:] - self.sigmas[:-1]
        self._v_prev: Tensor | None = None
        self.step_index = 0

    @property
    def num_steps(self) -> int:
        return self.sigmas.numel() - 1

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps

    def time(self) -> Tensor:
        """(B,) warped time of the next network evaluation."""
        return self.sigmas[self.step_index].repeat(self.x.shape[0])

    def step(self, velocity_fn: VelocityFn, preview: bool = True) -> tuple[Tensor, Tensor | None]:
        """Advance one step; returns (next state, preview or None when ``preview=False``)."""
        if self.done:
            raise RuntimeError(f"the sampler has already taken all {self.num_steps} steps")
        i = self.step_index
        v = velocity_fn(self.x, self.time())
        if self.method == "adams2" and self._v_prev is not None:
            u = 1.5 * v - 0.5 * self._v_prev
        else:
            u = v
        jump = self.x + (self.sigmas[-1] - self.sigmas[i]) * u if preview else None
        self.x = self.x + self._steps[i] * u
        self._v_prev = v
        self.step_index += 1
        return self.x, jump

