"""Image folders in, ``[-1, 1]`` RGB tensors out: folder scanning, robust decoding, ADM crops.

(Tar shards of the same images are read by ``dataset.shards``; ``dataset.shards.open_images`` picks
the reader from the path.)

Layouts (``ImageFolderDataset``)
    * class folders (ImageNet style): ``root/<class>/**/<image>``; the label is the index of the
      class folder in sorted order, ``dataset.classes`` holds the names;
    * flat folders: images directly in ``root`` (and any sub-folders, recursively); label 0 and
      ``dataset.classes == ()``. ``with_labels=False`` forces this reading for any tree.
    Hidden files and folders (leading ``.``) are ignored; the file list is sorted by relative
    POSIX path, so every machine sees the same order. ``dataset.files`` is a ``FolderFiles`` (a
    read-only sequence of Paths kept as one byte blob) and ``dataset.labels`` an int64 array.

Listing (``load_folder_listing``, what ``ImageFolderDataset`` uses; ``scan_image_folder`` always lists)
    Under ``torchrun`` the process with ``LOCAL_RANK`` 0 lists the folder once per node and writes the
    listing atomically to ``.dar-folder-listing-<hash of the folder's real path and with_labels>.npz``
    (plain arrays, loaded without pickle) while the other ranks wait at a barrier, then read it; the
    cache folder is chosen as for the tar-shard index (``index_dir``, ``$DAR_SHARD_INDEX_DIR``, the
    image folder's parent when writable, ``~/.cache/dar/folder_listing``; see ``dataset.node_cache``).
    A single process uses it too: a second start reads instead of listing. A listing holds names only
    and is reused while the root and every folder the scan read (class folders and all their
    sub-folders) keep the mtime and change time recorded before each was read: adding, removing or
    renaming a file or folder moves its parent's mtime, a permission change its ctime, and the folder is
    listed again; editing a file in place does not,
    and need not. A folder modified within 2 s before the scan might change again unseen within the
    same mtime tick, so such a listing serves only the ranks of the run that made it. Writing a listing
    removes those in the same cache folder that can never load again.

Decoding policy (``decode_rgb``) — every returned image is 8-bit RGB, or the file is skipped:
    converted and counted
        ``grayscale``  L / 1 / LA / I / I;16* / F, replicated to three equal channels;
        ``palette``    P / PA, through the palette;
        ``cmyk``       CMYK (Pillow's conversion; Adobe-inverted JPEGs are handled by its decoder);
        ``rgba``       any alpha channel is composited onto white. ADM and torchvision drop alpha
                       instead, which exposes whatever colour the transparent pixels happen to
                       store (often black); white is what a viewer shows and what product photos
                       mean;
        ``16bit``      16 bits per channel are scaled by keeping the high byte (``v >> 8``, so
                       65535 → 255 and 257·g → g), the same rule Pillow's decoder applies to 16-bit
                       RGB(A) files; nothing is clipped;
        ``other_mode`` YCbCr / LAB / HSV / RGBX, through Pillow's conversion.
    skipped and counted (``__getitem__`` returns an item with ``image=None``)
        ``truncated``   truncated, corrupt or unreadable data (a decoder or I/O error);
        ``not_image``   Pillow cannot identify the file (text, empty file, wrong extension);
        ``too_small``   shorter side below ``min_size``. With ``min_size=0`` (the default) nothing is
                        skipped for size: the ADM crops upsample small images with BICUBIC, as the
                        official pipelines do;
        ``too_large``   more pixels than ``max_image_pixels`` (default ``DEFAULT_MAX_IMAGE_PIXELS``),
                        read from the header before any pixel is decoded, or Pillow's
                        decompression-bomb guard fired;
        ``unsupported`` a pixel format whose scale cannot be known (mode I outside 0..65535, F
                        outside [0, 1] and [0, 255]).
    EXIF orientation is not applied (neither ADM nor torchvision applies it).

Skipping keeps exact resume deterministic: a bad file yields a marker item in its sampler slot and
``collate_skip_bad`` drops it from the batch, so the sampler position alone says where an epoch is
and the batch simply comes out smaller (possibly empty: the trainer skips an empty batch). The
counts travel inside each batch (collation runs in the worker processes, whose own counters the
main process never sees); ``BadFileStats.all_reduce`` sums them over ranks at the end of an epoch.

Augmentations (ADM, ``guided_diffusion/image_datasets.py``; ten-crop as in LlamaGen's extractor)
draw only from a per-sample ``torch.Generator`` seeded by (seed, epoch, index), so results do not
depend on the worker count or on a restart.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import operator
import os
import struct
import time
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol, Union, overload

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from dataset.node_cache import CACHE_ENV, built_by_local_rank0, cache_file_path, remove_stale_files, write_or_warn
from dataset.seeding import randint, sample_generator
from utils.distributed import all_reduce_sum, barrier
from utils.errors import PathNotFoundError, UserError
from utils.fileio import atomic_write

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
CONVERSIONS = ("grayscale", "palette", "cmyk", "rgba", "16bit", "other_mode")
SKIP_REASONS = ("truncated", "not_image", "too_small", "too_large", "unsupported")
# Decoding costs ~16 bytes per pixel at its peak (a 10000x10000 PNG of 292 KB took 1.56 GB), per
# loader worker. Pillow only warns between 89M and 179M pixels and decodes anyway, so the limit sits
# well below its warning threshold: 64 MP still admits every camera photo short of medium format.
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000

# Transform contract: (decoded RGB image, this sample's generator) -> float tensor in [-1, 1], or
# with ``uint8=True`` the same pixels as uint8 0..255 (a quarter of the bytes to pin and copy to the
# GPU; ``to_model_range`` there gives exactly the float tensor).
Transform = Callable[[Image.Image, torch.Generator], torch.Tensor]

_GRAY_MODES = {"1", "L", "LA", "I", "F"}
_ALPHA_MODES = {"RGBA", "LA", "PA"}


# --------------------------------------------------------------------------------------------
# Folder scanning


class ImageFolderError(UserError, ValueError):
    """The image folder the user passed cannot be read as a data set (a file, an empty class folder)."""


class NoImagesError(UserError, FileNotFoundError):
    """The folder exists but holds no image file."""

    def __str__(self) -> str:  # FileNotFoundError would format (errno, strerror) otherwise
        return str(self.args[0])


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image_name(name: str) -> bool:
    return not _is_hidden(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(top: Path, stamps: list[list] | None = None, top_rel: str = ".") -> list[str]:
    """Sorted POSIX paths, relative to ``top``, of every image file under it (recursive, symlinks
    followed). With ``stamps``, appends ``[folder relative to the scanned root, mtime_ns, ctime_ns]`` for each
    sub-folder before it is read (``top`` itself is the caller's to stamp)."""
    found: list[str] = []
    for folder, dirs, files in os.walk(top, followlinks=True):
        dirs[:] = [d for d in dirs if not _is_hidden(d)]
        rel = Path(folder).relative_to(top)
        if stamps is not None:
            stamps.extend(_stamp(Path(folder) / d, (Path(top_rel) / rel / d).as_posix()) for d in dirs)
        found.extend((rel / name).as_posix() for name in files if _is_image_name(name))
    return sorted(found)


def _stamp(folder: Path, rel: str) -> list:
    try:
        stat = os.stat(folder)
    except OSError:  # gone or unreadable: -1 never matches, so the listing is never reused
        return [rel, -1, -1]
    # The change time too: it also moves when permissions change, e.g. when a folder that was unreadable
    # at the scan (os.walk skips it silently) becomes readable.
    return [rel, stat.st_mtime_ns, stat.st_ctime_ns]


def list_images(root: str | os.PathLike) -> list[Path]:
    """Every image file under ``root`` (recursive, symlinks followed), sorted by relative path."""
    root = Path(root)
    return [root / rel for rel in _walk_images(root)]


def scan_image_folder(
    root: str | os.PathLike, with_labels: bool = True
) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """(files, labels, class names) for a class-folder or flat tree; see the module docstring.

    Always lists the folder; ``load_folder_listing`` gives the same result from the node's cache."""
    root = Path(root)
    rels, labels, classes = _scan(root, with_labels)
    return [root / rel for rel in rels], labels, classes


def _scan(
    root: Path, with_labels: bool, stamps: list[list] | None = None
) -> tuple[list[str], list[int], tuple[str, ...]]:
    """``scan_image_folder`` with the files as POSIX paths relative to ``root``; with ``stamps``, records
    the mtime of every folder whose entries the result depends on, each read before the folder is listed
    (a file added after the listing then moves a recorded mtime)."""
    if not root.exists():
        raise PathNotFoundError(root, "pass the folder that holds the images")
    if not root.is_dir():
        raise ImageFolderError(f"{root} is a file; pass the folder that holds the images")
    if stamps is not None:
        stamps.append(_stamp(root, "."))
    entries = sorted(e for e in os.listdir(root) if not _is_hidden(e))
    has_direct_images = any(_is_image_name(e) and (root / e).is_file() for e in entries)
    class_dirs = [e for e in entries if (root / e).is_dir()]
    if with_labels and class_dirs and not has_direct_images:
        files: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(class_dirs):
            if stamps is not None:
                stamps.append(_stamp(root / name, name))
            class_files = _walk_images(root / name, stamps, name)
            if not class_files:
                raise ImageFolderError(
                    f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                    "remove it or pass with_labels=False, otherwise class indices would shift"
                )
            files.extend(f"{name}/{rel}" for rel in class_files)
            labels.extend([label] * len(class_files))
        return files, labels, tuple(class_dirs)
    files = _walk_images(root, stamps)
    if not files:
        raise NoImagesError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}; pass the folder that holds them")
    return files, [0] * len(files), ()


