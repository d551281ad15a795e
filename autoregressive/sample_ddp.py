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
filesystem. That is the default, ``--protocol balanced``.

``--protocol official`` instead makes the official FID script's choices (docs/method.md §3): rank r
seeds torch's global RNG once with ``seed × world_size + r`` and draws everything from it, batch
after batch: labels ``torch.randint(0, C)`` (not class-balanced), code uniforms and pixel noise. Image
i × world_size + r + (images of earlier global batches) is the i-th of rank r's batch; the count is
rounded up to whole global batches and cut to ``--num-samples`` when ``samples.npz`` is packed. It
samples with cfg 1.2,8.0, no top-k/top-p, temperature 1, the GPT's weights in bf16 (``--gpt-dtype
bf16``, no autocast) and the tokenizer in fp32; giving one of those flags another value is an
error. Its shards are ``shards/batch_XXXXXX_rank_XXXXX.npz`` (``images``, ``labels``, ``indices`` and
the rank's RNG state after that batch), so a killed run resumes the same streams, but only with the
same number of processes.
"""

from __future__ import annotations

import argparse
import json
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from autoregressive.generate import GuidanceSchedule, SamplingOptions
from autoregressive.sample import (FlagError, add_model_args, add_sampling_args,
                                   check_output_path, load_models, non_negative_int, positive_int, precision_of,
                                   sampling_kwargs)
from autoregressive.model import GPT
from autoregressive.stream import image_seed, sample_images
from tokenizer.model import DARTokenizer
from utils.checkpoint import atomic_write, atomic_write_text, follow_pointer
from utils.distributed import (DistEnv, all_gather_object, barrier, broadcast_object, cleanup_distributed,
                               setup_distributed)
from utils.cli import OneLineArgumentParser
from utils.errors import UserError, call_cli
from utils.fileio import sweep_temporaries
from utils.images import to_uint8
from utils.training import autocast

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
SAMPLES = "samples.npz"
# Manifest entries added after manifests were first written, with the value older runs had, so
# that those runs can still be resumed.
MANIFEST_DEFAULTS = {"protocol": "balanced", "gpt_dtype": "fp32"}

# The official FID sampler's fixed choices (docs/method.md §3): flag dest → (value, as a user writes it).
# precision fp32 means no autocast: that sampler casts the GPT's weights instead (--gpt-dtype bf16)
# and decodes with the tokenizer in fp32.
OFFICIAL_FLAGS = {
    "cfg_scale": (GuidanceSchedule(1.2, 8.0), "1.2,8.0"),
    "temperature": (1.0, "1.0"),
    "top_k": (0, "0"),
    "top_p": (1.0, "1.0"),
    "precision": ("fp32", "fp32"),
    "gpt_dtype": ("bf16", "bf16"),
    "sampler": ("adams2", "adams2"),  # the tokenizer's own default, as the official decode_code uses
}


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
        if isinstance(stored, dict):
            stored = {**MANIFEST_DEFAULTS, **stored}
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
# --protocol official: one sequential random stream per rank, as the official FID sampler draws it
# ------------------------------------------------------------------------------------------------
def official_seed(seed: int, world_size: int, rank: int) -> int:
    """The seed rank ``rank`` gives ``torch.manual_seed`` once, before its first batch."""
    return seed * world_size + rank


def official_iterations(num_samples: int, batch_size: int, world_size: int) -> int:
    """Global batches run: the count rounded up to a multiple of batch_size × world_size.

    The extra images are made (so every rank's stream advances as in the official script) and cut
    when ``samples.npz`` is packed.
    """
    return -(-num_samples // (batch_size * world_size))


def official_indices(iteration: int, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """Image indices of a rank's batch: i × world_size + rank + (images of all earlier global batches)."""
    return np.arange(batch_size, dtype=np.int64) * world_size + rank + iteration * batch_size * world_size


def official_shard_path(out: Path, iteration: int, rank: int) -> Path:
    return out / SHARD_DIR / f"batch_{iteration:06d}_rank_{rank:05d}.npz"


@dataclass(frozen=True)
class RngState:
    """A process's global torch RNG state: the CPU generator's, and the CUDA device's when sampling there."""

    cpu: torch.Tensor  # uint8
    cuda: torch.Tensor | None  # uint8, or None off CUDA

    @classmethod
    def capture(cls, device: torch.device) -> "RngState":
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(cpu=torch.get_rng_state(), cuda=cuda)

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if device.type == "cuda":
            if self.cuda is None:
                raise ValueError("this RNG state was saved off CUDA; it cannot continue a CUDA stream")
            torch.cuda.set_rng_state(self.cuda, device)


@dataclass(frozen=True)
class OfficialBatch:
    iteration: int
    indices: np.ndarray  # int64 (B,), see official_indices
    labels: np.ndarray  # int64 (B,)
    images: np.ndarray  # uint8 (B, H, W, 3)
    rng: RngState  # the rank's stream after this batch: what a resumed run continues from


def official_batches(gpt: GPT, tokenizer: DARTokenizer, *, seed: int, rank: int, world_size: int,
                     batch_size: int, num_classes: int, stop: int, start: int = 0, rng: RngState | None = None,
                     precision: str = "fp32", sampling: dict | None = None) -> Iterator[OfficialBatch]:
    """A rank's global batches ``start``..``stop - 1`` of the official protocol, one at a time.

    Every random number comes from the process's global torch RNG, seeded once with
    :func:`official_seed` (``start == 0``) or continued from ``rng``, the state after batch
    ``start - 1``: per batch, labels ``torch.randint(0, num_classes)`` on the GPT's device, then the
    code uniforms and the pixel noise (:func:`sample_images` without seeds). So batch k depends on
    every batch before it on the same rank, and on the world size through the seed.
    """
    device = gpt.device
    if rng is None:
        if start:
            raise ValueError(f"starting at batch {start} needs the RNG state after batch {start - 1}")
        torch.manual_seed(official_seed(seed, world_size, rank))
    else:
        rng.restore(device)
    for iteration in range(start, stop):
        labels = torch.randint(0, num_classes, (batch_size,), device=device)
        with autocast(device, precision):
            _, images = sample_images(gpt, tokenizer, labels, **(sampling or {}))
        yield OfficialBatch(iteration=iteration, indices=official_indices(iteration, rank, world_size, batch_size),
                            labels=labels.cpu().numpy(), images=to_uint8(images), rng=RngState.capture(device))


def write_official_shard(path: Path, batch: OfficialBatch) -> None:
    # RNG states as plain uint8 arrays, so a resume never unpickles anything.
    cuda = batch.rng.cuda.numpy() if batch.rng.cuda is not None else np.zeros(0, dtype=np.uint8)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, images=batch.images, labels=batch.labels, indices=batch.indices,
                     rng_cpu=batch.rng.cpu.numpy(), rng_cuda=cuda, has_cuda=np.array(batch.rng.cuda is not None))

    atomic_write(path, write)


def read_official_shard(path: Path, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray, RngState]:
    """(images, labels, RNG state after the batch) of a shard, checked to hold the indices ``expected``."""
    with np.load(path, allow_pickle=False) as data:
        images, labels, indices = data["images"], data["labels"], data["indices"]
        cuda = torch.from_numpy(data["rng_cuda"].copy()) if bool(data["has_cuda"]) else None
        rng = RngState(cpu=torch.from_numpy(data["rng_cpu"].copy()), cuda=cuda)
    if not np.array_equal(indices, expected) or images.shape[0] != len(expected):
        raise ValueError(f"{path} does not hold the images this batch should; delete it and rerun")
    return images, labels, rng


def official_progress(out: Path, rank: int, world_size: int, batch_size: int,
                      iterations: int) -> tuple[int, RngState | None]:
    """(batches this rank has finished, the RNG state to continue from): its stream is sequential,
    so only the unbroken run of shards from batch 0 counts."""
    done = 0
    while done < iterations and official_shard_path(out, done, rank).is_file():
        done += 1
    if not done:
        return 0, None
    last = done - 1
    _, _, rng = read_official_shard(official_shard_path(out, last, rank),
                                    official_indices(last, rank, world_size, batch_size))
    return done, rng


def assemble_official(out: Path, num_samples: int, batch_size: int, world_size: int) -> Path:
    """Interleave every rank's batches into index order and keep the first ``num_samples`` as ``samples.npz``."""
    iterations = official_iterations(num_samples, batch_size, world_size)
    missing = [official_shard_path(out, it, r) for it in range(iterations) for r in range(world_size)
               if not official_shard_path(out, it, r).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) missing (first: {missing[0]}); rerun to finish")
    labels = np.empty(num_samples, dtype=np.int64)
    per_global = batch_size * world_size

    def global_batch(iteration: int) -> tuple[np.ndarray, np.ndarray]:
        parts = [read_official_shard(official_shard_path(out, iteration, r),
                                     official_indices(iteration, r, world_size, batch_size))
                 for r in range(world_size)]
        images = np.empty((per_global, *parts[0][0].shape[1:]), dtype=np.uint8)
        batch_labels = np.empty(per_global, dtype=np.int64)
        for rank, (rank_images, rank_labels, _) in enumerate(parts):
            images[rank::world_size], batch_labels[rank::world_size] = rank_images, rank_labels
        return images, batch_labels

    first, _ = global_batch(0)

    def chunks() -> Iterable[np.ndarray]:
        for iteration in range(iterations):
            start = iteration * per_global
            keep = min(per_global, num_samples - start)
            images, batch_labels = global_batch(iteration)
            labels[start : start + keep] = batch_labels[:keep]
            yield images[:keep]

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
    parser.add_argument("--protocol", default="balanced", choices=("balanced", "official"),
                        help="balanced: label i mod C, image i seeded by (seed, i), any process count; "
                             "official: the official FID script's random labels, per-rank streams and "
                             "settings (cfg 1.2,8.0, GPT weights in bf16); see docs/method.md §3")
    args = parser.parse_args(argv)
    if args.protocol == "official":
        # The protocol fixes these flags; parsed again without defaults, a flag left out reads None,
        # so apply_protocol can tell a flag the user gave from one it may fill in.
        parser.set_defaults(**{dest: None for dest in OFFICIAL_FLAGS})
        args = parser.parse_args(argv)
    return args


def apply_protocol(args: argparse.Namespace) -> None:
    """Under ``--protocol official``, refuse a given flag that contradicts it and fill in its values."""
    if args.protocol != "official":
        return
    for dest, (value, text) in OFFICIAL_FLAGS.items():
        given = getattr(args, dest)
        if given is not None and given != value:
            flag = "--" + dest.replace("_", "-")
            shown = (f"{given.start},{given.final}" if isinstance(given, GuidanceSchedule) and given.end is not None
                     else given.start if isinstance(given, GuidanceSchedule) else given)
            raise UserError(f"{flag} {shown} contradicts --protocol official, which samples with {flag} {text}; "
                            f"drop {flag}, or use --protocol balanced to choose it")
        setattr(args, dest, value)


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
        "protocol": args.protocol, "gpt_dtype": args.gpt_dtype,
    }


