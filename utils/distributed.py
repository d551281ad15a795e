"""All distributed plumbing in one place: torchrun env, backend choice, per-rank seeds, reductions.

``setup_distributed`` works the same under ``torchrun`` (any world size) and as a plain
``python -m`` process (world size 1, no process group). CUDA gets nccl, CPU gets gloo, and on CUDA
float32 matmuls and convolutions may use TF32 (:func:`enable_tf32`): every trainer and sampler goes
through it, so this is the one place that switch lives.
"""

from __future__ import annotations

import contextlib
import gc
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from utils.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | torch.device | None = None, local_rank: int = 0) -> torch.device:
    """``None``/"auto" picks CUDA (this process's local GPU) when present, else CPU.

    An explicit CUDA device on a machine without a visible GPU, or a device string torch does not
    know, is a :class:`UserError` (checked before any other input, so it is the first thing said).
    """
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {str(device)!r}; pass --device auto, cpu or cuda") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError("CUDA requested but no GPU is visible; pass --device cpu (or --device auto)")
        if device.index is None:
            return torch.device("cuda", local_rank % count)
        if device.index >= count:
            raise UserError(f"{device} requested but only {count} GPU(s) are visible; pick cuda:0..cuda:{count - 1}")
    return device


def setup_distributed(device: str | torch.device | None = None, timeout_minutes: int = 30) -> DistEnv:
    """Initialise the process group when launched by torchrun; otherwise a single-process env."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    enable_tf32(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=timedelta(minutes=timeout_minutes),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def enable_tf32(device: torch.device) -> None:
    """On CUDA, let float32 matmuls and cuDNN convolutions use TF32 tensor cores (Ampere and newer).

    TF32 keeps float32's range with a 10-bit mantissa in the products (sums stay float32): the
    fp32 parts of a bf16 run (the loss, the tokenizer's fp32 decoding) and fp32 runs get several
    times faster; the official sampling script (LlamaGen's) switches it on too. The CPU has no TF32,
    and its settings are left alone there, so CPU results (and every equality test run on the CPU)
    are unchanged. The FID Inception turns it off again around its forward
    (``evaluations.metrics.exact_fp32``) and restores it after.

    Through the legacy switches on purpose: they also set the new per-backend ``fp32_precision``
    values, and both stay readable (torch.compile reads the legacy ones), whereas setting only the
    new ones makes every later legacy read raise "mix of the legacy and new APIs".
    """
    if device.type != "cuda":
        return
    torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls
    torch.backends.cudnn.allow_tf32 = True  # and for cuDNN convolutions (already torch's default)


def cleanup_distributed() -> None:
    """Tear the process group down; every rank first waits for the others at a barrier.

    The barrier keeps a rank that finishes early (rank 0 still writing the final weights, say) from
    destroying its side of the group while a peer is still using it. It is skipped while an exception
    is propagating (a call from a ``finally`` block on the error path), so a failing rank exits at once
    and torchrun stops the others instead of everyone waiting for the timeout. Call
    :func:`run_then_cleanup` from trainers: the barrier alone did not stop the FSDP exit aborts.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if sys.exc_info()[0] is None:
        dist.barrier()
    dist.destroy_process_group()


def run_then_cleanup(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, then free unreachable objects and tear the process group down (also on error).

    Models wrapped in DDP / FSDP hold the group in reference cycles; collecting them before the group
    is destroyed matters: tearing gloo down under live FSDP state intermittently aborted a rank at
    exit ("terminate called without an active exception").
    """
    try:
        return fn(*args)
    finally:
        gc.collect()
        cleanup_distributed()


def gradient_sync(trained: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Reduce gradients over ranks only on the last micro-batch of an accumulated step (DDP or FSDP2)."""
    if isinstance(trained, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else trained.no_sync()
    if hasattr(trained, "set_requires_gradient_sync"):  # FSDP2
        trained.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def local_rank() -> int:
    """This process's rank on its node (torchrun's ``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_rank_zero_first(fn: Callable[[], T]) -> T:
    """``fn()`` on local rank 0 of every node first, then on the node's other ranks (collective).

    For fetching files into a cache: local rank 0 downloads what is missing, the others wait at a
    barrier and then find everything in the cache, so each node fetches once. When ``fn`` fails on
    local rank 0 (offline, say) it raises there without reaching the barrier and torchrun stops the
    waiting ranks; without a process group it is just ``fn()``.
    """
    first = local_rank() == 0
    if not first:
        barrier()
    result = fn()
    if first:
        barrier()
    return result


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy; the input is untouched). Identity without a process group."""
    out = tensor.detach().clone()
    if is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.detach().clone()
    if is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices). Callers pass ``base_seed + rank`` for per-rank streams."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
