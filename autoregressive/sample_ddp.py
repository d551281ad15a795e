"""Sample many images for FID with any number of processes; resumable (docs/method.md §3).

    torchrun --nproc_per_node=8 -m autoregressive.sample_ddp --gpt-ckpt showlab/D-AR --gpt-preset GPT-L \\
        --tokenizer-ckpt showlab/D-AR --cfg-scale 1.1,8.0 --num-samples 50000 --per-proc-batch-size 64 \\
        --out samples/D-AR-L

Output contract (everything under ``--out``):

- ``samples.npz``: ``arr_0`` uint8 [N, H, W, 3] in image-index order (what the ADM evaluator and
  ``python -m evaluations.evaluator`` read) and ``labels`` int64 [N]. Written by rank 0, atomically,
  once every image exists; stored uncompressed so it can be memory-mapped.
- ``shards/shard_XXXXXX.npz``: shard s holds images [s·S, min((s+1)·S, N)), S = per-proc batch size,
  as ``images``, ``labels``, ``indices``. Each is written atomically when its batch is done, so a
  shard file exists exactly when it is complete.
- ``manifest.json``: every setting that changes the pixels. A rerun with the same ``--out`` skips
  the shards that exist and generates the rest (any number of processes); different settings are
  an error rather than a silently mixed sample set. A ``checkpoints/latest`` pointer is recorded as
  the checkpoint it names, so a rerun after more training is refused too.
- Hidden ``.NAME.*.tmp`` files are writes a killed process left behind (a shard, or ``samples.npz``
  itself); each run deletes them at start.

Image i has label i mod C (C = ``--num-classes``: 50 per class for 50,000 images and 1,000
classes) and seed ``image_seed(--seed, i)`` for both its codes and its pixel noise
(:mod:`autoregressive.stream`), so no image depends on the number of processes or on a restart;
a shard is always generated as one batch, so even float rounding is the same across reruns.
Rank 0 decides which shards are missing, so with several nodes ``--out`` must be on a shared
filesystem.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from autoregressive.generate import SamplingOptions
from autoregressive.sample import (FlagError, add_model_args, add_sampling_args,
                                   check_output_path, load_models, non_negative_int, positive_int, precision_of,
                                   sampling_kwargs)
from autoregressive.stream import image_seed, sample_images
from utils.checkpoint import atomic_write, atomic_write_text, follow_pointer
from utils.distributed import all_gather_object, barrier, broadcast_object, cleanup_distributed, setup_distributed
from utils.cli import OneLineArgumentParser
from utils.errors import UserError, run_cli
from utils.fileio import sweep_temporaries
from utils.images import to_uint8
from utils.training import autocast

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
SAMPLES = "samples.npz"


# ------------------------------------------------------------------------------------------------
# Index bookkeeping (pure)
# ------------------------------------------------------------------------------------------------
def class_balanced_labels(indices: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """Label of image i: i mod num_classes (counts differ by at most one between classes)."""
    return np.asarray(indices, dtype=np.int64) % num_classes


def shard_range(shard: int, shard_size: int, num_samples: int) -> range:
    return range(shard * shard_size, min((shard + 1) * shard_size, num_samples))


def num_shards(num_samples: int, shard_size: int) -> int:
    return -(-num_samples // shard_size)


def shard_path(out: Path, shard: int) -> Path:
    return out / SHARD_DIR / f"shard_{shard:06d}.npz"


def pending_shards(out: Path, num_samples: int, shard_size: int) -> list[int]:
    return [s for s in range(num_shards(num_samples, shard_size)) if not shard_path(out, s).is_file()]


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def check_manifest(out: Path, manifest: dict) -> None:
    """Write ``manifest.json`` on the first run; on a rerun, raise if any setting differs."""
    path = out / MANIFEST
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path} is not valid JSON (not written by this tool?); use a new --out") from None
        changed = sorted(k for k in set(stored) | set(manifest) if stored.get(k) != manifest.get(k))
        if changed:
            details = ", ".join(f"{k}: {stored.get(k)!r} → {manifest.get(k)!r}" for k in changed)
            raise UserError(f"{out} was started with other settings ({details}); use a new --out")
        return
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, images=images, labels=labels, indices=indices)

    atomic_write(path, write)


def read_shard(path: Path, expected: range) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of a shard, checked to hold exactly the indices ``expected``."""
    with np.load(path, allow_pickle=False) as data:
        images, labels, indices = data["images"], data["labels"], data["indices"]
    if not np.array_equal(indices, np.arange(expected.start, expected.stop)) or images.shape[0] != len(expected):
        raise ValueError(f"{path} does not hold images {expected.start}..{expected.stop - 1}; delete it and rerun")
    return images, labels