def prepare_out(out: Path, manifest: dict, env: DistEnv) -> None:
    """Rank 0 sweeps killed writes and checks or writes the manifest; every rank gets its error, if any."""
    error = None
    if env.is_main:
        try:
            # Left by killed writes: shards, and samples.npz itself (as large as all shards together).
            sweep_temporaries(out, [SAMPLES, MANIFEST])
            sweep_temporaries(out / SHARD_DIR)
            check_manifest(out, manifest)
            out.joinpath(SHARD_DIR).mkdir(parents=True, exist_ok=True)
        except (UserError, OSError) as err:
            error = str(err)
    error = broadcast_object(error)
    if error is not None:
        raise UserError(error)


def check_official_world_size(out: Path, world_size: int) -> None:
    """An official run continues only with its process count: each rank's random stream depends on it."""
    path = out / MANIFEST
    try:
        stored = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # check_manifest says what is wrong with it
    ran = stored.get("world_size") if isinstance(stored, dict) and stored.get("protocol") == "official" else None
    if ran is not None and ran != world_size:
        raise UserError(f"{out} was sampled with --protocol official on {ran} process(es), not {world_size}: its "
                        f"random streams depend on the process count; resume with {ran} processes or use a new --out")


def finish(args: argparse.Namespace, env: DistEnv, stopped_early: bool, assemble_all) -> Path | None:
    # Any rank that stopped early leaves shards undone, so nobody may assemble.
    stopped_early = any(all_gather_object(stopped_early))
    if stopped_early:
        if env.is_main:
            print(f"stopped after --max-shards {args.max_shards}; rerun the same command to continue")
        return None
    result = None
    if env.is_main:
        result = assemble_all()
        print(f"wrote {result}: {args.num_samples} images")
    barrier()
    return result