# --------------------------------------------------------------------------------------------
# The listing shared by the ranks of a node

LISTING_VERSION = 2
_LISTING_GLOB = ".dar-folder-listing-*.npz"
# A folder modified this close to the scan could change again within the same mtime tick (1-2 s on some
# file systems) without its recorded mtime moving. Such a listing serves the ranks of this run only.
_SETTLE_NS = 2_000_000_000


def _encode_names(rels: Iterable[str]) -> np.ndarray:
    """(bytes,) uint8: the relative paths, UTF-8 with "surrogateescape" (names that are not UTF-8 round-trip),
    NUL-separated: NUL is the one byte no file name holds, and a fixed-width unicode array would take 4 bytes
    per character of the longest path for every file."""
    rels = list(rels)
    if any(not rel or "\0" in rel for rel in rels):
        raise ValueError("a relative path is empty or holds NUL, which no file name can")
    return np.frombuffer("\0".join(rels).encode("utf-8", "surrogateescape"), dtype=np.uint8)


def _name_starts(names: np.ndarray) -> np.ndarray:
    """(N + 1,) int64 for a NUL-separated blob of N names: name ``i`` is ``names[starts[i] : starts[i + 1] - 1]``
    (the last one ends one past a NUL that is not there)."""
    if names.size == 0:
        return np.zeros(1, dtype=np.int64)
    separators = np.flatnonzero(names == 0)
    starts = np.empty(len(separators) + 2, dtype=np.int64)
    starts[0], starts[-1] = 0, names.size + 1
    starts[1:-1] = separators + 1
    return starts


