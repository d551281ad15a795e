"""Files about a data set that local rank 0 of each node builds once and the node's other ranks read.

Two users: the tar-shard index (``dataset.shards.load_shard_index``) and the image-folder listing
(``dataset.images.load_folder_listing``). Listing 1.28 M files or reading 1282 tar headers on a shared
file system is slow; eight ranks per node doing it at once is eight times slower.

Where a cache file lives, first choice first: the ``index_dir`` argument of the dataset, else
``$DAR_SHARD_INDEX_DIR`` (one variable for both kinds of file), else the folder beside the data (the
shards' folder, the image folder's parent) when it is writable, else ``~/.cache/dar/<kind>``
(``$XDG_CACHE_HOME`` replaces ``~/.cache``).

Protocol (``built_by_local_rank0``): the process with ``LOCAL_RANK`` 0 loads the cache or builds and
writes it (atomically) while the node's other ranks wait at a barrier; they then load it, and build it
themselves when it is missing or does not match (rank 0 could not write it, or failed), so nobody
hangs. A mistake found by rank 0 is raised there after the barrier has released the others, who meet
the same mistake when they build. Without a process group the barrier is a no-op.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from utils.distributed import barrier, local_rank

logger = logging.getLogger(__name__)

CACHE_ENV = "DAR_SHARD_INDEX_DIR"
T = TypeVar("T")


def cache_file_path(name: str, beside: Path, cache_dir: str | os.PathLike | None, home_folder: str) -> Path:
    """``name`` in the first usable cache folder (see the module docstring); ``beside``: the data's folder."""
    folder = cache_dir or os.environ.get(CACHE_ENV)
    if folder:
        return Path(folder).expanduser() / name
    if os.access(beside, os.W_OK):
        return beside / name
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "dar" / home_folder / name


def remove_stale_files(folder: Path, pattern: str, keep: Path, is_stale: Callable[[Path], bool],
                       what: str) -> list[Path]:
    """Delete the files matching ``pattern`` in ``folder`` (other than ``keep``) that ``is_stale`` condemns."""
    removed = []
    for path in sorted(folder.glob(pattern)):
        if path == keep or not is_stale(path):
            continue
        try:
            path.unlink()
        except OSError:  # already gone (another node), or not ours to delete
            continue
        removed.append(path)
    if removed:
        logger.info("removed %d stale %s(s) from %s", len(removed), what, folder)
    return removed


def write_or_warn(path: Path, write: Callable[[Path], None], what: str) -> bool:
    """``write(path)``; an ``OSError`` (read-only, full disk) is a warning, since building again always works."""
    try:
        write(path)
    except OSError as error:
        logger.warning("cannot write the %s %s (%s); set %s to a writable folder to share it between ranks",
                       what, path, error, CACHE_ENV)
        return False
    return True


def built_by_local_rank0(
    load: Callable[[], T | None],
    build_and_save: Callable[[], T],
    load_after_barrier: Callable[[], T | None] | None = None,
    build: Callable[[], T] | None = None,
    sync: Callable[[], None] = barrier,
) -> T:
    """Local rank 0: ``load() or build_and_save()``, then the barrier. Other local ranks: the barrier, then
    ``load_after_barrier() or build()`` (defaults: ``load`` and ``build_and_save``).

    Every rank must call it (collective). ``sync`` is the barrier, a parameter so that callers' tests
    can watch it.
    """
    if local_rank() != 0:
        sync()
        return (load_after_barrier or load)() or (build or build_and_save)()
    error: BaseException | None = None
    result = None
    try:
        result = load()
        if result is None:
            result = build_and_save()
    except Exception as exc:  # re-raised below, once the other ranks are released from the barrier
        error = exc
    sync()
    if error is not None:
        raise error
    return result