def sample_balanced(args: argparse.Namespace, env: DistEnv, gpt: GPT, tokenizer: DARTokenizer, num_classes: int,
                    precision: str, sampling: dict, manifest: dict) -> Path | None:
    out, size, n = Path(args.out), args.per_proc_batch_size, args.num_samples
    prepare_out(out, manifest, env)
    # Rank 0 decides which shards are missing, so every rank works from the same list.
    pending = broadcast_object(pending_shards(out, n, size) if env.is_main else None)

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
    return finish(args, env, stopped_early, lambda: assemble(out, n, size))


def sample_official(args: argparse.Namespace, env: DistEnv, gpt: GPT, tokenizer: DARTokenizer, num_classes: int,
                    precision: str, sampling: dict, manifest: dict) -> Path | None:
    out, size, n, world = Path(args.out), args.per_proc_batch_size, args.num_samples, env.world_size
    error = None
    if env.is_main:
        try:
            check_official_world_size(out, world)
        except UserError as err:
            error = str(err)
    error = broadcast_object(error)
    if error is not None:
        raise UserError(error)
    prepare_out(out, {**manifest, "world_size": world, "device_type": env.device.type}, env)

    iterations = official_iterations(n, size, world)
    done, rng = official_progress(out, env.rank, world, size, iterations)
    stop = iterations if args.max_shards is None else min(iterations, done + args.max_shards)
    stopped_early = stop < iterations
    if env.is_main:
        print(f"{done} of {iterations} batches of {size} done on rank 0; {iterations * size * world} images "
              f"on {world} process(es), the first {n} kept")
    batches = official_batches(gpt, tokenizer, seed=args.seed, rank=env.rank, world_size=world, batch_size=size,
                               num_classes=num_classes, start=done, stop=stop, rng=rng, precision=precision,
                               sampling=sampling)
    for batch in tqdm(batches, total=stop - done, desc="batches (rank 0)", disable=not env.is_main):
        write_official_shard(official_shard_path(out, batch.iteration, env.rank), batch)
    return finish(args, env, stopped_early, lambda: assemble_official(out, n, size, world))


