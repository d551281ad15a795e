"""Safe loading and atomic saving of checkpoints.

Loading never runs pickled code: ``torch.load(weights_only=True)`` only. The official D-AR training
checkpoints may embed two harmless non-tensor objects (an ``argparse.Namespace`` and the official
``config_util.Config``); exactly those two are allow-listed, mapped to stand-ins, and returned as plain
dicts. Anything else is refused with the name of the offending global.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from utils.errors import PathNotFoundError, UserError
from utils.fileio import atomic_write, atomic_write_text, sweep_temporaries

__all__ = [
    "CheckpointManager", "CorruptFileError", "StateDictMismatchError", "UnsafeCheckpointError",
    "atomic_save", "atomic_write", "atomic_write_text", "check_state_dict", "follow_pointer",
    "load_state_file", "names_list", "safe_torch_load",
]

POINTER_NAME = "latest"
# step_XXXXXXX.pt: one file; step_XXXXXXX/: a sharded checkpoint (utils.sharded_checkpoint), whose
# folder appears only by renaming a complete temporary one.
_STEP_PATTERN = re.compile(r"^step_(\d+)(\.pt)?$")
SHARDED_META = "train_state.pt"  # the non-tensor part of a sharded checkpoint; marks the folder as one


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """A ``step_XXXXXXX/`` folder written by ``utils.sharded_checkpoint``."""
    path = Path(path)
    return path.is_dir() and (path / SHARDED_META).is_file()


class UnsafeCheckpointError(UserError, pickle.UnpicklingError):
    """The file asks to build an object that is not on the allow-list."""


class CorruptFileError(UserError, ValueError):
    """A checkpoint / weights file is truncated or not in the format its name promises."""


class _NamespaceStandIn:
    """Receives the state of a pickled ``argparse.Namespace``."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state


class _OfficialConfigStandIn:
    """Receives the state of the official ``config_util.Config`` (its YAML lives in ``_data``)."""

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state


_ALLOWED_EXTRA_GLOBALS = [
    (_NamespaceStandIn, "argparse.Namespace"),
    (_OfficialConfigStandIn, "config_util.Config"),
    (_OfficialConfigStandIn, "utils.config_util.Config"),
]


def _plain(obj: Any) -> Any:
    """Replace stand-ins by plain dicts, recursively."""
    if isinstance(obj, _NamespaceStandIn):
        state = obj.__dict__.get("_state", {})
        return {k: _plain(v) for k, v in (state or {}).items()} if isinstance(state, dict) else _plain(state)
    if isinstance(obj, _OfficialConfigStandIn):
        state = obj.__dict__.get("_state", {})
        if isinstance(state, dict) and "_data" in state:
            return _plain(state["_data"])
        return _plain(state)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    return obj


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``; official config/args pickles become plain dicts.

    A file that needs any other Python object is refused with :class:`UnsafeCheckpointError` naming
    the file and the blocked global; a truncated or corrupt file raises :class:`CorruptFileError`
    naming the file.
    """
    try:
        return _torch_load(path, map_location)
    except pickle.UnpicklingError as first_error:
        blocked = blocked_global(str(first_error))
        if blocked not in {name for _, name in _ALLOWED_EXTRA_GLOBALS}:
            raise _unsafe(path, blocked, first_error) from None
    try:
        with torch.serialization.safe_globals(_ALLOWED_EXTRA_GLOBALS):
            obj = _torch_load(path, map_location)
    except pickle.UnpicklingError as error:
        raise _unsafe(path, blocked_global(str(error)), error) from None
    return _plain(obj)


def _torch_load(path: str | os.PathLike, map_location: Any) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        if isinstance(error, FileNotFoundError):
            raise PathNotFoundError(path) from None
        raise CorruptFileError(
            f"{path} is truncated or not a PyTorch checkpoint ({type(error).__name__}: "
            f"{_summary(str(error))}); copy or download it again"
        ) from None


def _unsafe(path: str | os.PathLike, blocked: str | None, error: Exception) -> UnsafeCheckpointError:
    what = f"the Python global {blocked}" if blocked else f"a Python object ({_summary(str(error))})"
    return UnsafeCheckpointError(
        f"refusing to load {path}: it needs {what}, which is outside the tensor allow-list "
        "(loading it could execute arbitrary code); re-save the weights as tensors or safetensors"
    )


def blocked_global(message: str) -> str | None:
    """The ``module.name`` a weights-only unpickler refused, from torch's message (any wording seen)."""
    match = re.search(r"GLOBAL\s+([A-Za-z_][\w.]*)", message) or re.search(
        r"Unsupported global:\s*(?:GLOBAL\s+)?([A-Za-z_][\w.]*)", message)
    return match.group(1) if match else None


