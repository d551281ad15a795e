"""Shared utilities: strict configs, safe loading, atomic checkpoints, hub resolution."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from utils.checkpoint import CheckpointManager, UnsafeCheckpointError, load_state_file, safe_torch_load
from utils.config import ConfigError, dataclass_from_dict, dataclass_to_dict, load_yaml, save_yaml
from utils.hub import WeightsNotFoundError, resolve_file


@dataclasses.dataclass(frozen=True)
class Inner:
    width: int = 4
    scale: float = 1.0


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"
    sizes: tuple[int, ...] = (1, 2)
    inner: Inner = Inner()
    maybe: int | None = None


def test_config_round_trip_and_strictness(tmp_path: Path) -> None:
    cfg = dataclass_from_dict(Outer, {"name": "y", "sizes": [3, 4, 5], "inner": {"width": 8, "scale": 2}})
    assert cfg == Outer(name="y", sizes=(3, 4, 5), inner=Inner(width=8, scale=2.0))
    save_yaml(cfg, tmp_path / "c.yaml")
    assert dataclass_from_dict(Outer, load_yaml(tmp_path / "c.yaml")) == cfg
    with pytest.raises(ConfigError, match="inner.depth"):
        dataclass_from_dict(Outer, {"inner": {"depth": 3}})
    with pytest.raises(ConfigError, match="expected an integer"):
        dataclass_from_dict(Outer, {"inner": {"width": "8"}})
    assert dataclass_to_dict(cfg)["sizes"] == [3, 4, 5]


class _Marker:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Marker(str(marker))}, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing"):
        safe_torch_load(path)
    assert not marker.exists()


def test_official_config_and_args_pickles_become_dicts(tmp_path: Path, monkeypatch) -> None:
    # Recreate the official layout: a config_util.Config holding the YAML in `_data`, plus an argparse
    # Namespace, then load it in a process where `config_util` does not exist.
    module = types.ModuleType("config_util")

    class Config:
        def __init__(self, data):
            self._data = data

    Config.__module__ = "config_util"
    Config.__qualname__ = "Config"
    module.Config = Config
    monkeypatch.setitem(sys.modules, "config_util", module)
    path = tmp_path / "official.pt"
    torch.save(
        {
            "model": {"w": torch.ones(2)},
            "config": Config({"model": {"encoder_dim": 64}}),
            "args": argparse.Namespace(lr=1e-4, steps=3),
        },
        path,
    )
    monkeypatch.delitem(sys.modules, "config_util")
    loaded = safe_torch_load(path)
    assert loaded["config"] == {"model": {"encoder_dim": 64}}
    assert loaded["args"] == {"lr": 1e-4, "steps": 3}
    assert torch.equal(loaded["model"]["w"], torch.ones(2))


def test_checkpoint_manager_atomic_latest_and_prune(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    assert manager.load() is None
    for step in (1, 2, 3):
        manager.save({"step": step, "w": torch.full((2,), float(step))}, step)
    assert [p.name for p in manager.all_steps()] == ["step_0000002.pt", "step_0000003.pt"]
    assert manager.load()["step"] == 3
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


def test_safetensors_load(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"a": torch.arange(3.0)}, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_state_file(tmp_path / "w.safetensors")["a"], torch.arange(3.0))


def test_resolve_file_local_and_offline_hub(tmp_path: Path, monkeypatch) -> None:
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    assert resolve_file(weights) == weights
    assert resolve_file(tmp_path, "w.pt") == weights
    with pytest.raises(WeightsNotFoundError):
        resolve_file(tmp_path, "missing.pt")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsNotFoundError, match="hf download"):
        resolve_file("showlab/D-AR", "D-AR-tokenizer_v1.pt")


def test_create_logger_replaces_and_closes_a_previous_runs_handlers(tmp_path: Path) -> None:
    """Two runs in one process (trainers run back to back from a notebook or a test): the second run's log
    goes to its own file only, and the first run's log.txt is closed."""
    from utils.run import create_logger

    first = create_logger("test_utils.two_runs", tmp_path / "a", is_main=True)
    first.info("one")
    old_file = next(h for h in first.handlers if isinstance(h, logging.FileHandler))
    second = create_logger("test_utils.two_runs", tmp_path / "b", is_main=True)
    second.info("two")
    assert second is first and old_file not in second.handlers and old_file.stream is None  # closed
    assert "one" in (tmp_path / "a" / "log.txt").read_text() and "two" not in (tmp_path / "a" / "log.txt").read_text()
    assert "two" in (tmp_path / "b" / "log.txt").read_text()
    second_file = next(h for h in second.handlers if isinstance(h, logging.FileHandler))
    third = create_logger("test_utils.two_runs", None, is_main=False)  # a non-main rank: no file of its own
    assert second_file.stream is None and not any(isinstance(h, logging.FileHandler) for h in third.handlers)
