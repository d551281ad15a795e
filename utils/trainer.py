"""The training skeleton both trainers share: run options, the training state and the loop around a step.

Each trainer's ``main`` reads top to bottom (config → data → model → objective → loop) and keeps only
what is its own: how a batch becomes a loss (``train_step``), what a checkpoint carries besides the
shared layout (``aliases``) and how final weights are written (``write_final``). Everything else is
here, written once:

- :class:`RunOptions`: per-launch settings (results folder, resume, device, ...);
- :func:`open_run` / :func:`create_run_folder`: the run folder and checkpoint manager, checked before
  anything is written; a fresh start truncates metrics left by a launch killed before its first
  checkpoint, and stale temporaries of killed checkpoint writes are swept;
- :class:`TrainState`: model, EMA, optimizers, data position, non-finite guard, log window, skipped
  batches and bad-file counts, i.e. everything a checkpoint restores (:func:`resume`,
  :func:`save_checkpoint`, through ``utils.training.save_train_checkpoint``, or with
  ``RunContext.sharded_checkpoints`` through ``utils.sharded_checkpoint``: one folder of per-rank
  shards, nothing gathered); ``RunContext.elastic`` runs (the GPT trainer) resume on another world size;
- :func:`run_loop`: step, log window (:func:`begin_log` / :class:`PendingLog`: the same record fields for
  both trainers, read from the device one step late so that the GPU never waits for a log line),
  checkpoints, and at the end the export rule of :func:`final_exports`.

No host synchronisation per step: the non-finite guard decides on the device (a skipped update
leaves parameters, optimizer moments and step counts and the EMA exactly as they were), the log
window sums stay device tensors (float64, so they equal the host sums they replace), and the
counters are read only at log and checkpoint steps. So a run that reaches ``--max-bad-steps``
non-finite steps in a row stops at the next log or checkpoint step, before writing anything. The
empty-batch agreement of image data (a rank whose batch held only unreadable files) still talks to
the other ranks every step; code data skips it.

Export rule (both trainers): ``final/`` holds the weights to sample with, i.e. the EMA when the run
keeps one and the trained weights otherwise; with an EMA, the trained (raw) weights also go to
``final_raw/``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dataset.images import BadFileStats
from utils.checkpoint import CheckpointManager, is_sharded_checkpoint
from utils.config import config_differences, dataclass_to_dict
from utils.distributed import DistEnv, all_reduce_mean, all_reduce_sum
from utils.errors import UserError
from utils.run import RunFolder
from utils.sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from utils.training import (
    InfiniteLoader,
    NonFiniteGuard,
    Throughput,
    WandbLogger,
    all_ranks_agree,
    check_fresh_start,
    check_results_dir,
    check_run_options,
    load_train_checkpoint,
    resolve_resume,
    save_train_checkpoint,
    step_unless_skipped,
    update_ema,
)


@dataclass(frozen=True)
class RunOptions:
    """Per-launch settings that do not change what is trained (both trainers)."""

    results_dir: str
    resume: str | None = None
    device: str = "auto"
    keep_last: int = 3
    stop_after_step: int | None = None  # checkpoint and exit here without changing the schedule
    wandb: bool = False
    wandb_project: str = "dar"


def run_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`RunOptions` fields of a parsed command line (``utils.training.add_common_train_args``)."""
    return {"results_dir": args.results_dir, "resume": args.resume, "device": args.device,
            "keep_last": args.keep_last, "stop_after_step": getattr(args, "stop_after_step", None),
            "wandb": args.wandb, "wandb_project": args.wandb_project}


class BadFiles:
    """Bad-file counts of image data: this rank's since the last sync, and the epoch's global total up to it.

    Synced at checkpoints too, so a resumed run still reports whole epochs.
    """

    def __init__(self) -> None:
        self.local = BadFileStats()
        self.synced = BadFileStats()

    def sync(self, device: torch.device) -> None:
        self.synced.update(self.local.all_reduce(device))
        self.local = BadFileStats()