class FolderFiles(Sequence[Path]):
    """``dataset.files`` of an image folder: read-only, each ``root / relative path`` made on access.

    Two numpy arrays instead of one ``Path`` per image: a list of 1.28 M Paths costs hundreds of MB in
    every process and seconds to build, and data-loader workers copy its pages one by one as they touch
    reference counts. Array buffers hold no reference counts, and pickle to workers as raw bytes that
    unpickle into two arrays, where a list of Paths unpickles into a million objects again.
    ``names`` is the NUL-separated blob of relative POSIX paths the folder listing stores (see
    ``_encode_names``); ``starts`` the (N + 1,) offsets of ``_name_starts``. Indexing is a list's: negative
    indices count from the end, a slice gives a list, an index out of range raises ``IndexError``.
    """

    def __init__(self, root: str | os.PathLike, names: np.ndarray, starts: np.ndarray | None = None) -> None:
        names = np.asarray(names)
        if names.dtype != np.uint8 or names.ndim != 1:
            raise ValueError(f"names must be a 1-D uint8 blob, got {names.dtype} of shape {names.shape}")
        starts = _name_starts(names) if starts is None else np.asarray(starts)
        end = names.size + 1 if len(starts) > 1 else 0
        if starts.dtype != np.int64 or starts.ndim != 1 or len(starts) == 0 or starts[0] != 0 or starts[-1] != end:
            raise ValueError(f"starts do not describe a blob of {names.size} bytes")
        self.root = Path(root)
        self.names = names
        self.starts = starts

    @classmethod
    def from_names(cls, root: str | os.PathLike, rels: Iterable[str]) -> FolderFiles:
        """From POSIX paths relative to ``root`` (e.g. ``"n01440764/a.JPEG"``)."""
        return cls(root, _encode_names(rels))

    def __len__(self) -> int:
        return len(self.starts) - 1

    def relative(self, i: int) -> str:
        """The POSIX path of file ``i`` (0 <= i < len) relative to ``root``."""
        raw = self.names[self.starts[i] : self.starts[i + 1] - 1].tobytes()
        return raw.decode("utf-8", "surrogateescape")

    @overload
    def __getitem__(self, i: int) -> Path: ...
    @overload
    def __getitem__(self, i: slice) -> list[Path]: ...
    def __getitem__(self, i: int | slice) -> Path | list[Path]:
        if isinstance(i, slice):
            return [self.root / self.relative(j) for j in range(*i.indices(len(self)))]
        i = operator.index(i)  # numpy and torch integers too, as a list takes them
        if not -len(self) <= i < len(self):
            raise IndexError(f"file {i} outside [0, {len(self)})")
        return self.root / self.relative(i % len(self))

    def __getstate__(self) -> dict:
        # The offsets are 8 bytes per file and cheap to find again: a worker gets the blob only.
        return {"root": self.root, "names": self.names}

    def __setstate__(self, state: dict) -> None:
        self.root, self.names = state["root"], state["names"]
        self.starts = _name_starts(self.names)

    def __iter__(self) -> Iterator[Path]:
        # One name at a time: a caller that stops early (e.g. after a few samples) decodes only those.
        return (self.root / self.relative(j) for j in range(len(self)))

    def __repr__(self) -> str:
        n = len(self)
        head = f"FolderFiles({str(self.root)!r}, {n} file{'' if n == 1 else 's'}"
        if n == 0:
            return head + ")"
        return head + f": {self.relative(0)!r}" + (f" .. {self.relative(n - 1)!r})" if n > 1 else ")")