def _summary(message: str) -> str:
    """First sentence of an error message, without torch's advice about ``weights_only``."""
    lines = [line.strip() for line in message.splitlines() if line.strip() and "weights_only" not in line]
    first = lines[0] if lines else "unreadable"
    return first.split(". ")[0].rstrip(".")


def follow_pointer(path: str | os.PathLike) -> Path:
    """A ``checkpoints/latest`` pointer file → the checkpoint it names; any other path unchanged.

    Lets users pass ``RUN/checkpoints/latest`` wherever a checkpoint is expected. A checkpoints folder
    (one holding ``latest`` or ``step_*.pt`` files) resolves to its newest complete checkpoint.
    """
    path = Path(path).expanduser()
    if path.is_dir() and path.name == "checkpoints":
        newest = CheckpointManager(path).latest()
        if newest is None:
            raise UserError(f"{path} holds no checkpoint yet")
        return newest
    if path.name != POINTER_NAME or not path.is_file() or path.stat().st_size > 4096:
        return path
    name = path.read_text(encoding="utf-8", errors="replace").strip()
    if not _STEP_PATTERN.match(name):
        return path
    target = path.parent / name
    if target.is_file() or is_sharded_checkpoint(target):
        return target
    newest = CheckpointManager(path.parent).latest()
    if newest is None:
        raise PathNotFoundError(target, f"{path} names it but the folder holds no checkpoint")
    return newest


