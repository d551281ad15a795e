"""Pre-extracted tokenizer codes: the on-disk format, its writer helpers and the training dataset.

Directory layout (format ``dar-codes`` version 1), written by ``tokenizer.extract_codes``::

    manifest.json
        {"format": "dar-codes", "version": 1,
         "num_items": int, "seq_len": int, "vocab_size": int, "num_augs": int,
         "shards": [{"id": int, "file": "codes_00000.npy", "labels": "labels_00000.npy",
                     "indices": "indices_00000.npy", "start": int, "count": int}, ...],
         "meta": {...}}                       # free-form: tokenizer checkpoint, image size, flags
    codes_XXXXX.npy    int16 when vocab_size <= 32768, else int32; shape [count, num_augs, seq_len]
    labels_XXXXX.npy   int64 [count]
    indices_XXXXX.npy  int64 [count]   the source image's dataset index (audits duplicates/gaps)

``tokenizer.extract_codes`` also leaves ``extraction.json`` (the settings of the run; a rerun with other
settings into the same folder is refused), ``badfiles_XXXXX.json`` (per-shard skip/conversion counts, so the
totals survive a resume) and ``log.txt``. Readers ignore them.

``XXXXX`` is the shard id (5+ digits). Shards are listed by id; ``start`` is the running row offset,
so row ``i`` of the whole set lives in the shard whose ``[start, start + count)`` holds it.
Augmentation axis: ``num_augs`` = 1 (centre crop), 2 (centre crop, then its mirror) or 10
(``dataset.images.ten_crop_arrs`` order: four corners and centre, then the same of the mirror).
A count of 20 (ten crops and their mirrors) is accepted too; the axis is only indexed here.

Writing protocol (resumable, crash safe): ``write_shard`` writes labels, indices and finally codes,
each to a temporary file renamed into place, so a shard is complete exactly when its codes file
exists (``completed_shards``). Each rank writes its own shards; after a barrier rank 0 calls
``write_manifest``, which scans the complete shards, checks them, and writes the manifest
atomically. A reader needs only the manifest.
"""

from __future__ import annotations

import bisect
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.seeding import randint, sample_generator
from utils.checkpoint import atomic_write, atomic_write_text
from utils.errors import UserError

FORMAT_NAME = "dar-codes"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"^codes_(\d{5,})\.npy$")


def shard_files(shard_id: int) -> dict[str, str]:
    """File names of one shard: ``{"file": codes, "labels": .., "indices": ..}``."""
    return {
        "file": f"codes_{shard_id:05d}.npy",
        "labels": f"labels_{shard_id:05d}.npy",
        "indices": f"indices_{shard_id:05d}.npy",
    }


def codes_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.int16) if vocab_size <= 2**15 else np.dtype(np.int32)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: str) -> None:
        # A file handle, not a name: np.save would append ".npy" to the temporary name.
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)

    atomic_write(path, write)


def _as_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def write_shard(
    root: str | os.PathLike,
    shard_id: int,
    codes: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    indices: torch.Tensor | np.ndarray,
    vocab_size: int,
) -> Path:
    """Write one complete shard; ``codes`` (count, num_augs, seq_len), ``labels``/``indices`` (count,)."""
    root = Path(root)
    codes_np = _as_numpy(codes)
    labels_np = _as_numpy(labels).astype(np.int64)
    indices_np = _as_numpy(indices).astype(np.int64)
    if codes_np.ndim != 3:
        raise ValueError(f"codes must be (count, num_augs, seq_len), got shape {codes_np.shape}")
    count = codes_np.shape[0]
    if labels_np.shape != (count,) or indices_np.shape != (count,):
        raise ValueError(
            f"labels {labels_np.shape} and indices {indices_np.shape} must both be ({count},) "
            f"to match codes {codes_np.shape}"
        )
    if not np.issubdtype(codes_np.dtype, np.integer):
        raise TypeError(f"codes must be integers, got {codes_np.dtype}")
    if count and (codes_np.min() < 0 or codes_np.max() >= vocab_size):
        raise ValueError(f"codes outside [0, {vocab_size}): min {codes_np.min()}, max {codes_np.max()}")
    names = shard_files(shard_id)
    _save_npy(root / names["labels"], labels_np)
    _save_npy(root / names["indices"], indices_np)
    _save_npy(root / names["file"], codes_np.astype(codes_dtype(vocab_size)))
    return root / names["file"]


def completed_shards(root: str | os.PathLike) -> list[int]:
    """Ids of the shards whose codes file exists (written last, so the shard is complete)."""
    root = Path(root)
    if not root.is_dir():
        return []
    ids = (_SHARD_RE.match(name) for name in os.listdir(root))
    return sorted(int(m.group(1)) for m in ids if m)


