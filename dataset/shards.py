"""Webdataset-style tar shards as an image source, with map-style (indexed) access.

Format (the one the official D-AR code trains from)
    A shard is an uncompressed ``.tar``. Its members are grouped into samples by key: the member path
    up to the first ``.`` of its file name (``n01/000123.jpg`` and ``n01/000123.cls`` are the sample
    ``n01/000123``). A sample holds one image (``.jpg``, ``.jpeg``, ``.png``, ``.webp``, also ``.bmp``,
    ``.tif``, ``.tiff``), optionally ``.cls`` (the class index as ASCII digits) and anything else
    (``.json`` ...), which is ignored. Members without an image, directories and hidden files
    (``._x.jpg`` from macOS tar) are ignored. Sample order: the shards in path order, then each shard's
    samples in tar order (the order of their first member).
    A data path is a single ``.tar``, a folder holding ``.tar`` files (its top level only), or a brace
    pattern such as ``/data/imagenet-train-{000000..001281}.tar`` (ranges keep the zero padding of
    their first bound; ``{a,b}`` lists work too), every shard of which must exist.

Index
    Map-style access (``ResumableDistributedSampler`` indexes samples) needs to know where each sample
    lives: the index holds, per sample, its shard, the byte offset and size of its image member and its
    label, read from the tar headers alone (``TarInfo.offset_data``/``size``; only ``.cls`` payloads are
    read). A sample is then one seek + read of that byte range, decoded by ``dataset.images.decode_rgb``,
    so bad members are skipped and counted exactly like bad files in a folder.
    The index is cached as ``.dar-shard-index-<hash of the shard paths>.npz`` (plain arrays, loaded
    without pickle) in ``index_dir``, else ``$DAR_SHARD_INDEX_DIR``, else the folder of the first shard
    when it is writable, else ``~/.cache/dar/shard_index``. It records every shard's size and mtime and
    is rebuilt when one differs. Writing a new index removes the folder's indexes that can never be used
    again: an older index format, or shards of which one is gone or has changed since. Under ``torchrun``
    the process with ``LOCAL_RANK`` 0 on each node builds (or checks) it and writes it atomically while
    the other ranks wait at a barrier, then read it (``dataset.node_cache``, which image folders share:
    their file listing is cached the same way, see ``dataset.images``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from dataset.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTENSIONS,
    DecodedImageDataset,
    ImageFolderDataset,
    Transform,
    _is_image_name,
)
from dataset.node_cache import CACHE_ENV, built_by_local_rank0, cache_file_path, remove_stale_files, write_or_warn
from utils.distributed import barrier
from utils.errors import PathNotFoundError, UserError
from utils.fileio import atomic_write

logger = logging.getLogger(__name__)

INDEX_ENV = CACHE_ENV
INDEX_VERSION = 1
_IMAGE_EXTS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
# Indexing is mostly waiting on header reads (network file systems): a few threads overlap them.
_INDEX_THREADS = 8
_ACCEPTED = ("pass a folder of images, a .tar shard, a folder of .tar shards "
             "or a pattern like shards-{000000..000099}.tar")


class ShardError(UserError, ValueError):
    """A tar-shard data path that cannot be read as a data set (the message names the path)."""


# --------------------------------------------------------------------------------------------
# Paths


def expand_braces(pattern: str) -> list[str]:
    """``a-{00..02}.tar`` -> ``a-00.tar a-01.tar a-02.tar``; ``{x,y}`` lists; several braces multiply."""
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    bounds = _RANGE.match(body)
    if bounds:
        first, last = bounds.group(1), bounds.group(2)
        width = len(first.lstrip("-"))
        step = 1 if int(last) >= int(first) else -1
        choices = [f"{i:0{width}d}" for i in range(int(first), int(last) + step, step)]
    else:
        choices = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [head + choice + rest for choice in choices for rest in expand_braces(tail)]


def is_pattern(path: str | os.PathLike) -> bool:
    return _BRACE.search(str(path)) is not None


def _is_tar_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(".tar")


def list_tar_shards(folder: Path) -> list[Path]:
    """The ``.tar`` files directly inside ``folder``, sorted by name."""
    return sorted(folder / e.name for e in os.scandir(folder) if _is_tar_name(e.name) and e.is_file())


def is_shard_path(path: str | os.PathLike) -> bool:
    """True when ``path`` names tar shards (a pattern, a file, a folder with .tar files in it)."""
    if is_pattern(path):
        return True
    p = Path(path).expanduser()
    if p.is_file():
        return True
    return p.is_dir() and bool(list_tar_shards(p))


def resolve_shards(path: str | os.PathLike) -> list[Path]:
    """The shard files a data path names; a missing shard or a folder without any is a ``UserError``."""
    text = str(path)
    if is_pattern(text):
        names = expand_braces(os.path.expanduser(text))
        missing = [n for n in names if not Path(n).is_file()]
        if len(missing) == len(names):
            raise ShardError(f"{text} matches no file (expanded to {len(names)} names, first {names[0]}); "
                             "check the folder and the numbers in the braces")
        if missing:
            raise ShardError(f"{text}: {len(missing)} of its {len(names)} shards do not exist (first {missing[0]}); "
                             "fix the pattern's range or restore the shards")
        return [Path(n) for n in names]
    p = Path(text).expanduser()
    if not p.exists():
        raise PathNotFoundError(text, _ACCEPTED)
    if p.is_file():
        return [p]
    shards = list_tar_shards(p)
    if not shards:
        raise ShardError(f"{text} holds no .tar files; {_ACCEPTED}")
    return shards


def require_data_path(path: str | os.PathLike, flag: str = "--data-path") -> str | os.PathLike:
    """``utils.errors.require_path`` for data paths: a brace pattern must name existing shards instead."""
    if is_pattern(path):
        resolve_shards(path)
    elif not Path(path).expanduser().exists():
        raise PathNotFoundError(f"{flag}: {path}" if flag else path, _ACCEPTED)
    return path


# --------------------------------------------------------------------------------------------
# Index


@dataclass(frozen=True)
class TarMember:
    """One image member of a shard: read by a seek + read of its byte range."""

    shard: str
    name: str
    offset: int
    size: int

    def read_bytes(self) -> bytes:
        with open(self.shard, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.size - len(data)} of {self.size} bytes missing (the shard ends early)")
        return data

    def __str__(self) -> str:
        return f"{self.shard}:{self.name}"


def _split_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member path as webdataset groups them, or None for hidden / dotless names."""
    folder, _, base = name.rpartition("/")
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _parse_label(data: bytes, where: str) -> int:
    try:
        label = int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ShardError(f"{where} is not a class index ({data[:20]!r}); a .cls member holds ASCII digits "
                         "such as 207") from None
    if label < 0:
        raise ShardError(f"{where} holds the negative class index {label}; class indices start at 0")
    return label


