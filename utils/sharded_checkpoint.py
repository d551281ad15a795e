"""Sharded training checkpoints (``torch.distributed.checkpoint``) for FSDP runs.

A single-file checkpoint gathers the whole model and optimizer state on rank 0; for GPT-XXL that is
tens of GB through one process. Here every rank writes its own shards, so nothing is gathered:

    checkpoints/step_XXXXXXX/
        .metadata, __0_0.distcp, ...   model (+ EMA) and optimizer tensors, as DCP writes them
        train_state.pt                  step, data position, guard, log window, config, RNG of every rank

The folder is written as ``checkpoints/.step_XXXXXXX.tmp/`` and renamed by rank 0 once every rank
has finished (a barrier), so a complete ``step_XXXXXXX/`` is all or nothing, like a ``.pt`` file;
``utils.checkpoint.CheckpointManager`` finds, prunes and sweeps these folders with the files.

Tensors are stored by their full names and global shapes, so a checkpoint loads at any world size
(DCP reshards on load) and into an unsharded model too. :func:`load_module_weights` reads one
module's full weights in a single process without a process group (the export command).
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from utils.checkpoint import SHARDED_META, CheckpointManager, is_sharded_checkpoint, safe_torch_load
from utils.distributed import DistEnv, all_gather_object, barrier, is_initialized
from utils.errors import UserError
from utils.run import capture_rng_state, restore_rng_state

FORMAT = "dar-train-sharded-v1"

# name -> (module the optimizer's parameters belong to, optimizer)
Optimizers = dict[str, tuple[nn.Module, torch.optim.Optimizer]]


def _tensor_state(modules: dict[str, nn.Module], optimizers: Optimizers) -> dict[str, Any]:
    """The DCP state: each rank's shards of every module and optimizer, keyed by full parameter names."""
    return {
        "modules": {name: get_model_state_dict(module) for name, module in modules.items()},
        # Creates empty optimizer states first where none exist yet, so that a load has slots to fill.
        "optimizers": {name: get_optimizer_state_dict(model, opt) for name, (model, opt) in optimizers.items()},
    }


def _load(state: dict[str, Any], path: Path) -> None:
    """``dcp.load``; in one process without a group it reads every shard itself (torch warns that it does)."""
    if is_initialized():
        dcp.load(state, checkpoint_id=path)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=True)


def save_sharded_checkpoint(manager: CheckpointManager, env: DistEnv, step: int, config: dict[str, Any],
                            modules: dict[str, nn.Module], optimizers: Optimizers,
                            extra: dict[str, Any]) -> Path:
    """Collective: every rank writes its shards; rank 0 writes the extras and renames the folder."""
    temporary = manager.temporary_folder_for(step)
    if env.is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    barrier()
    dcp.save(_tensor_state(modules, optimizers), checkpoint_id=temporary)
    rng_states = all_gather_object(capture_rng_state())
    if env.is_main:
        torch.save({"format": FORMAT, "step": step, "world_size": env.world_size, "config": config,
                    "modules": sorted(modules), "optimizers": sorted(optimizers), "rng": rng_states,
                    "extra": extra}, temporary / SHARDED_META)
    barrier()  # every rank's shards are on disk before the folder becomes a checkpoint
    path = manager.commit(temporary, step) if env.is_main else manager.sharded_path_for(step)
    barrier()  # nobody goes on (or exits) before the checkpoint is in place
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """The non-tensor part of a sharded checkpoint, checked to be one."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise UserError(f"{path} is not a sharded checkpoint (no {SHARDED_META}); pass a RUN/checkpoints/step_* "
                        "folder written by an FSDP run")
    meta = safe_torch_load(path / SHARDED_META)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path / SHARDED_META} is not the extras file of a sharded checkpoint of this codebase "
                        f"(no 'format': {FORMAT!r})")
    return meta


def load_sharded_checkpoint(path: str | Path, env: DistEnv, modules: dict[str, nn.Module], optimizers: Optimizers,
                            log: Callable[[str], None] = print) -> dict[str, Any]:
    """Restore modules (strict), optimizers and, at the same world size, this rank's RNG.

    Collective when distributed. Works at any world size and with sharded or plain modules. Returns
    the checkpoint's ``extra`` plus ``step`` and ``world_size``.
    """
    meta = read_meta(path)
    for kind, wanted, saved in (("module", modules, meta["modules"]), ("optimizer", optimizers, meta["optimizers"])):
        missing = sorted(set(wanted) - set(saved))
        if missing:
            raise UserError(f"{path} has no state for {kind}(s) {missing}: it was written with another recipe "
                            "(e.g. without EMA); resume with the recipe that wrote it")
    state = _tensor_state(modules, optimizers)
    _load(state, Path(path))
    for name, module in modules.items():
        set_model_state_dict(module, state["modules"][name])
    for name, (model, optimizer) in optimizers.items():
        set_optimizer_state_dict(model, optimizer, state["optimizers"][name])
    if meta["world_size"] == env.world_size:
        restore_rng_state(meta["rng"][env.rank])
    else:
        log(f"checkpoint was written with world size {meta['world_size']}, now {env.world_size}: "
            "RNG streams are not restored")
    return {"step": int(meta["step"]), "world_size": int(meta["world_size"]), **meta["extra"]}


def load_module_weights(path: str | Path, name: str, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Module ``name``'s full weights, read into copies of ``template``'s tensors; one process, no group."""
    meta = read_meta(path)
    if name not in meta["modules"]:
        raise UserError(f"{path} holds no {name!r} weights (it holds {', '.join(meta['modules'])})")
    state = {"modules": {name: {key: torch.empty_like(value) for key, value in template.items()}}}
    _load(state, Path(path))
    return state["modules"][name]