@dataclass
class _Listing:
    names: np.ndarray  # (bytes,) uint8: POSIX paths relative to the root, in scan order (``_encode_names``)
    starts: np.ndarray  # (N + 1,) int64 offsets into ``names`` (``_name_starts``)
    labels: np.ndarray  # (N,) int64
    classes: tuple[str, ...]
    folders: list[list]  # [relative folder, mtime_ns, ctime_ns] per folder the scan read
    settled: bool  # every folder's mtime was older than the scan by _SETTLE_NS

    @classmethod
    def scan(cls, root: Path, with_labels: bool) -> _Listing:
        started = time.time_ns()
        folders: list[list] = []
        rels, labels, classes = _scan(root, with_labels, folders)
        settled = all(0 <= mtime < started - _SETTLE_NS for _, mtime, _ in folders)
        names = _encode_names(rels)
        return cls(names, _name_starts(names), np.asarray(labels, dtype=np.int64), classes, folders, settled)

    def files(self, root: Path) -> FolderFiles:
        return FolderFiles(root, self.names, self.starts)

    def rels(self) -> list[str]:
        return self.names.tobytes().decode("utf-8", "surrogateescape").split("\0") if self.names.size else []

    def save(self, path: Path, resolved_root: Path, with_labels: bool) -> None:
        meta = json.dumps({"version": LISTING_VERSION, "root": str(resolved_root), "with_labels": with_labels,
                           "classes": list(self.classes), "settled": self.settled, "folders": self.folders})

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: numpy would append ".npz" to a path
                np.savez_compressed(f, meta=np.frombuffer(meta.encode("ascii"), dtype=np.uint8),
                                    names=self.names, labels=self.labels)

        atomic_write(path, write)

    @classmethod
    def load(cls, path: Path, resolved_root: Path, with_labels: bool, settled_only: bool) -> _Listing | None:
        """The cached listing if it was made for this root and flag and no folder it read has changed."""
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = _listing_meta(data)
                if not (meta.get("version") == LISTING_VERSION and meta.get("root") == str(resolved_root)
                        and meta.get("with_labels") is with_labels and (meta.get("settled") or not settled_only)
                        and _folders_unchanged(resolved_root, meta["folders"])):
                    return None
                names, labels = data["names"], data["labels"]
            if names.dtype != np.uint8 or names.ndim != 1 or labels.dtype != np.int64 or labels.ndim != 1:
                raise ValueError(f"names {names.dtype} {names.shape}, labels {labels.dtype} {labels.shape}")
            starts = _name_starts(names)
            if len(starts) - 1 != len(labels):
                raise ValueError(f"{len(starts) - 1} names but {len(labels)} labels")
            return cls(names, starts, labels, tuple(meta["classes"]), meta["folders"], bool(meta["settled"]))
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            logger.warning("folder listing %s is unreadable (%s); listing the folder again", path, error)
            return None


def _listing_meta(data: np.lib.npyio.NpzFile) -> dict:
    meta = json.loads(bytes(data["meta"]).decode("ascii"))
    if not isinstance(meta, dict):
        raise ValueError("its metadata is not a JSON object")
    return meta


def _folders_unchanged(root: Path, folders: list[list]) -> bool:
    for rel, mtime, ctime in folders:
        try:
            stat = os.stat(root / rel)
            if (stat.st_mtime_ns, stat.st_ctime_ns) != (mtime, ctime):
                return False
        except OSError:
            return False
    return True


def listing_cache_path(root: str | os.PathLike, with_labels: bool = True,
                       index_dir: str | os.PathLike | None = None) -> Path:
    """Where the listing of ``root`` is cached: beside the folder (in its parent), or see ``dataset.node_cache``."""
    resolved = Path(os.path.realpath(root))
    key = f"{resolved}\n{bool(with_labels)}".encode("utf-8", "surrogateescape")
    name = f".dar-folder-listing-{hashlib.sha256(key).hexdigest()[:16]}.npz"
    return cache_file_path(name, resolved.parent, index_dir, "folder_listing")


def _listing_is_stale(path: Path) -> bool:
    """Whether the cached listing ``path`` can never load again: another format, its folder is gone from
    a parent that is still there, or a folder it read has changed. (A root whose parent is missing may sit
    on a file system this machine does not mount while another one shares the cache.)"""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = _listing_meta(data)
        if meta.get("version") != LISTING_VERSION:
            return True
        root = Path(meta["root"])
        if not root.parent.is_dir():
            return False
        return not root.is_dir() or not _folders_unchanged(root, meta["folders"])
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error):
        return False  # not ours to judge: whoever uses it next rebuilds it


def remove_stale_listings(folder: Path, keep: Path) -> list[Path]:
    """Delete the folder listings in ``folder`` (other than ``keep``) that can never load again."""
    return remove_stale_files(folder, _LISTING_GLOB, keep, _listing_is_stale, "folder listing")


