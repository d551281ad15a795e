"""Checkpoint files a user hands us: pointers followed, broken and unsafe files named, nothing left behind."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import pytest
import torch

from tests.cli_testing import assert_user_error, run_module_cli
from utils.checkpoint import (CheckpointManager, CorruptFileError, UnsafeCheckpointError, blocked_global,
                              follow_pointer, load_state_file)
from utils.fileio import atomic_write_text


class Payload:
    """Unpickling this would run ``os.getcwd`` (a harmless stand-in for arbitrary code)."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_unsafe_pickle_names_the_file_and_the_blocked_global_without_torchs_advice(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(UnsafeCheckpointError) as error:
        load_state_file(path)
    message = str(error.value)
    assert str(path) in message and "posix.getcwd" in message
    assert "weights_only" not in message and "\n" not in message


def test_blocked_global_reads_every_wording_seen() -> None:
    assert blocked_global("Trying to load unsupported GLOBAL posix.system whose module posix is blocked.") == "posix.system"
    assert blocked_global("Unsupported global: GLOBAL argparse.Namespace was not an allowed global") == "argparse.Namespace"
    assert blocked_global("something else entirely") is None


def test_the_official_args_namespace_still_loads(tmp_path: Path) -> None:
    path = tmp_path / "official.pt"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-4)}, path)
    loaded = load_state_file(path)
    assert loaded["args"] == {"lr": 1e-4} and torch.equal(loaded["model"]["w"], torch.ones(2))


def test_truncated_files_name_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(100)}, good)
    torn = tmp_path / "torn.pt"
    torn.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CorruptFileError, match=r"torn\.pt is truncated or not a PyTorch checkpoint"):
        load_state_file(torn)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CorruptFileError, match=r"bad\.safetensors is truncated or not a safetensors file"):
        load_state_file(bad)


def test_a_corrupt_checkpoint_at_the_cli_is_one_line(tmp_path: Path) -> None:
    torn = tmp_path / "torn.pt"
    torn.write_bytes(b"PK\x03\x04 torn")
    result = run_module_cli("autoregressive.sample", "--gpt-ckpt", torn, "--gpt-preset", "tiny",
                            "--tokenizer-ckpt", torn, "--labels", "0", "--out", tmp_path / "g.png", "--device", "cpu")
    assert_user_error(result, "torn.pt", "truncated")


def test_latest_is_the_highest_complete_step_with_or_without_the_pointer(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=5)
    assert manager.latest() is None
    manager.save({"step": 9}, 9)
    manager.save({"step": 10}, 10)
    assert manager.latest().name == "step_0000010.pt"
    (tmp_path / "latest").unlink()  # killed between the rename and the pointer update
    assert manager.latest().name == "step_0000010.pt"
    atomic_write_text(tmp_path / "latest", "step_0000009.pt\n")  # a pointer lagging one step behind
    assert manager.latest().name == "step_0000010.pt"
    assert follow_pointer(tmp_path / "latest").name == "step_0000009.pt"  # an explicit pointer is honoured


def test_a_checkpoints_folder_and_a_dangling_pointer_resolve(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    manager = CheckpointManager(folder)
    manager.save({"step": 3}, 3)
    assert follow_pointer(folder).name == "step_0000003.pt"
    atomic_write_text(folder / "latest", "step_0000004.pt\n")  # names a pruned or lost file
    assert follow_pointer(folder / "latest").name == "step_0000003.pt"
    assert load_state_file(folder / "latest") == {"step": 3}


def test_sweep_removes_only_stale_checkpoint_temporaries(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save({"step": 1}, 1)
    stale = [tmp_path / ".step_0000002.pt.abcd1234.tmp", tmp_path / ".latest.x1y2z3.tmp"]
    for path in stale:
        path.write_bytes(b"partial")
    other = tmp_path / "notes.txt"
    other.write_text("keep")
    assert sorted(manager.sweep()) == sorted(stale)
    assert not any(p.exists() for p in stale) and other.exists() and manager.latest().name == "step_0000001.pt"


def test_atomic_writes_honour_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        CheckpointManager(tmp_path).save({"w": torch.zeros(1)}, 1)
        atomic_write_text(tmp_path / "note.json", "{}")
    finally:
        os.umask(old)
    for name in ("step_0000001.pt", "latest", "note.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