@dataclass
class TrainState:
    """Everything a checkpoint restores, plus the modules that train.

    ``model`` is the network the optimizer updates, ``trained`` the one called in the step (DDP wrapper
    or ``model``); ``modules`` / ``optimizers`` are what checkpoints hold (FSDP stand-ins where sharded).
    """

    model: nn.Module
    trained: nn.Module
    ema: nn.Module | None
    ema_decay: float
    optimizer: torch.optim.Optimizer
    lr: Callable[[int], float]  # 0-based step -> learning rate
    loader: InfiniteLoader
    guard: NonFiniteGuard
    modules: dict[str, Any]
    optimizers: dict[str, Any]
    bad: BadFiles | None = None  # image data only
    step: int = 0
    # Per-term sums since the last log line + "count": float64 device tensors while training (floats after
    # a resume until the next step adds to them); checkpoints store them as floats.
    window: dict[str, Any] = field(default_factory=dict)
    empty_batches: int = 0
    # The log line begun at the last log step and not yet written (see PendingLog); not checkpointed.
    pending_log: PendingLog | None = None

    @property
    def sampling_model(self) -> nn.Module:
        """The weights samples and ``final/`` come from: the EMA when the run keeps one."""
        return self.ema if self.ema is not None else self.model


@dataclass
class RunContext:
    """What stays fixed during a run: where it writes, its schedule, and how it reports."""

    env: DistEnv
    run: RunFolder
    manager: CheckpointManager
    logger: logging.Logger
    config: Any  # the fully resolved recipe (dataclass)
    max_steps: int
    last_step: int  # max_steps, or --stop-after-step when earlier
    log_every: int
    ckpt_every: int
    steps_per_epoch: int
    global_batch_size: int
    wandb: WandbLogger | None = None
    # Top-level checkpoint entries for from_pretrained (rank 0, after FSDP states are gathered).
    aliases: Callable[[TrainState], dict[str, Any]] | None = None
    throughput: Throughput = field(default_factory=Throughput)
    # FSDP: every rank writes its shards (utils.sharded_checkpoint) instead of gathering to one file.
    sharded_checkpoints: bool = False
    # The data order is cut into global batches and random draws follow the samples (the GPT
    # trainer): a checkpoint then resumes on another world size onto the same trajectory.
    elastic: bool = False


@dataclass
class StepResult:
    """One optimizer step as the loop logs it."""

    terms: dict[str, torch.Tensor]  # "loss" and the named terms, averaged over micro-batches and ranks
    grad_norm: torch.Tensor
    lr: float
    items: int  # images (or code sequences) this rank trained on
    applied: torch.Tensor  # 0-dim bool on the device; False: the non-finite guard skipped the update
    extras: dict[str, float] = field(default_factory=dict)  # logged as they are (e.g. disc_lr)


# ------------------------------------------------------------------------------------------------
# Run folder, resume, checkpoints
# ------------------------------------------------------------------------------------------------
def open_run(opts: RunOptions, env: DistEnv) -> tuple[RunFolder, CheckpointManager, str | None]:
    """(run folder, checkpoint manager, checkpoint to resume or None); nothing is created yet."""
    check_run_options(opts.keep_last, opts.stop_after_step)
    check_results_dir(opts.results_dir)
    run = RunFolder(opts.results_dir, env.is_main, create=False)
    manager = CheckpointManager(run.checkpoints, keep_last=opts.keep_last)
    resume_path = resolve_resume(opts.resume, manager)
    check_fresh_start(resume_path, manager)
    return run, manager, resume_path


def create_run_folder(run: RunFolder, manager: CheckpointManager, env: DistEnv, resume_path: str | None) -> None:
    """Create the folders once every input is checked; sweep killed writes' temporaries; clean metrics."""
    run.create()
    if env.is_main:
        manager.sweep()  # temporaries of checkpoint writes a kill interrupted (no rank writes yet)
    if resume_path is None:
        run.truncate_metrics(0)  # lines of an earlier launch that died before its first checkpoint


def _sharded_parts(state: TrainState) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """The sharded (or plain) modules and (model, optimizer) pairs a sharded checkpoint holds."""
    modules = {"model": state.model} if state.ema is None else {"model": state.model, "ema": state.ema}
    if set(state.optimizers) != {"optimizer"}:
        raise UserError("sharded checkpoints are written and resumed by GPT runs with train.fsdp only; resume this "
                        "run from one of its own step_*.pt checkpoints")
    return modules, {"optimizer": (state.model, state.optimizer)}


