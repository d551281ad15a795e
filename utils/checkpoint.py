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
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file asks to build an object that is not on the allow-list."""


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
    """``torch.load`` with ``weights_only=True``; official config/args pickles become plain dicts."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as first_error:
        message = str(first_error)
        if not any(name in message for _, name in _ALLOWED_EXTRA_GLOBALS):
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it needs a Python object outside the tensor allow-list "
                f"(loading it would execute arbitrary code). Details: {_first_line(message)}"
            ) from None
    try:
        with torch.serialization.safe_globals(_ALLOWED_EXTRA_GLOBALS):
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(f"refusing to load {path}: {_first_line(str(error))}") from None
    return _plain(obj)


def _first_line(message: str) -> str:
    match = re.search(r"(Unsupported global:[^\n]*|Unsupported operand[^\n]*)", message)
    return match.group(1) if match else message.strip().splitlines()[0]


def load_state_file(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Read a ``.safetensors`` file (as a state dict) or a torch file through :func:`safe_torch_load`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        device = map_location if isinstance(map_location, str) else "cpu"
        return load_file(str(path), device=device)
    return safe_torch_load(path, map_location=map_location)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


class CheckpointManager:
    """``DIR/step_XXXXXXX.pt`` files plus a ``latest`` pointer, written atomically, pruned to ``keep_last``.

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

    def save(self, state: dict, step: int) -> Path:
        path = self.path_for(step)
        atomic_save(state, path)
        atomic_write_text(self.directory / "latest", path.name + "\n")
        self._prune()
        return path

    def latest(self) -> Path | None:
        pointer = self.directory / "latest"
        if not pointer.is_file():
            return None
        name = pointer.read_text(encoding="utf-8").strip()
        path = self.directory / name
        if not path.is_file():
            raise FileNotFoundError(f"{pointer} names {name}, which does not exist")
        return path

    def all_steps(self) -> list[Path]:
        return sorted(self.directory.glob("step_*.pt"))

    def _prune(self) -> None:
        for old in self.all_steps()[: -self.keep_last]:
            old.unlink(missing_ok=True)

    def load(self, path: str | os.PathLike | None = None, map_location: Any = "cpu") -> dict | None:
        """Load ``path`` (or ``latest`` when None); None when no checkpoint exists yet."""
        target = Path(path) if path is not None else self.latest()
        if target is None:
            return None
        return safe_torch_load(target, map_location=map_location)


class StateDictMismatchError(KeyError):
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