def load_folder_listing(
    root: str | os.PathLike, with_labels: bool = True, index_dir: str | os.PathLike | None = None
) -> tuple[list[Path], list[int], tuple[str, ...]]:
    """``scan_image_folder(root, with_labels)``, listed once per node: local rank 0 scans (or finds a
    current listing in the cache) and writes it while the node's other ranks wait, then they read it.

    Every rank must call it (it meets the others at a barrier when a process group exists). A listing is
    current while the root, and every folder below it that the scan read, keep the mtime they had: adding,
    removing or renaming a file or folder changes its parent folder's mtime. Editing a file in place does
    not, and need not: the listing holds names only. Targets of symlinked files are not watched.
    ``ImageFolderDataset`` takes the same listing without making a Python object per file.
    """
    root = Path(root)
    listing = _node_listing(root, with_labels, index_dir)
    return [root / rel for rel in listing.rels()], listing.labels.tolist(), listing.classes


def _writes_into_the_listing(cache: Path, resolved_root: Path) -> bool:
    """Whether writing ``cache`` changes a folder the listing records: the root itself or a folder under it
    that the scan reads (hidden folders are not read)."""
    try:
        inside = Path(os.path.realpath(cache.parent)).relative_to(resolved_root)
    except ValueError:
        return False
    return not any(_is_hidden(part) for part in inside.parts)


def _node_listing(root: Path, with_labels: bool, index_dir: str | os.PathLike | None) -> _Listing:
    """``load_folder_listing``'s listing, names still in one blob."""
    with_labels = bool(with_labels)
    cache = listing_cache_path(root, with_labels, index_dir)
    resolved = Path(os.path.realpath(root))

    def build_and_save() -> _Listing:
        listing = _Listing.scan(root, with_labels)
        if _writes_into_the_listing(cache, resolved):
            logger.warning("not caching the listing of %s: its cache %s would be inside the listed folder and make "
                           "the listing stale as it is written; point index_dir / $%s elsewhere",
                           root, cache, CACHE_ENV)
            return listing
        logger.info("listed the image folder %s into %s", root, cache)
        if write_or_warn(cache, lambda path: listing.save(path, resolved, with_labels), "folder listing"):
            remove_stale_listings(cache.parent, keep=cache)
        return listing

    # A new run trusts only a settled listing; the ranks of this run take the one rank 0 just made.
    return built_by_local_rank0(
        lambda: _Listing.load(cache, resolved, with_labels, settled_only=True),
        build_and_save,
        load_after_barrier=lambda: _Listing.load(cache, resolved, with_labels, settled_only=False),
        build=lambda: _Listing.scan(root, with_labels),
        sync=barrier,  # looked up here, so that tests can replace this module's ``barrier``
    )


# --------------------------------------------------------------------------------------------
# Decoding