@torch.no_grad()  # sampling only; a decorator, not a global switch, so in-process callers keep autograd
def main(argv: Sequence[str] | None = None) -> Path | None:
    """Returns the path of ``samples.npz`` on rank 0 once complete, else None."""
    args = parse_args(argv)
    env = setup_distributed(args.device)  # first: a missing GPU is the first thing to say
    try:
        apply_protocol(args)
        check_output_path(args.out, "--out", folder=True)
        gpt, tokenizer = load_models(args, env.device)
        num_classes = gpt.config.num_classes if args.num_classes is None else args.num_classes
        if not 1 <= num_classes <= gpt.config.num_classes:
            raise FlagError(f"--num-classes must be in 1..{gpt.config.num_classes} (the GPT's classes), "
                            f"got {num_classes}")
        precision = precision_of(args, env.device)
        sampling = sampling_kwargs(args)
        manifest = run_manifest(args, sampling["options"], num_classes, precision,
                                tokenizer.config.sampling_resolution)
        run = sample_official if args.protocol == "official" else sample_balanced
        return run(args, env, gpt, tokenizer, num_classes, precision, sampling, manifest)
    finally:
        cleanup_distributed()


def cli(argv: list[str] | None = None) -> int:
    """``python -m autoregressive.sample_ddp ARGV`` run in this process (argv None: ``sys.argv[1:]``);
    returns the exit status instead of exiting."""
    return call_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