def write_npz_streaming(path: Path, chunks: Iterable[np.ndarray], shape: tuple[int, ...], labels: np.ndarray) -> None:
    """An uncompressed ``.npz`` with ``arr_0`` uint8 ``shape`` written chunk by chunk, plus ``labels``.

    ``np.savez`` would need all 50k images (9.8 GB at 256²) in memory at once; writing the .npy
    header and then the rows into the zip member keeps one shard in memory.
    """
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    expected = int(np.prod(shape))

    def write(tmp: str) -> None:
        written = 0
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                for chunk in chunks:
                    if chunk.dtype != np.uint8 or chunk.shape[1:] != shape[1:]:
                        raise ValueError(f"chunk {chunk.dtype} {chunk.shape} does not fit arr_0 {shape}")
                    member.write(np.ascontiguousarray(chunk).tobytes())
                    written += chunk.size
            with archive.open("labels.npy", "w") as member:
                np.lib.format.write_array(member, np.ascontiguousarray(labels), allow_pickle=False)
        if written != expected:
            raise ValueError(f"wrote {written} bytes of arr_0, expected {expected}")

    atomic_write(path, write)


def assemble(out: Path, num_samples: int, shard_size: int) -> Path:
    """Concatenate every shard, in index order, into ``samples.npz``."""
    missing = pending_shards(out, num_samples, shard_size)
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) missing (first: {shard_path(out, missing[0])}); rerun to finish")
    first, _ = read_shard(shard_path(out, 0), shard_range(0, shard_size, num_samples))
    labels = np.empty(num_samples, dtype=np.int64)

    def chunks() -> Iterable[np.ndarray]:
        for s in range(num_shards(num_samples, shard_size)):
            span = shard_range(s, shard_size, num_samples)
            images, shard_labels = read_shard(shard_path(out, s), span)
            labels[span.start : span.stop] = shard_labels
            yield images

    # Labels are filled while the images stream, so they are written after arr_0 (see the writer).
    write_npz_streaming(out / SAMPLES, chunks(), (num_samples, *first.shape[1:]), labels)
    return out / SAMPLES


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m autoregressive.sample_ddp",
                                   description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--num-samples", "--num-fid-samples", dest="num_samples", type=positive_int, default=50_000)
    parser.add_argument("--per-proc-batch-size", type=positive_int, default=32, help="images per batch = per shard")
    parser.add_argument("--num-classes", type=positive_int, default=None,
                        help="labels cycle over 0..C-1, C in 1..the GPT's classes (default: all of them)")
    parser.add_argument("--out", "--sample-dir", dest="out", required=True, help="output folder (shards, manifest, samples.npz)")
    parser.add_argument("--max-shards", type=non_negative_int, default=None,
                        help="stop after this many shards per process (time-limited jobs); rerun to continue")
    return parser.parse_args(argv)


def pinned_checkpoint(path: str | None) -> str | None:
    """A ``checkpoints/latest`` pointer as the checkpoint it names now, for the manifest.

    Recording the pointer itself would let a rerun after more training mix two models' samples.
    """
    if path is None or not Path(path).expanduser().exists():
        return path
    local = Path(path).expanduser()
    target = follow_pointer(local)
    return path if target == local else str(target)