def _index_shard(shard: Path) -> list[tuple[str, int, int, int]]:
    """(image member name, data offset, size, label or -1) per sample of one shard, in tar order."""
    images: dict[str, tuple[str, int, int]] = {}
    labels: dict[str, int] = {}
    num_files = 0
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                num_files += 1
                split = _split_key(info.name)
                if split is None:
                    continue
                key, ext = split
                if ext in _IMAGE_EXTS:
                    if key in images:
                        raise ShardError(f"{shard}: sample {key} has two images ({images[key][0]}, {info.name}); "
                                         "keep one image per key")
                    images[key] = (info.name, info.offset_data, info.size)
                elif ext == "cls":
                    member = tar.extractfile(info)
                    labels[key] = _parse_label(member.read() if member else b"", f"{shard}:{info.name}")
    except tarfile.ReadError as error:
        if num_files and "unexpected end of data" in str(error):
            # A shard cut short (an interrupted copy): what its headers list stays, and the cut member
            # is skipped and counted as truncated when read, like a truncated file in a folder.
            logger.warning("%s ends inside its data (%s); a member cut short will be skipped as truncated",
                           shard, error)
        elif num_files:
            raise ShardError(f"{shard} is corrupt after its first {num_files} files ({error}); re-create it") from None
        else:
            raise ShardError(f"{shard} is not an uncompressed tar file ({error}); {_ACCEPTED} "
                             "(pack shards with tar cf, without compression)") from None
    except OSError as error:
        raise ShardError(f"{shard} cannot be read ({error})") from None
    if num_files == 0:
        raise ShardError(f"{shard} is an empty tar (no files); remove it from the data path")
    if not images:
        raise ShardError(f"{shard} holds no images ({', '.join(sorted(_IMAGE_EXTS))}); each sample needs "
                         "KEY.jpg (and KEY.cls for its label)")
    return [(name, offset, size, labels.get(key, -1)) for key, (name, offset, size) in images.items()]