class SkipImage(Exception):
    """A file that cannot become a faithful RGB image; ``reason`` is one of ``SKIP_REASONS``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _is_16bit(image: Image.Image) -> bool:
    # Pillow stores 16-bit RGB(A) as 8-bit modes; only the decoder's raw mode (in the tile list,
    # which load() clears) still tells that the file had 16 bits per channel.
    if image.mode.startswith("I;16"):
        return True
    return any(";16" in str(tile.args) for tile in getattr(image, "tile", ()) or ())


def _gray_to_uint8(image: Image.Image) -> np.ndarray:
    """(H, W) uint8 from a single-channel image of any bit depth; raises SkipImage if ambiguous."""
    if image.mode in ("1", "L"):
        return np.asarray(image.convert("L"))
    values = np.asarray(image)
    if image.mode.startswith("I"):
        if values.min() < 0 or values.max() > 65535:
            raise SkipImage("unsupported", f"mode {image.mode} values outside 0..65535")
        return (values.astype(np.uint32) >> 8).astype(np.uint8)
    # Mode F: float images come as [0, 1] or [0, 255]; anything else has no known white point.
    values = values.astype(np.float64)
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 255:
        raise SkipImage("unsupported", "mode F values outside [0, 1] and [0, 255]")
    scale = 255.0 if values.max() <= 1.0 else 1.0
    return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)


def _composite_on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float32)[..., None] / 255.0
    out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _to_rgb(image: Image.Image, is_16bit: bool) -> tuple[np.ndarray, tuple[str, ...]]:
    """(H, W, 3) uint8 and the conversion tags applied, from a loaded image."""
    mode = image.mode
    notes: list[str] = ["16bit"] if is_16bit else []
    alpha: np.ndarray | None = None
    if mode in ("P", "PA"):
        notes.append("palette")
        image = image.convert("RGBA")
        mode = "RGBA"
    elif mode == "RGB" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in _ALPHA_MODES:
        alpha = np.asarray(image.getchannel("A"))
        if alpha.min() < 255:
            notes.append("rgba")
        else:
            alpha = None  # fully opaque: compositing would be a no-op
    if mode in _GRAY_MODES or mode.startswith("I;16"):
        notes.append("grayscale")
        gray = _gray_to_uint8(image.getchannel(0) if mode == "LA" else image)
        rgb = np.repeat(gray[..., None], 3, axis=-1)
    elif mode == "CMYK":
        notes.append("cmyk")
        rgb = np.asarray(image.convert("RGB"))
    elif mode in ("RGB", "RGBA"):
        rgb = np.asarray(image.convert("RGB") if mode == "RGBA" else image)
    else:
        notes.append("other_mode")
        rgb = np.asarray(image.convert("RGB"))
    if alpha is not None:
        rgb = _composite_on_white(rgb, alpha)
    return np.ascontiguousarray(rgb), tuple(notes)


class BytesSource(Protocol):
    """An image that is not a file of its own (a tar member): its encoded bytes on demand."""

    def read_bytes(self) -> bytes: ...


ImageSource = Union[str, os.PathLike, BytesSource]


def decode_rgb(
    path: ImageSource, min_size: int = 0, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[Image.Image, tuple[str, ...]]:
    """Open ``path`` as an 8-bit RGB image; return it with its conversion tags or raise SkipImage.

    ``path`` is a file or a ``BytesSource`` (``dataset.shards.TarMember``); a source whose bytes
    cannot be read is skipped as ``truncated``, like an unreadable file.
    ``max_pixels``: images with more pixels are skipped as ``too_large`` from their header alone
    (``Image.open`` reads only the header); None leaves only Pillow's own guard.
    """
    try:
        with warnings.catch_warnings():
            if max_pixels is not None:  # our own limit decides below; Pillow's warning would repeat it
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            source = path if isinstance(path, (str, os.PathLike)) else io.BytesIO(path.read_bytes())
            image = Image.open(source)
    except UnidentifiedImageError as err:
        # Pillow names a file object by its repr, which says nothing; the caller logs the member's name.
        detail = str(err) if isinstance(path, (str, os.PathLike)) else "cannot identify image data"
        raise SkipImage("not_image", detail) from err
    except Image.DecompressionBombError as err:
        raise SkipImage("too_large", str(err)) from err
    except OSError as err:
        raise SkipImage("truncated", f"unreadable: {err}") from err
    with image:
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise SkipImage("too_large", f"{width}x{height} = {width * height} pixels > max_image_pixels {max_pixels}")
        if min(image.size) < min_size:
            raise SkipImage("too_small", f"{image.size[0]}x{image.size[1]} < min_size {min_size}")
        is_16bit = _is_16bit(image)
        try:
            image.load()
        except Image.DecompressionBombError as err:
            raise SkipImage("too_large", str(err)) from err
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error) as err:
            # What Pillow's decoders raise on truncated or corrupt pixel data.
            raise SkipImage("truncated", f"{type(err).__name__}: {err}") from err
        rgb, notes = _to_rgb(image, is_16bit)
    return Image.fromarray(rgb), notes


# --------------------------------------------------------------------------------------------
# ADM crops


def _resize_short_side(pil_image: Image.Image, short_side: int) -> Image.Image:
    # ADM: halve with BOX while that stays >= 2x the target (cheap anti-aliasing), then one BICUBIC.
    while min(*pil_image.size) >= 2 * short_side:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = short_side / min(*pil_image.size)
    return pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM centre crop: short side resized to ``image_size``, then the central square (H, W, C)."""
    arr = np.asarray(_resize_short_side(pil_image, image_size))
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def random_crop_arr(
    pil_image: Image.Image,
    image_size: int,
    min_crop_frac: float = 0.8,
    max_crop_frac: float = 1.0,
    generator: torch.Generator | None = None,
) -> np.ndarray:
    """ADM random-resized crop: the crop covers ``min..max_crop_frac`` of the short side."""
    if not 0.0 < min_crop_frac <= max_crop_frac <= 1.0:
        raise ValueError(
            f"need 0 < min_crop_frac <= max_crop_frac <= 1, got {min_crop_frac}, {max_crop_frac}"
        )
    if generator is None:
        raise ValueError("random_crop_arr needs an explicit generator (see dataset.seeding)")
    low = math.ceil(image_size / max_crop_frac)
    high = math.ceil(image_size / min_crop_frac)
    arr = np.asarray(_resize_short_side(pil_image, randint(generator, low, high + 1)))
    top = randint(generator, 0, arr.shape[0] - image_size + 1)
    left = randint(generator, 0, arr.shape[1] - image_size + 1)
    return arr[top : top + image_size, left : left + image_size]


def ten_crop_arrs(pil_image: Image.Image, image_size: int, crop_ratio: float = 1.1) -> list[np.ndarray]:
    """The AR recipe's ten views: ADM centre crop to ``int(crop_ratio * image_size)`` (281 for 256),
    then the four corners and the centre at ``image_size``, followed by the same five of the
    mirrored image (torchvision ``ten_crop`` order)."""
    if crop_ratio < 1.0:
        raise ValueError(f"crop_ratio must be >= 1, got {crop_ratio}")
    base = center_crop_arr(pil_image, int(image_size * crop_ratio))
    return _five_crops(base, image_size) + _five_crops(base[:, ::-1], image_size)