def load_state_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Read a ``.safetensors`` file (as a state dict) or a torch file through :func:`safe_torch_load`.

    ``checkpoints/latest`` pointers are followed (:func:`follow_pointer`).
    """
    path = follow_pointer(path)
    if not path.exists():
        raise PathNotFoundError(path)
    if is_sharded_checkpoint(path):
        raise UserError(f"{path} is a sharded checkpoint (an FSDP run's); turn it into one file with "
                        f"python -m autoregressive.export_checkpoint {path} OUT_DIR")
    if not path.is_file():
        raise UserError(f"{path} is a folder; pass a checkpoint file inside it")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        device = map_location if isinstance(map_location, str) else "cpu"
        try:
            return load_file(str(path), device=device)
        except (SafetensorError, OSError, ValueError) as error:
            raise CorruptFileError(
                f"{path} is truncated or not a safetensors file ({_summary(str(error))}); copy or download it again"
            ) from None
    return safe_torch_load(path, map_location=map_location)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


class CheckpointManager:
    """``DIR/step_XXXXXXX.pt`` files (or sharded ``step_XXXXXXX/`` folders) plus a ``latest`` pointer,
    written atomically, pruned to ``keep_last``.

    ``latest`` is a small text file naming the newest complete checkpoint; it is updated only after
    the checkpoint itself has been renamed into place, so a run killed at any moment leaves either the
    previous or the new checkpoint as ``latest``, never a torn one.
    """

    def __init__(self, directory: str | os.PathLike, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError("keep_last must be at least 1")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.directory / f"step_{step:07d}.pt"

    def sharded_path_for(self, step: int) -> Path:
        return self.directory / f"step_{step:07d}"

    def temporary_folder_for(self, step: int) -> Path:
        """Where a sharded checkpoint is written before :meth:`commit` renames it (swept when stale)."""
        return self.directory / f".step_{step:07d}.tmp"

    def commit(self, temporary: Path, step: int) -> Path:
        """Rename a complete temporary sharded checkpoint into place, then update ``latest`` and prune."""
        path = self.sharded_path_for(step)
        if path.exists():  # the same step written again by a resumed launch: replace it whole
            shutil.rmtree(path)
        os.replace(temporary, path)
        atomic_write_text(self.directory / POINTER_NAME, path.name + "\n")
        self._prune()
        return path

    def save(self, state: dict, step: int) -> Path:
        path = self.path_for(step)
        atomic_save(state, path)
        atomic_write_text(self.directory / POINTER_NAME, path.name + "\n")
        self._prune()
        return path

    def latest(self) -> Path | None:
        """The newest complete checkpoint, None when there is none.

        Every ``step_*.pt`` and ``step_*/`` is complete (each appears only by a rename), so the highest step
        wins even when ``latest`` lags behind it (a kill between the rename and the pointer update)
        or is missing.
        """
        steps = self.all_steps()
        return steps[-1] if steps else None

    def all_steps(self) -> list[Path]:
        """Complete checkpoints, oldest first (by step number, not by name)."""
        found = [(int(m.group(1)), p) for p in self.directory.glob("step_*")
                 if (m := _STEP_PATTERN.match(p.name)) and (p.is_file() if m.group(2) else is_sharded_checkpoint(p))]
        return [p for _, p in sorted(found)]

    def sweep(self) -> list[Path]:
        """Delete temporaries of killed checkpoint writes. Call on rank 0 before training starts."""
        removed = sweep_temporaries(self.directory, ["step_*.pt", POINTER_NAME])
        for stale in self.directory.glob(".step_*.tmp"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
        return removed

    def _prune(self) -> None:
        for old in self.all_steps()[: -self.keep_last]:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)

    def load(self, path: str | os.PathLike | None = None, map_location: Any = "cpu") -> dict | None:
        """Load a single-file ``path`` (or ``latest`` when None); None when no checkpoint exists yet."""
        target = follow_pointer(path) if path is not None else self.latest()
        if target is None:
            return None
        return safe_torch_load(target, map_location=map_location)


class StateDictMismatchError(UserError, KeyError):
    """Missing, unexpected, non-tensor or wrongly shaped checkpoint entries; the message names each one."""

    def __str__(self) -> str:  # KeyError would print the repr, quoting the message and escaping newlines
        return str(self.args[0])


def names_list(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown if len(keys) <= limit else f"{shown}, ... and {len(keys) - limit} more"


def check_state_dict(
    state_dict: dict[str, Any],
    expected: dict[str, Any],
    what: str,
    optional: set[str] | frozenset[str] = frozenset(),
    require_float: bool = False,
) -> None:
    """Strict comparison of a checkpoint with a model's ``state_dict()`` (values: tensors or shapes).

    Raises :class:`StateDictMismatchError` naming every missing key (except ``optional`` ones), every
    unexpected key, every entry that is not a (floating-point, if asked) tensor and every shape mismatch.
    """

    def shape(value: Any) -> tuple[int, ...]:
        return tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)

    missing = sorted(set(expected) - set(state_dict) - set(optional))
    unexpected = sorted(set(state_dict) - set(expected))
    bad = sorted(
        k for k, v in state_dict.items()
        if not isinstance(v, torch.Tensor) or (require_float and not v.is_floating_point())
    )
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {shape(expected[k])}"
        for k, v in state_dict.items()
        if k in expected and k not in bad and tuple(v.shape) != shape(expected[k])
    )
    problems = [
        f"{label}: {names_list(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("non-float entries" if require_float else "non-tensor entries", bad),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        raise StateDictMismatchError(f"{what} does not match the model:\n  " + "\n  ".join(problems))
