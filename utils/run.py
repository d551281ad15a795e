"""Run folders, metrics logging and RNG-state capture shared by every trainer.

A run folder holds everything of one run: ``config.yaml`` (fully resolved), ``metrics.jsonl`` (one
JSON object per logged step), ``checkpoints/`` and ``samples/``. Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import math
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.config import save_yaml


_FORMAT = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")


def create_logger(name: str, folder: str | os.PathLike | None, is_main: bool,
                  defer_file: bool = False) -> logging.Logger:
    """Rank 0 logs to stderr and ``folder/log.txt``; other ranks stay silent (warnings still shown).

    ``defer_file``: no folder exists yet (inputs are still being checked); lines are held in memory
    and written to ``log.txt`` by :func:`start_log_file` once the run folder is created.
    """
    logger = logging.getLogger(name)
    # A second run in the same process (trainers run back to back from a notebook or a test)
    # replaces the previous run's handlers; closing them releases that run's log.txt.
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.propagate = False
    if is_main:
        logger.setLevel(logging.INFO)
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(_FORMAT)
        logger.addHandler(stream)
        if folder is not None:
            logger.addHandler(_file_handler(folder))
        elif defer_file:
            logger.addHandler(logging.handlers.MemoryHandler(capacity=100_000, flushLevel=logging.CRITICAL + 1))
    else:
        logger.setLevel(logging.WARNING)
        logger.addHandler(logging.NullHandler())
    return logger


def _file_handler(folder: str | os.PathLike) -> logging.FileHandler:
    Path(folder).mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(Path(folder) / "log.txt")
    handler.setFormatter(_FORMAT)
    return handler


def start_log_file(logger: logging.Logger, folder: str | os.PathLike) -> None:
    """Write the lines held by ``create_logger(defer_file=True)`` and every later one to ``folder/log.txt``."""
    for handler in list(logger.handlers):
        if isinstance(handler, logging.handlers.MemoryHandler):
            file_handler = _file_handler(folder)
            handler.setTarget(file_handler)
            handler.flush()
            logger.removeHandler(handler)
            handler.close()
            logger.addHandler(file_handler)


class RunFolder:
    """Paths of one run plus its config and metrics writers."""

    def __init__(self, root: str | os.PathLike, is_main: bool = True, create: bool = True) -> None:
        self.root = Path(root)
        self.is_main = is_main
        self.checkpoints = self.root / "checkpoints"
        self.samples = self.root / "samples"
        self.metrics_path = self.root / "metrics.jsonl"
        if create:
            self.create()

    def create(self) -> None:
        """Make the folders (rank 0). Trainers call it only once every input has been checked."""
        if self.is_main:
            for folder in (self.root, self.checkpoints, self.samples):
                folder.mkdir(parents=True, exist_ok=True)

    def save_config(self, config: Any) -> None:
        if self.is_main:
            save_yaml(config, self.root / "config.yaml")

    def truncate_metrics(self, after_step: int) -> None:
        """Drop lines logged after ``after_step`` so the file reads as one clean run.

        Trainers call it on every start: with the resumed step, or with 0 on a fresh start (a run killed
        before its first checkpoint left lines that the new run would otherwise repeat).
        """
        if not self.is_main or not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a kill mid-write
            if int(record.get("step", 0)) <= after_step:
                kept.append(line)
        self.metrics_path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")

    def log_metrics(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def capture_rng_state() -> dict[str, Any]:
    """Every RNG a training step may touch on this rank."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_tensors(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_python_state(state["python"]))
    np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_tensors(state: tuple) -> dict[str, Any]:
    # Checkpoints are read with weights_only=True, which refuses numpy arrays: store the key as a tensor.
    kind, key, pos, has_gauss, cached = state
    return {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def _numpy_state_from_tensors(state: dict[str, Any]) -> tuple:
    key = state["key"].numpy().astype(np.uint32)
    return (state["kind"], key, state["pos"], state["has_gauss"], state["cached"])


def _as_python_state(state: Any) -> tuple:
    # A weights_only round trip turns the nested tuple into lists; random.setstate needs tuples.
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
