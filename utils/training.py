"""Training machinery shared by the tokenizer and the AR trainers.

Both trainers are one ``main(cfg)`` that reads top to bottom; everything they have in common lives
here so it is written (and tested) once: optimizer/LR schedule, EMA, precision, non-finite guard,
the resumable infinite data iterator, and the checkpoint layout that makes a killed-and-resumed run
produce exactly the losses of an uninterrupted one.

Exact resume rests on three things, all saved in every checkpoint:
1. the data position: epoch and number of samples already consumed in that epoch (globally), so the
   sampler restarts mid-epoch at the same place (per-sample augmentation is seeded by
   (seed, epoch, index), never by a worker's RNG);
2. every rank's RNG states (python, numpy, torch, cuda), gathered to rank 0 and scattered back;
3. model, EMA, optimizer(s) and step, loaded strictly.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, TypeVar

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler

from utils.checkpoint import CheckpointManager, check_state_dict, follow_pointer, is_sharded_checkpoint, load_state_file
from utils.config import ConfigError, apply_assignments, config_to_yaml
from utils.distributed import DistEnv, all_gather_object, is_initialized
from utils.errors import PathNotFoundError, UserError, require_path
from utils.run import capture_rng_state, restore_rng_state

T = TypeVar("T")

Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    # Weight decay only on tensors with ndim >= 2 (matrices/embeddings), never on norms or biases.
    decay_matrices_only: bool = True
    warmup_steps: int = 0
    # "constant": warmup then flat; "cosine": warmup then cosine to min_lr at max_steps;
    # "linear": flat until decay_start_step, then linear to min_lr at max_steps (the AR paper recipe).
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    min_lr: float = 0.0
    decay_start_step: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    max_bad_steps: int = 20


def _setting(name: str, flag: str | None) -> str:
    return f"{flag} (train.{name})" if flag else f"train.{name}"


def require_setting(ok: bool, name: str, value: Any, valid: str, flag: str | None = None) -> None:
    """Raise :class:`ConfigError` ``"<flag> (train.<name>) must be <valid>, got <value>"`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{_setting(name, flag)} must be {valid}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_positive_ints(settings: Any, names: dict[str, str | None], prefix: str = "", minimum: int = 1) -> None:
    """Every ``settings.<name>`` is an integer >= ``minimum``; ``names`` maps field -> CLI flag (or None)."""
    for name, flag in names.items():
        value = getattr(settings, name)
        require_setting(_is_int(value) and value >= minimum, prefix + name, value, f"an integer >= {minimum}", flag)


def check_optim(cfg: OptimConfig, prefix: str = "optim.", lr_flag: str | None = "--lr") -> None:
    """Every optimizer setting finite and in range, so a typo cannot train to NaN weights and exit 0."""
    flags = {"lr": lr_flag, "max_bad_steps": "--max-bad-steps" if lr_flag else None,
             "ema_decay": "--ema-decay" if lr_flag else None}
    require_setting(_is_number(cfg.lr) and cfg.lr > 0, prefix + "lr", cfg.lr, "a finite number > 0", flags["lr"])
    require_setting(_is_number(cfg.min_lr) and 0 <= cfg.min_lr, prefix + "min_lr", cfg.min_lr, "a finite number >= 0")
    require_setting(len(cfg.betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in cfg.betas), prefix + "betas",
                    cfg.betas, "two numbers in [0, 1)")
    require_setting(_is_number(cfg.eps) and cfg.eps > 0, prefix + "eps", cfg.eps, "a finite number > 0")
    require_setting(_is_number(cfg.weight_decay) and cfg.weight_decay >= 0, prefix + "weight_decay",
                    cfg.weight_decay, "a finite number >= 0")
    require_setting(_is_number(cfg.grad_clip) and cfg.grad_clip >= 0, prefix + "grad_clip", cfg.grad_clip,
                    "a finite number >= 0 (0 = no clipping)")
    require_setting(_is_number(cfg.ema_decay) and 0 <= cfg.ema_decay < 1, prefix + "ema_decay", cfg.ema_decay,
                    "in [0, 1) (0 = no EMA)", flags["ema_decay"])
    require_setting(cfg.schedule in ("constant", "cosine", "linear"), prefix + "schedule", cfg.schedule,
                    "constant, cosine or linear")
    check_positive_ints(cfg, {"warmup_steps": None, "decay_start_step": None}, prefix, minimum=0)
    check_positive_ints(cfg, {"max_bad_steps": flags["max_bad_steps"]}, prefix)


def check_run_options(keep_last: int, stop_after_step: int | None) -> None:
    """The per-launch flags both trainers share."""
    if not (_is_int(keep_last) and keep_last >= 1):
        raise ConfigError(f"--keep-last must be an integer >= 1, got {keep_last!r}")
    if stop_after_step is not None and not (_is_int(stop_after_step) and stop_after_step >= 1):
        raise ConfigError(f"--stop-after-step must be an integer >= 1, got {stop_after_step!r}")


def check_finite_weights(module: nn.Module, what: str) -> None:
    """Refuse to export weights holding NaN / inf: inference files must never carry a diverged model."""
    bad = [name for name, tensor in unwrap_model(module).state_dict().items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise FloatingPointError(
            f"refusing to export {what}: {len(bad)} tensor(s) hold NaN or inf ({shown}); training diverged. "
            "Lower --lr (or lower --max-bad-steps to stop earlier) and resume from an earlier checkpoint."
        )


def learning_rate(step: int, max_steps: int, cfg: OptimConfig) -> float:
    """LR for the optimizer step with 0-based index ``step`` (pure; tested)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        start = max(cfg.decay_start_step, cfg.warmup_steps)
        if step < start:
            return cfg.lr
        progress = min(1.0, (step - start) / max(1, max_steps - start))
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    raise ValueError(f"unknown LR schedule {cfg.schedule!r}")


def build_optimizer(params: list[tuple[str, nn.Parameter]] | nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    named = list(params.named_parameters()) if isinstance(params, nn.Module) else list(params)
    named = [(n, p) for n, p in named if p.requires_grad]
    if cfg.decay_matrices_only:
        decay = [p for _, p in named if p.ndim >= 2]
        no_decay = [p for _, p in named if p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": [p for _, p in named], "weight_decay": cfg.weight_decay}]
    # The fused kernel: on CUDA always; on the CPU for plain tensors (~5x faster steps than the per-tensor
    # loop, 7 % of a demo tokenizer step); FSDP's sharded DTensor parameters keep the default there.
    # DTensor parameters exist only once FSDP has loaded torch.distributed.tensor (importing it here would add
    # ~1 s to every entry point's start).
    dtensor = sys.modules.get("torch.distributed.tensor")
    plain = dtensor is None or not any(isinstance(p, dtensor.DTensor) for _, p in named)
    fused = device.type == "cuda" or (device.type == "cpu" and plain)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def create_ema(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(unwrap_model(model)).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float | torch.Tensor) -> None:
    """``ema <- lerp(ema, model, 1 - decay)``; buffers are copied.

    ``decay`` may be a 0-dim float64 tensor on the device (the trainers' skip flag: a skipped step
    passes 1.0, which leaves every EMA value and buffer bit-exact), so nothing is read on the host.
    """
    ema_params = [p for p in ema.parameters()]
    params = [p.detach() for p in unwrap_model(model).parameters()]
    if not isinstance(decay, torch.Tensor):
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        keep = None
    else:
        # 1 - decay in float64, then float32: the same weight as the float path. One 0-dim tensor per
        # parameter: a single tensor would be read on the host as a number.
        weight = (1.0 - decay.to(torch.float64)).to(torch.float32)
        torch._foreach_lerp_(ema_params, params, [weight] * len(ema_params))
        keep = weight == 0
    for ema_buffer, buffer in zip(ema.buffers(), unwrap_model(model).buffers()):
        ema_buffer.copy_(buffer if keep is None else torch.where(keep, ema_buffer, buffer))


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / FSDP-less wrappers and ``torch.compile``'s ``_orig_mod``."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """Mixed precision where asked for; a true no-op for fp32 on any device."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_precision(device: torch.device) -> Precision:
    return "bf16" if device.type == "cuda" else "fp32"


# A recipe's ``compile``: true / false, or "auto" (the default) = on for CUDA training, off on the CPU,
# where compiling takes longer than the short runs made there and the eager kernels are not the bottleneck.
CompileSetting = bool | Literal["auto"]


def resolve_compile(setting: CompileSetting, device: torch.device) -> bool:
    """Whether to ``torch.compile`` the trained model: ``setting`` itself, or for "auto" whether ``device`` is CUDA."""
    if setting == "auto":
        return device.type == "cuda"
    if not isinstance(setting, bool):
        raise ConfigError(f"train.compile must be true, false or auto, got {setting!r}")
    return setting


class NonFiniteGuard:
    """Skips optimizer steps whose loss or gradient norm is not finite; aborts after a run of them.

    The per-step decision stays on the device, so a step costs no host synchronisation: ``finite``
    turns the (rank-reduced) check values into one boolean tensor, ``record`` counts it into device
    counters and the caller skips the update with it (``step_unless_skipped``, ``update_ema``'s
    ``applied``). ``sync`` reads the counters (checkpoint steps), ``device_counts`` + ``absorb`` read
    them asynchronously with a log line, and both raise once a run of ``max_bad_steps`` non-finite
    steps happened: an abort is therefore noticed when the next log line is written or at the next
    checkpoint step after the limit is reached (the skipped steps changed nothing, and no checkpoint is
    written past it, since ``state_dict`` syncs first). ``check`` is the host-side form of all three.
    """

    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps = max_bad_steps
        self.consecutive = 0  # as of the last sync
        self.total = 0
        # (consecutive, total, longest run since the last sync) on the device; None right after a sync.
        self._counts: torch.Tensor | None = None

    @staticmethod
    def finite(*values: torch.Tensor) -> torch.Tensor:
        """A 0-dim boolean tensor on the values' device: every element of every value is finite."""
        return torch.stack([torch.isfinite(v).all() for v in values]).all()

    def record(self, ok: torch.Tensor) -> None:
        """Count one step whose finiteness is ``ok`` (a 0-dim boolean tensor) without reading it."""
        if self._counts is None:
            self._counts = torch.tensor([self.consecutive, self.total, self.consecutive], dtype=torch.int64,
                                        device=ok.device)
        bad = (~ok).to(torch.int64)
        consecutive = (self._counts[0] + 1) * bad  # a finite step ends the run
        self._counts = torch.stack([consecutive, self._counts[1] + bad, torch.maximum(self._counts[2], consecutive)])

    def sync(self) -> int:
        """Read the counters (one device-to-host copy); the steps skipped since the previous sync.

        Raises :class:`FloatingPointError` when ``max_bad_steps`` non-finite steps came in a row.
        """
        if self._counts is None:
            return 0
        counts, self._counts = self._counts.tolist(), None
        return self.absorb(counts)

    def device_counts(self) -> torch.Tensor | None:
        """The device counters ``(consecutive, total, longest run)`` as of now, or None when nothing was recorded
        since the last read. ``record`` builds new tensors, so the returned one keeps its values."""
        return self._counts

    def absorb(self, counts: list[int]) -> int:
        """``sync`` for counters read asynchronously (from :meth:`device_counts`): the steps skipped since the
        previous read; raises like ``sync``. The device counters keep counting."""
        consecutive, total, longest = counts
        skipped = total - self.total
        self.consecutive, self.total = consecutive, total
        if longest >= self.max_bad_steps:
            raise FloatingPointError(
                f"{longest} consecutive non-finite steps (limit --max-bad-steps={self.max_bad_steps}); "
                "aborting. Lower the LR, check the data, or resume from an earlier checkpoint."
            )
        return skipped

    def check(self, *values: torch.Tensor) -> bool:
        """True if the step may be applied (reads the device: use ``finite`` + ``record`` in loops).

        Every rank must agree, so call it on reduced values.
        """
        ok = self.finite(*values)
        self.record(ok)
        self.sync()
        return bool(ok)

    def state_dict(self) -> dict[str, int]:
        self.sync()
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive = int(state["consecutive"])
        self.total = int(state["total"])
        self._counts = None


def step_unless_skipped(optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """``optimizer.step()`` when the 0-dim boolean ``ok`` holds; otherwise nothing changes.

    The fused AdamW reads a ``found_inf`` flag on the device (GradScaler's mechanism): with it set,
    parameters, both moments and the step count stay exactly as they were, and nothing is read on the
    host. Other optimizers read ``ok`` on the host (one synchronisation per step).
    """
    if not all(group.get("fused") for group in optimizer.param_groups):  # groups decide, after a load too
        if bool(ok):
            optimizer.step()
        return
    optimizer.found_inf = (~ok).to(torch.float32)
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


class _EpochIndices(Sampler):
    """The wrapped sampler's indices as ``(epoch, index)``: the epoch travels to the workers with each index."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler
        self.epoch = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class _EpochItems(Dataset):
    """``dataset.item_at(index, epoch)`` for ``(epoch, index)`` keys (``dataset[index]`` for datasets without draws)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        if hasattr(self.dataset, "item_at"):
            return self.dataset.item_at(index, epoch)
        return self.dataset[index]


class InfiniteLoader:
    """Endless batches over epochs with a resumable position.

    ``sampler`` must offer ``set_epoch(e)`` and ``set_start_index(k)`` (skip the first ``k`` of this
    rank's indices), as :class:`dataset.sampler.ResumableDistributedSampler` does. The position is kept
    in *global* samples consumed in the current epoch, so a resume on the same world size lands on
    exactly the next batch.

    One ``DataLoader`` serves the whole run, and its workers are persistent: they are started once,
    not at every epoch. Each index reaches them with its epoch (``dataset.item_at(index, epoch)``, the
    per-sample draws of the datasets in ``dataset/``), so nothing has to tell a worker that an epoch
    began, and the samples are the same for any worker count.
    """

    def __init__(
        self,
        dataset: Dataset,
        sampler: Any,
        batch_size: int,
        world_size: int,
        num_workers: int = 0,
        collate_fn: Callable | None = None,
        pin_memory: bool = False,
        on_epoch_end: Callable[[int], None] | None = None,
    ) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.world_size = world_size
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.pin_memory = pin_memory
        self.on_epoch_end = on_epoch_end
        if num_workers > 0 and hasattr(dataset, "set_epoch") and not hasattr(dataset, "item_at"):
            # Persistent workers hold their own copy of the dataset: set_epoch would never reach them.
            raise TypeError(f"{type(dataset).__name__} has set_epoch but no item_at(index, epoch): with data workers "
                            "it would draw every epoch's samples from epoch 0; give it item_at")
        self.epoch = 0
        self.consumed_in_epoch = 0
        self._indices = _EpochIndices(sampler)
        self._loader: DataLoader | None = None  # built at the first batch, kept for the run
        self._iterator: Iterator | None = None

    def _start_epoch(self) -> None:
        if hasattr(self.dataset, "set_epoch"):  # for code that indexes the dataset directly
            self.dataset.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start_index(self.consumed_in_epoch // self.world_size)
        self._indices.epoch = self.epoch
        if self._loader is None:
            self._loader = DataLoader(
                _EpochItems(self.dataset),
                batch_size=self.batch_size,
                sampler=self._indices,
                num_workers=self.num_workers,
                collate_fn=self.collate_fn,
                pin_memory=self.pin_memory,
                drop_last=True,
                persistent_workers=self.num_workers > 0,
            )
        # The first iterator draws the workers' base seed from the global RNG; isolating that draw keeps
        # the training RNG streams independent of where epochs start and of resumes. Later epochs
        # reuse the workers (and re-read the sampler in this process).
        with torch.random.fork_rng(devices=[]):
            self._iterator = iter(self._loader)

    def __iter__(self) -> "InfiniteLoader":
        return self

    def __next__(self) -> Any:
        for _ in range(2):
            if self._iterator is None:
                self._start_epoch()
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                if self.on_epoch_end is not None:
                    self.on_epoch_end(self.epoch)
                self.epoch += 1
                self.consumed_in_epoch = 0
                continue
            self.consumed_in_epoch += self.batch_size * self.world_size
            return batch
        raise RuntimeError("the dataset yields no full batch: it is smaller than the per-rank batch size")

    def close(self) -> None:
        """Stop the data workers (they would otherwise live until the loader is garbage-collected); a later
        ``next`` starts new ones."""
        iterator, self._iterator, self._loader = self._iterator, None, None
        shutdown = getattr(iterator, "_shutdown_workers", None)  # torch's multi-process iterator
        if shutdown is not None:
            shutdown()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed_in_epoch": self.consumed_in_epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self.consumed_in_epoch = int(state["consumed_in_epoch"])
        self._iterator = None


def save_train_checkpoint(
    manager: CheckpointManager,
    env: DistEnv,
    step: int,
    config: Any,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    extra: dict[str, Any] | None = None,
    aliases: dict[str, Any] | None = None,
) -> None:
    """Collective: every rank must call it (RNG states are gathered); rank 0 writes.

    ``aliases`` adds top-level entries for other loaders (e.g. ``ema`` + ``tokenizer_config`` so that
    ``DARTokenizer.from_pretrained`` reads a training checkpoint). Tensors that share storage with
    ``modules`` (another ``state_dict()`` of the same module) are written only once by ``torch.save``.
    """
    rng_states = all_gather_object(capture_rng_state())
    if not env.is_main:
        return
    state = {
        "format": "dar-train-v1",
        "step": step,
        "world_size": env.world_size,
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config,
        "modules": {name: unwrap_model(m).state_dict() for name, m in modules.items()},
        "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
        "rng": rng_states,
        "extra": extra or {},
    }
    clashes = sorted(set(aliases or {}) & set(state))
    if clashes:
        raise KeyError(f"checkpoint aliases {clashes} clash with the training-checkpoint layout")
    state.update(aliases or {})
    manager.save(state, step)


def load_train_checkpoint(
    path: str,
    env: DistEnv,
    modules: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Restore modules (strict), optimizers and this rank's RNG; returns the checkpoint's ``extra`` + step."""
    state = load_state_file(path, map_location="cpu")
    if not isinstance(state, dict) or state.get("format") != "dar-train-v1":
        raise UserError(f"--resume {path} is not a training checkpoint of this codebase (no 'format': "
                        "'dar-train-v1'); pass --resume auto or a RUN/checkpoints/step_*.pt file written by this trainer")
    missing = sorted(set(modules) - set(state["modules"]))
    if missing:
        raise UserError(f"{path} has no state for module(s) {missing}: it was written by another trainer or "
                        "recipe; resume with the recipe that wrote it")
    for name, module in modules.items():
        target = unwrap_model(module)
        if not hasattr(target, "gather"):  # FSDP stand-ins hold no state until gathered (collective)
            check_state_dict(state["modules"][name], target.state_dict(), f"{path} ({name})")
        target.load_state_dict(state["modules"][name], strict=True)
    missing_opt = sorted(set(optimizers) - set(state["optimizers"]))
    if missing_opt:
        raise UserError(f"{path} has no state for optimizer(s) {missing_opt}: it was written with another "
                        "recipe (e.g. without the GAN); resume with the recipe that wrote it")
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(state["optimizers"][name])
    if state["world_size"] == env.world_size:
        restore_rng_state(state["rng"][env.rank])
    else:
        log(
            f"checkpoint was written with world size {state['world_size']}, now {env.world_size}: "
            "training continues, but RNG streams are re-seeded so losses will not match an uninterrupted run"
        )
    return {"step": int(state["step"]), **state["extra"]}


class Throughput:
    """Images (or sequences) per second between two log points, summed over ranks."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.items = 0

    def add(self, n: int) -> None:
        self.items += n

    def rate(self) -> float:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        value = self.items / elapsed
        self.start = time.perf_counter()
        self.items = 0
        return value


class WandbLogger:
    """Optional Weights & Biases mirror of ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, enabled: bool, env: DistEnv, project: str, run_name: str, config: Any) -> None:
        self.run = None
        if not enabled or not env.is_main:
            return
        try:
            import wandb
        except ImportError as error:
            raise ImportError("--wandb needs the wandb package: `pip install wandb` (or drop --wandb)") from error
        cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
        self.run = wandb.init(project=project, name=run_name, config=cfg, resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in record.items() if k != "step"}, step=int(record["step"]))

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


def add_common_train_args(parser: argparse.ArgumentParser) -> None:
    """Flags both trainers share; every one of them is read by both.

    LlamaGen's names are accepted where the meaning is the same (``--global-seed``,
    ``--mixed-precision``, ``--no-compile``), so its launch scripts carry over. Any recipe key without
    a flag of its own is set with ``--set train.optim.lr=1e-4`` (repeatable, type-checked).
    """
    parser.add_argument("--config", required=True, help="YAML training recipe (configs/*/train_*.yaml, configs/ar/gpt_*.yaml)")
    parser.add_argument("--results-dir", default=None,
                        help="run folder: config, metrics, checkpoints, samples (required unless --print-config)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override any recipe key, e.g. --set train.optim.lr=1e-4 (repeatable; applied after "
                             "the other flags)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved recipe (YAML, after every override) and exit without training")
    parser.add_argument("--max-steps", type=int, default=None, help="override the recipe's total steps")
    parser.add_argument("--global-batch-size", type=int, default=None, help="override; divided over ranks")
    parser.add_argument("--lr", type=float, default=None, help="override the peak learning rate")
    parser.add_argument("--ckpt-every", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=None)
    parser.add_argument("--keep-last", type=int, default=3, help="checkpoints kept on disk")
    parser.add_argument("--resume", default=None, help="'auto' (latest in results-dir if any) or a checkpoint path")
    parser.add_argument("--seed", "--global-seed", dest="seed", type=int, default=None)
    parser.add_argument("--max-bad-steps", type=int, default=None, help="abort after this many non-finite steps in a row")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--precision", "--mixed-precision", dest="precision",
                        choices=["auto", "fp32", "bf16", "fp16", "none"], default="auto",
                        help="auto: bf16 on CUDA, fp32 on CPU (none = fp32, LlamaGen's name)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model; the recipe's default (compile: auto) compiles on CUDA only. "
                             "--compile forces it, --no-compile turns it off whatever the recipe says")
    parser.add_argument("--wandb", action="store_true", help="mirror metrics to Weights & Biases")
    parser.add_argument("--wandb-project", default="dar")


def normalise_common_args(args: argparse.Namespace) -> argparse.Namespace:
    """Map LlamaGen's spellings onto ours before the recipe is overridden."""
    if args.precision == "none":
        args.precision = "fp32"
    return args


def finish_cli_config(config: T, args: argparse.Namespace) -> T:
    """Apply ``--set`` assignments; with ``--print-config`` print the result and exit 0.

    Called by both trainers' ``parse_args`` after their own flags, so ``--set`` has the last word and
    ``--print-config`` shows exactly what would be trained (and written to ``RESULTS/config.yaml``).
    """
    config = apply_assignments(config, args.assignments)
    if args.print_config:
        sys.stdout.write(config_to_yaml(config))
        raise SystemExit(0)
    if args.results_dir is None:
        raise UserError("pass --results-dir RUN_FOLDER (where config, metrics and checkpoints go)")
    return config


def resolve_resume(resume: str | None, manager: CheckpointManager) -> str | None:
    """The checkpoint to resume from: None (fresh start), the newest in ``manager`` or the given one.

    ``auto`` takes the highest complete ``step_*.pt`` even when the ``latest`` pointer is missing or
    lags (a kill between a checkpoint's rename and the pointer write); it is None on a fresh folder.
    An explicit path may be a checkpoint, a ``checkpoints/latest`` pointer or a ``checkpoints`` folder.
    """
    if resume is None:
        return None
    if resume == "auto":
        latest = manager.latest()
        return str(latest) if latest is not None else None
    if not Path(resume).expanduser().exists():
        raise PathNotFoundError(resume, "pass --resume auto or an existing checkpoint (RUN/checkpoints/step_*.pt)")
    path = follow_pointer(resume)
    if path.is_dir() and not is_sharded_checkpoint(path):
        raise UserError(f"--resume {resume} is a folder; pass --resume auto or a checkpoint file "
                        "(RUN/checkpoints/step_*.pt or RUN/checkpoints/latest)")
    if path.suffix == ".safetensors":  # inference weights: no optimizer, data position or RNG to resume
        raise UserError(f"--resume {path} is not a training checkpoint (inference weights); pass --resume auto or "
                        "a RUN/checkpoints/step_*.pt file written by this trainer")
    return str(path)


def check_weights_source(value: str | None, flag: str) -> None:
    """A local weights path given to ``flag`` must exist; a hub repo id (``owner/name``) is resolved later."""
    if value is None:
        return
    path = Path(value).expanduser()
    looks_like_repo = str(value).count("/") == 1 and not str(value).startswith((".", "/", "~"))
    if not path.exists() and not looks_like_repo:
        raise PathNotFoundError(f"{flag} {value}", "pass a weights file, a save_pretrained folder, a run's "
                                "checkpoints/latest or a hub repo id (owner/name)")


class RunExistsError(UserError, FileExistsError):
    """A fresh start was asked for in a run folder that already holds checkpoints."""


def check_fresh_start(resume_path: str | None, manager: CheckpointManager) -> None:
    """A run that does not resume must not overwrite another run's checkpoints."""
    if resume_path is None and manager.all_steps():
        raise RunExistsError(f"{manager.directory} already holds checkpoints: pass --resume auto to continue "
                             "that run, or a new --results-dir")


def check_results_dir(results_dir: str) -> None:
    path = Path(results_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"--results-dir {results_dir} is a file; pass a folder (it is created if missing)")


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` holds on every rank (used so all ranks skip a bad step together)."""
    if not is_initialized():
        return flag
    value = torch.tensor([0 if flag else 1], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(value)
    return int(value.item()) == 0