def _shard_stats(shards: Sequence[Path]) -> list[list[Any]]:
    out = []
    for shard in shards:
        stat = shard.stat()
        out.append([str(shard.resolve()), stat.st_size, stat.st_mtime_ns])
    return out


@dataclass
class ShardIndex:
    """Per-sample arrays over a list of shards (``shard`` indexes ``shards``); ``label`` -1 = no .cls."""

    shards: list[str]
    shard: np.ndarray  # int32
    offset: np.ndarray  # int64
    size: np.ndarray  # int64
    label: np.ndarray  # int64
    name: np.ndarray  # bytes (UTF-8 member names)
    stats: list[list[Any]]  # [path, size, mtime_ns] per shard: what the index was built from

    @classmethod
    def build(cls, stats: list[list[Any]]) -> ShardIndex:
        paths = [Path(p) for p, _, _ in stats]
        with ThreadPoolExecutor(max_workers=min(_INDEX_THREADS, len(paths))) as pool:
            per_shard = list(pool.map(_index_shard, paths))
        rows = [(k, *row) for k, samples in enumerate(per_shard) for row in samples]
        names = [r[1].encode("utf-8", "surrogateescape") for r in rows]
        return cls(
            shards=[p for p, _, _ in stats],
            shard=np.array([r[0] for r in rows], dtype=np.int32),
            offset=np.array([r[2] for r in rows], dtype=np.int64),
            size=np.array([r[3] for r in rows], dtype=np.int64),
            label=np.array([r[4] for r in rows], dtype=np.int64),
            name=np.array(names, dtype=bytes),
            stats=stats,
        )

    def save(self, path: Path) -> None:
        meta = json.dumps({"version": INDEX_VERSION, "shards": self.stats})

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
                np.savez(f, meta=np.array(meta), shard=self.shard, offset=self.offset, size=self.size,
                         label=self.label, name=self.name)

        atomic_write(path, write)

    @classmethod
    def load(cls, path: Path, stats: list[list[Any]]) -> ShardIndex | None:
        """The cached index if it was built from exactly these shard files (paths, sizes, mtimes)."""
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta.get("version") != INDEX_VERSION or meta.get("shards") != stats:
                    return None
                arrays = {k: data[k] for k in ("shard", "offset", "size", "label", "name")}
        except (OSError, ValueError, KeyError, EOFError) as error:
            logger.warning("shard index %s is unreadable (%s); rebuilding it", path, error)
            return None
        return cls(shards=[p for p, _, _ in stats], stats=stats, **arrays)

    def __len__(self) -> int:
        return len(self.shard)

    def member(self, i: int) -> TarMember:
        return TarMember(self.shards[self.shard[i]], self.name[i].decode("utf-8", "surrogateescape"),
                         int(self.offset[i]), int(self.size[i]))


def index_cache_path(shards: Sequence[Path], index_dir: str | os.PathLike | None = None) -> Path:
    """Where the index of these shards is cached (see the module docstring for the order of choices)."""
    digest = hashlib.sha256("\n".join(str(s.resolve()) for s in shards).encode()).hexdigest()[:16]
    return cache_file_path(f".dar-shard-index-{digest}.npz", shards[0].resolve().parent, index_dir, "shard_index")


def _is_stale(path: Path) -> bool:
    """Whether the cached index ``path`` can never load again: another format, or a shard it was built from
    has another size or mtime, or is gone from a folder that is still there. (A shard whose whole folder
    is missing may sit on a file system this machine does not mount while another one shares the cache.)"""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError, EOFError):
        return False  # not ours to judge: whoever uses it next rebuilds it
    if not isinstance(meta, dict) or meta.get("version") != INDEX_VERSION:
        return True
    try:
        for shard, size, mtime_ns in meta["shards"]:
            shard = Path(shard)
            if not shard.parent.is_dir():
                return False
            if not shard.is_file():
                return True
            stat = shard.stat()
            if [stat.st_size, stat.st_mtime_ns] != [size, mtime_ns]:
                return True
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return False


def remove_stale_indexes(folder: Path, keep: Path) -> list[Path]:
    """Delete the shard indexes in ``folder`` (other than ``keep``) that can never load again; returns them.

    Without this, every change to a dataset's list of shards (one added, one moved) left its old index
    behind for good. Indexes of other shard lists that are still valid are kept: another run may use them.
    """
    return remove_stale_files(folder, ".dar-shard-index-*.npz", keep, _is_stale, "shard index")


