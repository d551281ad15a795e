"""Atomic file writes that honour the user's umask, and sweeping what killed writes left behind.

Every file the project writes for later reading (checkpoints, configs, manifests, ``.npz`` outputs)
goes through :func:`atomic_write`: the bytes go to a hidden temporary file in the target folder
(``.NAME.XXXXXXXX.tmp``), are fsynced and renamed onto ``NAME``, so a reader never sees a partial file.
``tempfile.mkstemp`` creates its file with mode 0600; the finished file gets the mode a plain
``open()`` would have given it (0666 minus the umask) so colleagues on shared storage can read it.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it and put it back
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The permission bits ``open(path, "w")`` would give a new file under the current umask."""
    return 0o666 & ~_umask()


def temp_prefix(name: str) -> str:
    return f".{name}."


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def sweep_temporaries(folder: str | os.PathLike, names: Iterable[str] | None = None,
                      older_than_s: float = 0.0) -> list[Path]:
    """Delete the temporaries :func:`atomic_write` leaves in ``folder`` when a process is killed.

    ``names`` limits the sweep to temporaries of those target names (glob patterns such as
    ``step_*.pt``); None sweeps every ``.*.tmp``. Only call it where no other live process of the same
    run can be writing (rank 0 at start-up, before the first barrier), or pass ``older_than_s``.
    Returns the deleted paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    patterns = [f"{temp_prefix(n)}*{TEMP_SUFFIX}" for n in names] if names is not None else [f".*{TEMP_SUFFIX}"]
    now = time.time()
    removed = []
    for pattern in patterns:
        for stale in folder.glob(pattern):
            try:
                if older_than_s and now - stale.stat().st_mtime < older_than_s:
                    continue
                stale.unlink()
                removed.append(stale)
            except FileNotFoundError:  # another rank swept it first
                continue
    return removed