def run_manifest(args: argparse.Namespace, options: SamplingOptions, num_classes: int, precision: str,
                 resolution: int) -> dict:
    schedule = options.guidance
    return {
        "num_samples": args.num_samples, "shard_size": args.per_proc_batch_size, "seed": args.seed,
        "num_classes": num_classes, "cfg_scale": [schedule.start, schedule.final],
        "cfg_official_start_quirk": schedule.official_start_quirk, "temperature": options.temperature,
        "top_k": options.top_k, "top_p": options.top_p, "sampler": args.sampler, "precision": precision,
        "gpt_ckpt": pinned_checkpoint(args.gpt_ckpt), "gpt_file": args.gpt_file, "gpt_preset": args.gpt_preset,
        "ema": args.ema,
        "tokenizer_ckpt": pinned_checkpoint(args.tokenizer_ckpt), "tokenizer_file": args.tokenizer_file,
        "tokenizer_config": args.tokenizer_config, "resolution": resolution,
    }


@torch.no_grad()  # sampling only; a decorator, not a global switch, so in-process callers keep autograd
def main(argv: Sequence[str] | None = None) -> Path | None:
    """Returns the path of ``samples.npz`` on rank 0 once complete, else None."""
    args = parse_args(argv)
    env = setup_distributed(args.device)  # first: a missing GPU is the first thing to say
    try:
        check_output_path(args.out, "--out", folder=True)
        gpt, tokenizer = load_models(args, env.device)
        num_classes = gpt.config.num_classes if args.num_classes is None else args.num_classes
        if not 1 <= num_classes <= gpt.config.num_classes:
            raise FlagError(f"--num-classes must be in 1..{gpt.config.num_classes} (the GPT's classes), "
                            f"got {num_classes}")
        precision = precision_of(args, env.device)
        sampling = sampling_kwargs(args)
        out, size, n = Path(args.out), args.per_proc_batch_size, args.num_samples

        # Rank 0 owns the folder; the others learn the outcome (or its error) from the broadcast.
        state: tuple[str | None, list[int]] = (None, [])
        if env.is_main:
            try:
                # Left by killed writes: shards, and samples.npz itself (as large as all shards together).
                sweep_temporaries(out, [SAMPLES, MANIFEST])
                sweep_temporaries(out / SHARD_DIR)
                check_manifest(out, run_manifest(args, sampling["options"], num_classes, precision,
                                                 tokenizer.config.sampling_resolution))
                out.joinpath(SHARD_DIR).mkdir(parents=True, exist_ok=True)
                state = (None, pending_shards(out, n, size))
            except (UserError, OSError) as err:
                state = (str(err), [])
        error, pending = broadcast_object(state)
        if error is not None:
            raise UserError(error)

        mine = pending[env.rank :: env.world_size]
        stopped_early = args.max_shards is not None and len(mine) > args.max_shards
        mine = mine[: args.max_shards] if args.max_shards is not None else mine
        if env.is_main:
            todo = sum(len(shard_range(s, size, n)) for s in pending)
            print(f"{n - todo} of {n} images already done; {len(pending)} shard(s) to go on "
                  f"{env.world_size} process(es)")
        for shard in tqdm(mine, desc="shards (rank 0)", disable=not env.is_main):
            span = shard_range(shard, size, n)
            indices = np.arange(span.start, span.stop)
            labels = class_balanced_labels(indices, num_classes)
            with autocast(env.device, precision):
                _, images = sample_images(gpt, tokenizer, torch.from_numpy(labels).to(env.device),
                                          seeds=[image_seed(args.seed, int(i)) for i in indices], **sampling)
            write_shard(shard_path(out, shard), to_uint8(images), labels, indices)
        # Any rank that stopped early leaves shards undone, so nobody may assemble.
        stopped_early = any(all_gather_object(stopped_early))
        if stopped_early:
            if env.is_main:
                print(f"stopped after --max-shards {args.max_shards}; rerun the same command to continue")
            return None
        result = None
        if env.is_main:
            result = assemble(out, n, size)
            print(f"wrote {result}: {n} images")
        barrier()
        return result
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    run_cli(main)