def write_manifest(
    root: str | os.PathLike,
    seq_len: int,
    vocab_size: int,
    num_augs: int,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Scan and check the complete shards, then write ``manifest.json`` atomically; returns it."""
    root = Path(root)
    shards = []
    start = 0
    seen_sources: list[np.ndarray] = []
    for shard_id in completed_shards(root):
        names = shard_files(shard_id)
        codes = np.load(root / names["file"], mmap_mode="r", allow_pickle=False)
        labels = np.load(root / names["labels"], mmap_mode="r", allow_pickle=False)
        indices = np.load(root / names["indices"], allow_pickle=False)
        expected = (codes.shape[0], num_augs, seq_len)
        if codes.shape != expected or codes.dtype != codes_dtype(vocab_size):
            raise ValueError(
                f"{names['file']}: shape {codes.shape} dtype {codes.dtype}, "
                f"expected {expected} {codes_dtype(vocab_size)}"
            )
        if labels.shape != (codes.shape[0],) or indices.shape != (codes.shape[0],):
            raise ValueError(
                f"shard {shard_id}: labels/indices length differs from its {codes.shape[0]} codes"
            )
        shards.append({"id": shard_id, **names, "start": start, "count": int(codes.shape[0])})
        start += int(codes.shape[0])
        seen_sources.append(indices)
    if not shards:
        raise FileNotFoundError(f"no complete code shards (codes_XXXXX.npy) in {root}")
    sources = np.concatenate(seen_sources)
    if len(np.unique(sources)) != len(sources):
        raise ValueError(f"{root}: some source images were extracted into more than one shard")
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "num_items": start,
        "seq_len": seq_len,
        "vocab_size": vocab_size,
        "num_augs": num_augs,
        "shards": shards,
        "meta": meta or {},
    }
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(root: str | os.PathLike) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: extract codes first (python -m tokenizer.extract_codes)")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r} v{manifest.get('version')!r}, "
            f"expected {FORMAT_NAME!r} v{FORMAT_VERSION}"
        )
    return manifest


class CodeDataset(Dataset):
    """Rows of a code directory: ``(codes LongTensor[seq_len], label)``, one augmentation per draw.

    The augmentation is drawn from the (seed, epoch, index) generator, so it is the same for any
    worker count or restart; ``item_at(index, epoch)`` takes the epoch with the index (persistent
    workers), ``dataset[index]`` uses the one of ``set_epoch``. Shards are memory-mapped lazily in each process.
    """

    def __init__(self, root: str | os.PathLike, seed: int = 0) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.seed = seed
        self.epoch = 0
        self.num_items: int = self.manifest["num_items"]
        if self.num_items == 0:
            raise UserError(f"{self.root} has 0 items: its shards hold no codes; extract codes from a non-empty "
                            "image folder (python -m tokenizer.extract_codes)")
        self.seq_len: int = self.manifest["seq_len"]
        self.vocab_size: int = self.manifest["vocab_size"]
        self.num_augs: int = self.manifest["num_augs"]
        self._shards = self.manifest["shards"]
        self._starts = [s["start"] for s in self._shards]
        self._codes: list[np.ndarray] | None = None
        self.labels = np.concatenate(
            [np.load(self.root / s["labels"], allow_pickle=False) for s in self._shards]
        )
        if len(self.labels) != self.num_items:
            raise ValueError(
                f"{self.root}: {len(self.labels)} labels but the manifest says {self.num_items} items"
            )

    def _open(self) -> list[np.ndarray]:
        if self._codes is None:
            codes = []
            for s in self._shards:
                array = np.load(self.root / s["file"], mmap_mode="r", allow_pickle=False)
                if array.shape != (s["count"], self.num_augs, self.seq_len):
                    raise ValueError(f"{s['file']}: shape {array.shape} disagrees with the manifest")
                codes.append(array)
            self._codes = codes
        return self._codes

    def __getstate__(self) -> dict[str, Any]:
        # Workers reopen the memory maps instead of receiving copies of the arrays.
        state = self.__dict__.copy()
        state["_codes"] = None
        return state

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_items

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.item_at(index, self.epoch)

    def item_at(self, index: int, epoch: int) -> tuple[torch.Tensor, int]:
        """Row ``index`` with the augmentation drawn for ``epoch``."""
        if not 0 <= index < self.num_items:
            raise IndexError(f"index {index} outside [0, {self.num_items})")
        shard = bisect.bisect_right(self._starts, index) - 1
        row = index - self._starts[shard]
        aug = 0
        if self.num_augs > 1:
            aug = randint(sample_generator(self.seed, epoch, index), 0, self.num_augs)
        codes = torch.from_numpy(np.array(self._open()[shard][row, aug], dtype=np.int64))  # (seq_len,)
        return codes, int(self.labels[index])