def resume(state: TrainState, ctx: RunContext, path: str) -> None:
    """Restore ``state`` from a training checkpoint and drop metrics logged after it."""
    env = ctx.env
    # Elastic runs draw nothing that matters from the RNG streams, so not restoring them on another
    # world size is harmless: check_elastic says what does matter instead.
    log = (lambda message: None) if ctx.elastic else ctx.logger.warning
    kernels = _kernel_choices(state)
    if is_sharded_checkpoint(path):
        extra = load_sharded_checkpoint(path, env, *_sharded_parts(state), log=log)
    else:
        extra = load_train_checkpoint(path, env, state.modules, state.optimizers, log=log)
    _restore_kernel_choices(kernels)
    if ctx.elastic:
        check_elastic(extra, ctx, path)
    state.step = extra["step"]
    state.loader.load_state_dict(extra["loader"])
    state.guard.load_state_dict(extra["guard"])
    window = dict(extra["window"])
    if "loss_sum" in window:  # GPT checkpoints written before the trainers shared this loop
        window["loss"] = window.pop("loss_sum")
    state.window = window
    state.empty_batches = int(extra["empty_batches"])
    if state.bad is not None and "bad_files" in extra:
        state.bad.synced = BadFileStats(**extra["bad_files"])
    for diff in config_differences(extra["config"], dataclass_to_dict(ctx.config)) if "config" in extra else []:
        ctx.logger.warning(f"config changed since the checkpoint: {diff}")
    ctx.run.truncate_metrics(state.step)
    ctx.logger.info(f"resumed from {path} at step {state.step}")


_KERNEL_FLAGS = ("fused", "foreach")


def _kernel_choices(state: TrainState) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each optimizer group's kernel flags as this launch built them."""
    optimizers = {id(o): o for o in (state.optimizer, *state.optimizers.values())
                  if isinstance(o, torch.optim.Optimizer)}
    return [(group, {k: group[k] for k in _KERNEL_FLAGS if k in group})
            for optimizer in optimizers.values() for group in optimizer.param_groups]