def _five_crops(arr: np.ndarray, size: int) -> list[np.ndarray]:
    """Top-left, top-right, bottom-left, bottom-right and centre ``size`` squares of (H, W, C) ``arr``.

    The centre is placed as torchvision's ``center_crop`` places it (offsets rounded half to even).
    """
    height, width = arr.shape[:2]
    if size > min(height, width):
        raise ValueError(f"crop size {size} is larger than the image {height}x{width}")
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    views = [arr[:size, :size], arr[:size, width - size :], arr[height - size :, :size],
             arr[height - size :, width - size :], arr[top : top + size, left : left + size]]
    return [np.ascontiguousarray(view) for view in views]


def arr_to_tensor(arr: np.ndarray, uint8: bool = False) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [-1, 1], or (3, H, W) uint8 with ``uint8``."""
    if uint8:
        return torch.from_numpy(np.ascontiguousarray(np.asarray(arr, dtype=np.uint8).transpose(2, 0, 1)))
    scaled = np.asarray(arr, dtype=np.float32) / 127.5 - 1.0  # ADM's scaling, bit for bit
    return torch.from_numpy(np.ascontiguousarray(scaled.transpose(2, 0, 1)))


# ADM's scaling of every uint8 value, computed once by numpy exactly as ``arr_to_tensor`` computes it:
# a table lookup gives the same floats on any device, where a division on the GPU may not (CUDA
# divides by a scalar through its reciprocal).
_MODEL_RANGE = torch.from_numpy(np.arange(256, dtype=np.float32) / 127.5 - 1.0)
_MODEL_RANGE_ON: dict[torch.device, torch.Tensor] = {}


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (any shape, e.g. a batch on the GPU) -> float32 in [-1, 1], bit-identical to
    what the transform would have returned without ``uint8=True``."""
    if images.dtype != torch.uint8:
        raise ValueError(f"expected uint8 images, got {images.dtype}")
    table = _MODEL_RANGE_ON.get(images.device)
    if table is None:
        table = _MODEL_RANGE_ON[images.device] = _MODEL_RANGE.to(images.device)
    return table[images.long()]


def _maybe_flip(arr: np.ndarray, flip: bool, generator: torch.Generator) -> np.ndarray:
    if flip and torch.rand((), generator=generator).item() < 0.5:
        return arr[:, ::-1]
    return arr


@dataclass(frozen=True)
class RandomCropFlip:
    """Tokenizer training: ADM random-resized crop (80-100 % of the short side) + horizontal flip."""

    image_size: int
    min_crop_frac: float = 0.8
    max_crop_frac: float = 1.0
    flip: bool = True
    uint8: bool = False  # uint8 0..255 out; ``to_model_range`` on the device gives the float tensor

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        arr = random_crop_arr(image, self.image_size, self.min_crop_frac, self.max_crop_frac, generator)
        return arr_to_tensor(_maybe_flip(arr, self.flip, generator), self.uint8)  # (3, H, W)


@dataclass(frozen=True)
class CenterCrop:
    """Evaluation / extraction: ADM centre crop (optionally a random flip)."""

    image_size: int
    flip: bool = False
    uint8: bool = False

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        arr = center_crop_arr(image, self.image_size)
        return arr_to_tensor(_maybe_flip(arr, self.flip, generator), self.uint8)  # (3, H, W)


@dataclass(frozen=True)
class RandomTenCrop:
    """AR training on the fly: one of the ten crops, picked uniformly."""

    image_size: int
    crop_ratio: float = 1.1
    uint8: bool = False

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        crops = ten_crop_arrs(image, self.image_size, self.crop_ratio)
        return arr_to_tensor(crops[randint(generator, 0, len(crops))], self.uint8)  # (3, H, W)


@dataclass(frozen=True)
class TenCrop:
    """Code extraction with ``--ten-crop``: all ten crops, (10, 3, H, W)."""

    image_size: int
    crop_ratio: float = 1.1
    uint8: bool = False

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        crops = ten_crop_arrs(image, self.image_size, self.crop_ratio)
        return torch.stack([arr_to_tensor(a, self.uint8) for a in crops])


# --------------------------------------------------------------------------------------------
# Bad-file accounting