def load_shard_index(shards: Sequence[Path], index_dir: str | os.PathLike | None = None) -> ShardIndex:
    """The index of ``shards``: built or checked by local rank 0, shared with the node's other ranks.

    Every rank must call it (it meets the others at a barrier when a process group exists).
    """
    stats = _shard_stats(shards)
    cache = index_cache_path(shards, index_dir)

    def build_and_save() -> ShardIndex:
        logger.info("indexing %d tar shard(s) into %s", len(shards), cache)
        index = ShardIndex.build(stats)
        if write_or_warn(cache, index.save, "shard index"):
            remove_stale_indexes(cache.parent, keep=cache)
        return index

    # The barrier is looked up here, so that tests can replace this module's ``barrier``.
    return built_by_local_rank0(lambda: ShardIndex.load(cache, stats), build_and_save,
                                build=lambda: ShardIndex.build(stats), sync=barrier)


# --------------------------------------------------------------------------------------------
# Dataset


class TarMembers(Sequence[TarMember]):
    """``dataset.files`` of a shard dataset: ``TarMember`` objects made on access from the index."""

    def __init__(self, index: ShardIndex) -> None:
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    @overload
    def __getitem__(self, i: int) -> TarMember: ...
    @overload
    def __getitem__(self, i: slice) -> list[TarMember]: ...
    def __getitem__(self, i: int | slice) -> TarMember | list[TarMember]:
        if isinstance(i, slice):
            return [self.index.member(j) for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} outside [0, {len(self)})")
        return self.index.member(i % len(self))

    def __iter__(self) -> Iterator[TarMember]:
        return (self.index.member(j) for j in range(len(self)))


class TarShardDataset(DecodedImageDataset):
    """Tar shards -> ``ImageItem``, the interface of ``ImageFolderDataset`` (same decoding, skipping,
    seeding and ``collate_skip_bad``).

    Labels: with ``with_labels`` and ``.cls`` members, ``labels`` holds them and ``classes`` is
    ``("0", ..., str(max label))``; every sample then needs one (a missing one would shift nothing
    but silently train on label 0). Without ``.cls`` members, or with ``with_labels=False``, every
    label is 0 and ``classes == ()``, as for a flat folder.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        transform: Transform,
        with_labels: bool = True,
        seed: int = 0,
        min_size: int = 0,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        index_dir: str | os.PathLike | None = None,
    ) -> None:
        self._set_options(transform, seed, min_size, max_image_pixels)
        self.root = str(path)
        self.shards = resolve_shards(path)
        self.index = load_shard_index(self.shards, index_dir)
        self.files = TarMembers(self.index)
        labels = self.index.label
        if with_labels and (labels >= 0).any():
            if (labels < 0).any():
                first = int(np.flatnonzero(labels < 0)[0])
                raise ShardError(f"{self.files[first]} has no .cls label while other samples have one; add the "
                                 "missing .cls members or read the shards without labels")
            self.labels = labels
            self.classes = tuple(str(i) for i in range(int(labels.max()) + 1))
        else:
            self.labels = np.zeros(len(labels), dtype=np.int64)
            self.classes = ()


def open_images(
    path: str | os.PathLike,
    transform: Transform,
    with_labels: bool = True,
    seed: int = 0,
    min_size: int = 0,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    index_dir: str | os.PathLike | None = None,
    flag: str = "--data-path",
) -> DecodedImageDataset:
    """An image folder or tar shards, whichever ``path`` names; every mistake is a ``UserError``.

    Tar shards: a pattern with braces, a file, or a folder with ``.tar`` files at its top level (a
    folder with both those and images is refused as ambiguous). Anything else is an image folder.
    """
    if not is_pattern(path):
        p = Path(path).expanduser()
        if not p.exists():
            raise PathNotFoundError(f"{flag}: {path}" if flag else path, _ACCEPTED)
        if p.is_dir() and list_tar_shards(p) and any(_is_image_name(e) for e in os.listdir(p)):
            raise ShardError(f"{flag} {path} holds both .tar shards and images; move one of them elsewhere")
    if is_shard_path(path):
        return TarShardDataset(path, transform, with_labels, seed, min_size, max_image_pixels, index_dir)
    return ImageFolderDataset(path, transform, with_labels, seed, min_size, max_image_pixels, index_dir=index_dir)