def _restore_kernel_choices(choices: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """``Optimizer.load_state_dict`` copies the saved groups' ``fused`` / ``foreach`` flags, i.e. the kernel
    the *writing* launch picked (an FSDP run on the CPU uses the per-tensor loop); the kernel is this
    launch's choice, and the on-device skip of a non-finite step needs the fused one."""
    for group, flags in choices:
        group.update(flags)


def check_elastic(extra: dict[str, Any], ctx: RunContext, path: str) -> None:
    """An elastic run's checkpoint must share its global batch; older checkpoints resume with a warning."""
    saved_batch = extra.get("global_batch_size", (extra.get("config") or {}).get("train", {}).get("global_batch_size"))
    if saved_batch is not None and saved_batch != ctx.global_batch_size:
        raise UserError(f"{path} was trained at global batch {saved_batch}, this launch uses {ctx.global_batch_size}: "
                        f"the data position and schedule would not line up; resume with --global-batch-size {saved_batch}")
    if extra.get("data_order") != "global-batches":
        ctx.logger.warning(f"{path} predates world-size-independent data order: training continues, but the samples "
                           "after this point differ from those the run would have seen uninterrupted")
    elif extra.get("world_size", ctx.env.world_size) != ctx.env.world_size:
        ctx.logger.info(f"resuming a {extra['world_size']}-rank checkpoint on {ctx.env.world_size} rank(s): the "
                        "global batches and per-sample draws are the same, so the run continues its trajectory")
        warn_micro_batch_change(extra, ctx)


def warn_micro_batch_change(extra: dict[str, Any], ctx: RunContext) -> None:
    """Terms averaged within a micro-batch (the tokenizer's codebook usage and entropy) follow the per-rank
    micro-batch, so an elastic resume stays on the uninterrupted trajectory only when that size is kept."""
    saved_accum = (extra.get("config") or {}).get("train", {}).get("grad_accum_steps")
    accum = getattr(getattr(ctx.config, "train", None), "grad_accum_steps", None)
    if saved_accum is None or accum is None:
        return
    saved_micro = ctx.global_batch_size // (extra["world_size"] * saved_accum)
    micro = ctx.global_batch_size // (ctx.env.world_size * accum)
    if saved_micro == micro:
        return
    keep = ctx.global_batch_size // (ctx.env.world_size * saved_micro)
    hint = (f"; --grad-accum-steps {keep} keeps it" if keep * ctx.env.world_size * saved_micro == ctx.global_batch_size
            else "")
    ctx.logger.warning(f"the per-rank micro-batch changes from {saved_micro} to {micro}: per-micro-batch terms "
                       f"(codebook statistics) change with it, so the run leaves its uninterrupted trajectory{hint}")


def save_checkpoint(state: TrainState, ctx: RunContext) -> None:
    """Collective: every rank calls it (FSDP states and RNG streams are gathered, or shards written); rank 0
    writes the single file."""
    extra: dict[str, Any] = {"loader": state.loader.state_dict(), "guard": state.guard.state_dict(),
                             "window": {k: float(v) for k, v in state.window.items()},
                             "empty_batches": state.empty_batches,
                             "config": dataclass_to_dict(ctx.config), "steps_per_epoch": ctx.steps_per_epoch,
                             "world_size": ctx.env.world_size, "global_batch_size": ctx.global_batch_size}
    if ctx.elastic:
        extra["data_order"] = "global-batches"
    if state.bad is not None:
        state.bad.sync(ctx.env.device)
        extra["bad_files"] = dataclasses.asdict(state.bad.synced)
    if ctx.sharded_checkpoints:
        save_sharded_checkpoint(ctx.manager, ctx.env, state.step, dataclass_to_dict(ctx.config),
                                *_sharded_parts(state), extra=extra)
        ctx.logger.info(f"saved sharded checkpoint at step {state.step}")
        return
    holders = [h for h in (*state.modules.values(), *state.optimizers.values()) if hasattr(h, "gather")]
    for holder in holders:
        holder.gather()
    aliases = ctx.aliases(state) if ctx.aliases is not None and ctx.env.is_main else None
    save_train_checkpoint(ctx.manager, ctx.env, state.step, ctx.config, state.modules, state.optimizers,
                          extra=extra, aliases=aliases)
    for holder in holders:
        holder.release()
    ctx.logger.info(f"saved checkpoint at step {state.step}")


def end_epoch(state: TrainState, ctx: RunContext, data_path: str, epoch: int) -> None:
    """``InfiniteLoader.on_epoch_end``: report the epoch's bad files; stop when every file was unreadable."""
    write_pending_log(state, ctx)  # the previous step's line first: metrics.jsonl stays in step order
    state.bad.sync(ctx.env.device)
    total = state.bad.synced
    ctx.logger.info(f"epoch {epoch} done: {total.summary()}")
    # Logged with the step being fetched, so a resume's metrics truncation treats it like that step.
    ctx.run.log_metrics({"step": state.step + 1, "epoch_end": epoch,
                         **{f"bad_files/{k}": v for k, v in total.to_dict().items()}})
    if total.seen > 0 and total.num_skipped == total.seen:
        raise UserError(f"epoch {epoch}: every one of the {total.seen} files in {data_path} was skipped "
                        f"({total.summary()}); check the folder holds readable images")
    state.bad.synced = BadFileStats()


def track_bad_files(state: TrainState, ctx: RunContext, data_path: str) -> None:
    """Count bad files of image data and report them at every epoch end."""
    state.bad = BadFiles()
    state.loader.on_epoch_end = partial(end_epoch, state, ctx, data_path)


# ------------------------------------------------------------------------------------------------
# The step's shared parts
# ------------------------------------------------------------------------------------------------
def next_batch(state: TrainState, ctx: RunContext, size: Callable[[Any], int]) -> Any:
    """The next batch every rank can train on; a batch some rank drew only bad files for is skipped by all.

    Only image data can hold bad files (``state.bad``); code batches are returned as they come, with no
    agreement between ranks (a collective and a host read per step).
    """
    if state.bad is None:
        return next(state.loader)
    while True:
        batch = next(state.loader)
        if state.bad is not None and hasattr(batch, "stats"):
            state.bad.local.update(batch.stats)
        if all_ranks_agree(size(batch) > 0, ctx.env.device):
            return batch
        state.empty_batches += 1
        ctx.logger.warning(f"step {state.step + 1}: skipped a batch without decodable images on some rank")


def reduce_micro_batches(records: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-name mean over micro-batches, then over ranks (one collective for every name)."""
    names = list(records[0])
    reduced = all_reduce_mean(torch.stack([torch.stack([r[k].detach() for r in records]).mean() for k in names]))
    return dict(zip(names, reduced))


def clip_gradients(model: nn.Module, grad_clip: float) -> torch.Tensor:
    """Clip to ``grad_clip`` (0: measure the norm, never clip); the total norm as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a DTensor


def apply_update(state: TrainState, checks: list[torch.Tensor], *others: torch.optim.Optimizer) -> torch.Tensor:
    """Step the optimizer(s) and the EMA unless a (rank-reduced) check value is not finite.

    Decided on the device, without reading anything on the host: returns the 0-dim boolean "applied".
    """
    ok = state.guard.finite(*checks)
    state.guard.record(ok)
    for optimizer in (state.optimizer, *others):
        step_unless_skipped(optimizer, ok)
    if state.ema is not None:
        # decay 1 on a skipped step: the EMA stays exactly as it was (decided on the device).
        decay = torch.full((), state.ema_decay, dtype=torch.float64, device=ok.device)
        update_ema(state.ema, state.model, torch.where(ok, decay, 1.0))
    return ok


# ------------------------------------------------------------------------------------------------
# Loop, log window, export
# ------------------------------------------------------------------------------------------------
def record_step(state: TrainState, ctx: RunContext, result: StepResult) -> None:
    """Add an applied step's terms to the log window (on the device: nothing is read); advance the step.

    float64 sums of the float32 terms, added one step at a time: the same numbers as host sums, and
    the same wherever a checkpoint cut the run (exact resume).
    """
    applied = result.applied.to(torch.float64)
    for key, value in result.terms.items():
        # where, not a product: a skipped step's terms are NaN, and NaN x 0 is NaN.
        term = torch.where(result.applied, value.detach().to(torch.float64), 0.0)
        state.window[key] = state.window.get(key, 0.0) + term
    state.window["count"] = state.window.get("count", 0.0) + applied
    state.step += 1
    ctx.throughput.add(result.items)


@dataclass
class PendingLog:
    """A log line whose device values are on their way to the host; :meth:`write` finishes it.

    :func:`begin_log` stacks everything the line needs from the device into one tensor and starts a
    non-blocking copy into pinned host memory (CUDA); the loop writes the line after it has queued the
    next step, so the GPU never waits for the host to read a log line. On the CPU the values are read
    in place.
    """

    head: dict[str, Any]  # host fields before the window's means: step, epoch
    lr: float
    extras: dict[str, Any]  # host fields after the device ones: the trainer's extras, peak memory
    names: list[str]  # window terms, then grad_norm, the throughput and the guard's counters (if any)
    values: torch.Tensor  # float64, on the host once ``ready`` has completed
    ready: torch.cuda.Event | None
    empty_batches: int  # as of the logged step (the next step may add one before the line is written)

    def write(self, state: TrainState, ctx: RunContext) -> None:
        """Read the copied values (waits for the logged step only) and write the line."""
        if self.ready is not None:
            self.ready.synchronize()
        values = dict(zip(self.names, self.values.tolist()))
        if _GUARD_FIELDS[0] in values:
            skipped = state.guard.absorb([int(values.pop(k)) for k in _GUARD_FIELDS])
            warn_skipped(state, ctx, skipped)
        grad_norm, rate = values.pop("grad_norm"), values.pop("images_per_s")
        count = values.pop("count", 0.0)
        record = dict(self.head)
        record.update({k: v / count for k, v in values.items()} if count else {"loss": float("nan")})
        record.update(lr=self.lr, grad_norm=grad_norm, images_per_s=rate, **self.extras)
        if state.guard.total or self.empty_batches:
            record.update(skipped_steps=state.guard.total, empty_batches=self.empty_batches)
        ctx.run.log_metrics(record)
        if ctx.wandb is not None:
            ctx.wandb.log(record)
        ctx.logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


_GUARD_FIELDS = ("guard_consecutive", "guard_total", "guard_longest")


def warn_skipped(state: TrainState, ctx: RunContext, skipped: int) -> None:
    if skipped:
        ctx.logger.warning(f"step {state.step}: {skipped} step(s) with a non-finite loss or gradient since the "
                           f"previous report, updates skipped ({state.guard.consecutive} in a row now)")


def begin_log(state: TrainState, ctx: RunContext, result: StepResult) -> PendingLog:
    """Start one metrics line (means since the previous line, the step's LR and gradient norm, throughput)
    without reading the device; the window starts again."""
    device = ctx.env.device
    epoch = state.loader.epoch + state.loader.consumed_in_epoch / (ctx.steps_per_epoch * ctx.global_batch_size)
    head = {"step": state.step, "epoch": round(epoch, 4)}
    extras: dict[str, Any] = dict(result.extras)
    if device.type == "cuda":
        extras["max_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30  # allocator statistics, no sync
    # torch.full writes the host number on the device: no copy waits for the queue.
    rate = all_reduce_sum(torch.full((), ctx.throughput.rate(), dtype=torch.float64, device=device))
    names = list(state.window) + ["grad_norm", "images_per_s"]
    # A host float (a window restored from a checkpoint) is written on the device by torch.full, not copied.
    values = [v.to(torch.float64) if isinstance(v, torch.Tensor) else torch.full((), v, dtype=torch.float64,
                                                                                  device=device)
              for v in state.window.values()]
    values += [result.grad_norm.detach().to(torch.float64), rate]
    counts = state.guard.device_counts()
    if counts is not None:
        names += list(_GUARD_FIELDS)
        values += list(counts.to(torch.float64))
    stacked = torch.stack(values)
    state.window = {}
    host, ready = stacked, None
    if device.type == "cuda":
        host = torch.empty(stacked.shape, dtype=torch.float64, pin_memory=True)
        host.copy_(stacked, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
    return PendingLog(head, result.lr, extras, names, host, ready, state.empty_batches)


def check_guard(state: TrainState, ctx: RunContext) -> None:
    """Read the non-finite guard (checkpoint steps): warn about skipped steps, abort past the limit."""
    warn_skipped(state, ctx, state.guard.sync())


def write_pending_log(state: TrainState, ctx: RunContext) -> None:
    """Write the log line begun at the last log step, if any (waits for that step's values only)."""
    if state.pending_log is not None:
        pending, state.pending_log = state.pending_log, None
        pending.write(state, ctx)


def run_loop(state: TrainState, ctx: RunContext, train_step: Callable[[TrainState], StepResult],
             after_step: Callable[[TrainState], None] | None = None) -> None:
    """Train until ``ctx.last_step``: step, log, ``after_step`` (e.g. sample grids), checkpoint.

    A log step's line is written after the next step has been queued (:class:`PendingLog`), or earlier
    when an epoch ends while that step fetches its batch, or before a checkpoint. So messages of the
    next step's data loading (a skipped batch) may be printed before the line.
    """
    try:
        while state.step < ctx.last_step:
            result = train_step(state)
            write_pending_log(state, ctx)
            record_step(state, ctx, result)
            if state.step % ctx.log_every == 0 or state.step == ctx.last_step:
                state.pending_log = begin_log(state, ctx, result)
            if after_step is not None:
                after_step(state)
            if state.step % ctx.ckpt_every == 0 or state.step == ctx.last_step:
                write_pending_log(state, ctx)
                check_guard(state, ctx)  # never write a checkpoint past the --max-bad-steps limit
                save_checkpoint(state, ctx)
        write_pending_log(state, ctx)
    finally:
        state.loader.close()  # the data workers are not needed for the export


def final_exports(state: TrainState) -> dict[str, nn.Module]:
    """The export rule: ``final`` = the weights to sample with (EMA if kept), ``final_raw`` = raw next to an EMA."""
    if state.ema is None:
        return {"final": state.model}
    return {"final": state.ema, "final_raw": state.model}


def finish(state: TrainState, ctx: RunContext, write_final: Callable[[nn.Module, Path], None]) -> dict[str, Any]:
    """Export (every rank calls ``write_final``: gathering sharded weights is collective) once max_steps is done."""
    if state.step >= ctx.max_steps:
        for name, module in final_exports(state).items():
            write_final(module, ctx.run.root / name)
        bad = f"; bad files this epoch so far: {state.bad.synced.summary()}" if state.bad is not None else ""
        ctx.logger.info(f"done: {state.step} steps{bad}; inference weights in {ctx.run.root / 'final'}")
    else:
        ctx.logger.info(f"stopped after step {state.step} of {ctx.max_steps}; continue with --resume auto")
    if ctx.wandb is not None:
        ctx.wandb.finish()
    return {"step": state.step, "results_dir": str(ctx.run.root)}