@dataclass
class BadFileStats:
    """Per-reason counts of converted and skipped files (one item may carry several conversions)."""

    seen: int = 0
    converted_items: int = 0
    conversions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CONVERSIONS, 0))
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def record(self, notes: Sequence[str], ok: bool) -> None:
        self.seen += 1
        if not ok:
            (reason,) = notes
            self.skipped[reason] += 1
            return
        if notes:
            self.converted_items += 1
        for note in notes:
            self.conversions[note] += 1

    def update(self, other: BadFileStats) -> None:
        self._load_vector(self._vector() + other._vector())

    def _vector(self) -> torch.Tensor:
        values = [self.seen, self.converted_items, *self.conversions.values(), *self.skipped.values()]
        return torch.tensor(values, dtype=torch.int64)

    def _load_vector(self, vector: torch.Tensor) -> None:
        values = [int(v) for v in vector.tolist()]
        self.seen, self.converted_items = values[:2]
        self.conversions = dict(zip(CONVERSIONS, values[2 : 2 + len(CONVERSIONS)]))
        self.skipped = dict(zip(SKIP_REASONS, values[2 + len(CONVERSIONS) :]))

    def all_reduce(self, device: torch.device | str = "cpu") -> BadFileStats:
        """Counts summed over all ranks (a new object; ``device`` must suit the backend: CUDA for nccl)."""
        total = BadFileStats()
        total._load_vector(all_reduce_sum(self._vector().to(device)).cpu())
        return total

    def to_dict(self) -> dict[str, int]:
        """Flat ``{"seen": .., "converted": .., "converted/<tag>": .., "skipped/<reason>": ..}``."""
        out = {"seen": self.seen, "converted": self.converted_items, "skipped": self.num_skipped}
        out.update({f"converted/{k}": v for k, v in self.conversions.items()})
        out.update({f"skipped/{k}": v for k, v in self.skipped.items()})
        return out

    def summary(self) -> str:
        def listed(counts: dict[str, int]) -> str:
            parts = [f"{k} {v}" for k, v in counts.items() if v]
            return f" ({', '.join(parts)})" if parts else ""

        return (
            f"images: {self.seen} read, {self.converted_items} converted{listed(self.conversions)}, "
            f"{self.num_skipped} skipped{listed(self.skipped)}"
        )


# --------------------------------------------------------------------------------------------
# Dataset, collation, loader


class ImageItem(NamedTuple):
    image: torch.Tensor | None  # transform output, e.g. (3, H, W); None when skipped
    label: int
    index: int
    notes: tuple[str, ...]  # conversion tags, or (skip reason,) when image is None


class ImageBatch(NamedTuple):
    images: torch.Tensor  # (B', ...) with B' <= batch size: skipped files are dropped
    labels: torch.Tensor  # (B',) int64
    indices: torch.Tensor  # (B',) int64 dataset indices
    stats: BadFileStats  # this batch's conversions and skips


class DecodedImageDataset(Dataset):
    """What every image source shares: ``files[i]`` (anything ``decode_rgb`` opens), ``labels[i]``,
    ``classes``; decoding, skipping and per-sample seeding are the same for all of them.

    Per-sample random draws come from (seed, epoch, index): ``item_at(index, epoch)`` takes the epoch
    with the index, so persistent data workers need no message when an epoch starts (what
    ``utils.training.InfiniteLoader`` relies on); ``dataset[index]`` uses the epoch of ``set_epoch``.
    Batch with ``collate_fn=collate_skip_bad``.
    """

    files: Sequence[ImageSource]
    labels: np.ndarray  # (N,) int64
    classes: tuple[str, ...]
    transform: Transform
    seed: int
    min_size: int
    max_image_pixels: int | None
    epoch: int

    def _set_options(self, transform: Transform, seed: int, min_size: int, max_image_pixels: int | None) -> None:
        if max_image_pixels is not None and max_image_pixels < 1:
            raise UserError(f"max_image_pixels must be positive, got {max_image_pixels}")
        self.transform = transform
        self.seed = seed
        self.min_size = min_size
        self.max_image_pixels = max_image_pixels
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> ImageItem:
        return self.item_at(index, self.epoch)

    def item_at(self, index: int, epoch: int) -> ImageItem:
        """Sample ``index`` with the random draws of ``epoch``."""
        path = self.files[index]
        label = int(self.labels[index])
        try:
            image, notes = decode_rgb(path, self.min_size, self.max_image_pixels)
        except SkipImage as skip:
            logger.warning("skipping %s (%s)", path, skip)
            return ImageItem(None, label, index, (skip.reason,))
        if notes:
            logger.debug("converted %s (%s)", path, ", ".join(notes))
        tensor = self.transform(image, sample_generator(self.seed, epoch, index))
        return ImageItem(tensor, label, index, notes)


class ImageFolderDataset(DecodedImageDataset):
    """Class-folder or flat image tree -> ``ImageItem``; see the module docstring for the policies."""

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Transform,
        with_labels: bool = True,
        seed: int = 0,
        min_size: int = 0,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        *,
        index_dir: str | os.PathLike | None = None,
    ) -> None:
        self._set_options(transform, seed, min_size, max_image_pixels)
        self.root = Path(root)
        # Listed once per node and cached (``load_folder_listing``); the same as ``scan_image_folder``, as
        # a ``FolderFiles`` and an int64 array rather than a Python object per file.
        listing = _node_listing(self.root, with_labels, index_dir)
        self.files = listing.files(self.root)
        self.labels = listing.labels  # (N,) int64
        self.classes = listing.classes


def collate_skip_bad(items: Sequence[ImageItem]) -> ImageBatch:
    """Stack the good items, drop the skipped ones, and count both."""
    stats = BadFileStats()
    good = []
    for item in items:
        stats.record(item.notes, item.image is not None)
        if item.image is not None:
            good.append(item)
    if good:
        images = torch.stack([item.image for item in good])
    else:
        images = torch.empty(0)
    labels = torch.tensor([item.label for item in good], dtype=torch.int64)
    indices = torch.tensor([item.index for item in good], dtype=torch.int64)
    return ImageBatch(images, labels, indices, stats)
