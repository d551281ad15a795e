"""Encode an image folder or tar shards into code shards for AR training (``dataset/codes.py`` format).

    torchrun --nproc_per_node=8 -m tokenizer.extract_codes \
        --tokenizer-ckpt showlab/D-AR --data-path /data/imagenet/train --out codes/imagenet256 --ten-crop

(``python -m tokenizer.extract_codes ...`` runs the same thing in one process.)

Output contract
    Shard ``k`` holds the source images ``[k * shard_size, (k + 1) * shard_size)`` of the sorted file
    list (tar shards: shard order, then tar order; ``dataset.shards``), minus the files that could not be decoded or exceed ``--max-image-pixels`` (skipped and
    counted, never encoded). The shards not yet complete are dealt out round-robin over the ranks;
    each rank writes its own. Views per
    image (``num_augs``): 1 (ADM centre crop), 2 with ``--flip`` (centre crop, then its mirror, as
    LlamaGen's extractor) or 10 with ``--ten-crop`` (``dataset.images.TenCrop``: the crops of the
    281-px centre crop and of its mirror; ``--flip`` would only duplicate them, so the two exclude
    each other).
    When every shard is complete rank 0 writes ``manifest.json``; its ``meta`` records the settings,
    the class names and the bad-file counts.

Resuming
    A shard is written atomically (``dataset.codes.write_shard``), so rerunning the same command
    after a kill skips the complete shards and redoes only the others: no duplicates, no gaps, and
    the result is identical to an uninterrupted run. ``extraction.json`` pins the settings of the
    first run; a rerun with different settings into the same folder is refused. ``--max-shards``
    stops a rank after that many new shards (for time-limited jobs).

The tokenizer is the EMA one whenever the checkpoint has EMA weights (``DARTokenizer.from_pretrained``
prefers them) and runs in eval mode; ``--precision bf16`` is an opt-in speed-up on CUDA (it can
flip near-tie nearest-code assignments, so fp32 is the default).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset.codes import MANIFEST, completed_shards, shard_files, write_manifest, write_shard
from dataset.images import (
    CONVERSIONS,
    DEFAULT_MAX_IMAGE_PIXELS,
    SKIP_REASONS,
    BadFileStats,
    CenterCrop,
    ImageBatch,
    DecodedImageDataset,
    TenCrop,
    collate_skip_bad,
    to_model_range,
)
from dataset.shards import open_images
from tokenizer.model import DARTokenizer
from utils.checkpoint import CorruptFileError, atomic_write_text
from utils.distributed import DistEnv, barrier, broadcast_object, cleanup_distributed, setup_distributed
from utils.cli import OneLineArgumentParser, require_minimums
from utils.errors import UserError, call_cli
from utils.run import create_logger
from utils.training import Precision, autocast

SETTINGS_FILE = "extraction.json"
# Per-shard bad-file counts, written just before the shard itself, so a resumed run can still
# report the totals of shards it did not redo.
_STATS_FILE = "badfiles_{:05d}.json"
BARRIER_TIMEOUT_MINUTES = 24 * 60
# Crop settings fixed by the paper recipe (centre crop to 281 px for 256 px codes).
TEN_CROP_RATIO = 1.1
# Settings added after folders were first pinned: a pinned file without them was written with the
# behaviour of their default, so their absence is not a mismatch.
_SETTINGS_ADDED_LATER = frozenset({"max_image_pixels"})


class ExtractionError(UserError, ValueError):
    """A command-line value or an output folder that extraction cannot work with (the message says which)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m tokenizer.extract_codes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer-ckpt", required=True, help="tokenizer folder, file or hub repo id")
    parser.add_argument("--tokenizer-filename", default=None, help="file inside a hub repo (default: the v1 tokenizer)")
    parser.add_argument("--data-path", required=True, help="image folder (class sub-folders give the labels), or tar shards: a .tar, a "
                        "folder of them or a pattern like shards-{000000..000099}.tar (.cls members give the labels)")
    parser.add_argument("--out", required=True, help="output folder for shards and manifest.json")
    views = parser.add_mutually_exclusive_group()
    views.add_argument("--ten-crop", action="store_true", help="store all ten crops (the AR paper recipe)")
    views.add_argument("--flip", action="store_true", help="store the centre crop and its mirror")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64, help="images per rank per encoder call")
    parser.add_argument("--shard-size", type=int, default=10000, help="source images per shard")
    parser.add_argument("--max-shards", type=int, default=None, help="stop each rank after this many new shards")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="encoder autocast")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="skip (and count) images with more pixels, from their header, before decoding them "
                             f"(default {DEFAULT_MAX_IMAGE_PIXELS})")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """One-line errors for values that cannot work; run after the device check, before anything is written."""
    least = {"image_size": 1, "batch_size": 1, "shard_size": 1, "max_shards": 0, "num_workers": 0,
             "max_image_pixels": 1}
    require_minimums(args, least, ExtractionError)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ExtractionError(f"--out {args.out} is a file; pass a folder for the shards")


def num_views(args: argparse.Namespace) -> int:
    return 10 if args.ten_crop else 2 if args.flip else 1


def settings_of(args: argparse.Namespace, num_images: int) -> dict[str, Any]:
    """Everything that changes the content of a shard; a resumed run must match it exactly."""
    return {
        "tokenizer_ckpt": str(args.tokenizer_ckpt),
        "tokenizer_filename": args.tokenizer_filename,
        "data_path": str(Path(args.data_path).resolve()),
        "num_source_images": num_images,
        "image_size": args.image_size,
        "views": "ten_crop" if args.ten_crop else "flip" if args.flip else "center",
        "crop_ratio": TEN_CROP_RATIO if args.ten_crop else 1.0,
        "shard_size": args.shard_size,
        "precision": args.precision,
        "max_image_pixels": args.max_image_pixels,
    }


def pin_settings(out: Path, settings: dict[str, Any]) -> None:
    """Write the settings on the first run; refuse to mix shards of different settings later."""
    path = out / SETTINGS_FILE
    if path.is_file():
        saved = _read_json(path)
        changed = [f"{k}: {saved.get(k)!r} -> {v!r}" for k, v in settings.items()
                   if saved.get(k) != v and (k in saved or k not in _SETTINGS_ADDED_LATER)]
        if changed:
            raise ExtractionError(
                f"{out} holds shards extracted with other settings ({'; '.join(changed)}); "
                "use a new --out folder or the original settings"
            )
        return
    atomic_write_text(path, json.dumps(settings, indent=1) + "\n")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CorruptFileError(f"{path} is truncated or not JSON ({error}); delete it and rerun") from None
    if not isinstance(data, dict):
        raise CorruptFileError(f"{path} does not hold a JSON object; delete it and rerun")
    return data


def shard_range(shard_id: int, shard_size: int, num_images: int) -> range:
    return range(shard_id * shard_size, min((shard_id + 1) * shard_size, num_images))


def shard_batches(
    shard_ids: list[int], shard_size: int, num_images: int, batch_size: int
) -> list[tuple[int, list[int]]]:
    """(shard id, source indices) per batch; batches never straddle shards, so a shard ends on a batch."""
    batches = []
    for shard_id in shard_ids:
        indices = list(shard_range(shard_id, shard_size, num_images))
        batches.extend((shard_id, indices[i : i + batch_size]) for i in range(0, len(indices), batch_size))
    return batches


@torch.no_grad()
def encode_views(tokenizer: DARTokenizer, images: torch.Tensor, flip: bool, precision: Precision) -> torch.Tensor:
    """images (B, 3, H, W) or (B, A, 3, H, W) → codes (B, A', N); ``flip`` appends the mirror (A' = 2)."""
    if images.dim() == 4:
        images = images.unsqueeze(1)  # (B, 1, 3, H, W)
    if flip:
        images = torch.cat([images, images.flip(-1)], dim=1)  # (B, 2, 3, H, W)
    batch, views = images.shape[:2]
    with autocast(tokenizer.device, precision):
        codes = tokenizer.encode(images.flatten(0, 1))  # (B * A, N)
    return codes.view(batch, views, -1)


def _collect_stats(out: Path, shard_ids: list[int]) -> BadFileStats:
    total = BadFileStats()
    for shard_id in shard_ids:
        path = out / _STATS_FILE.format(shard_id)
        if not path.is_file():
            raise ExtractionError(f"{path} is missing although shard {shard_id} is complete; delete "
                                  f"{shard_files(shard_id)['file']} and rerun to redo that shard")
        counts = _read_json(path)
        stats = BadFileStats(
            seen=counts["seen"],
            converted_items=counts["converted"],
            conversions={k: counts[f"converted/{k}"] for k in CONVERSIONS},
            skipped={k: counts[f"skipped/{k}"] for k in SKIP_REASONS},
        )
        total.update(stats)
    return total


def on_rank0(env: DistEnv, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only; if it raises, every rank raises instead of waiting at a barrier."""
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except Exception as exc:
            error = exc
    user_error = isinstance(error, UserError)
    message = broadcast_object(None if error is None else
                               (user_error, f"{error}" if user_error else f"{type(error).__name__}: {error}"))
    if error is not None:
        raise error
    if message is not None:
        user_error, text = message
        # A user's mistake found by rank 0 is the same mistake on every rank: one line each, no traceback.
        raise (UserError if user_error else RuntimeError)(f"rank 0 failed: {text}")
    return result


def finish(out: Path, settings: dict[str, Any], dataset: DecodedImageDataset, num_shards: int, seq_len: int,
           vocab_size: int, views: int, logger: logging.Logger) -> dict[str, Any] | None:
    """Rank 0, after every rank is done: the manifest when all shards are complete, else None."""
    complete = completed_shards(out)
    missing = sorted(set(range(num_shards)) - set(complete))
    if missing:
        logger.info(f"{num_shards - len(missing)}/{num_shards} shards complete; rerun the same command to "
                    f"extract the remaining {len(missing)} (no manifest written yet)")
        return None
    stats = _collect_stats(out, complete)
    rows = sum(_num_rows(out / shard_files(k)["labels"]) for k in complete)
    if rows != len(dataset) - stats.num_skipped:
        raise RuntimeError(f"the shards hold {rows} rows but {len(dataset)} images minus {stats.num_skipped} "
                           f"skipped is {len(dataset) - stats.num_skipped}: some shard is inconsistent")
    meta = {**settings, "classes": list(dataset.classes), "num_classes": dataset.num_classes,
            "bad_files": stats.to_dict()}
    manifest = write_manifest(out, seq_len, vocab_size, views, meta)
    logger.info(f"wrote {out / MANIFEST}: {manifest['num_items']} items; {stats.summary()}")
    return manifest


def _num_rows(path: Path) -> int:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False).shape[0]
    except (OSError, ValueError, EOFError) as error:
        raise CorruptFileError(f"{path} is truncated or corrupt ({type(error).__name__}: {error}); delete it and "
                               "rerun the same command to redo its shard") from None


def _iterate(loader: DataLoader, plan: list[tuple[int, list[int]]]) -> Iterator[tuple[int, bool, ImageBatch]]:
    """(shard id, is the shard's last batch, batch) in plan order."""
    for i, ((shard_id, _), batch) in enumerate(zip(plan, loader, strict=True)):
        last = i + 1 == len(plan) or plan[i + 1][0] != shard_id
        yield shard_id, last, batch


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    """Extract this rank's missing shards; returns the manifest when all shards are complete."""
    # -- distributed -------------------------------------------------------------------------
    # Ranks only meet at the start and the end; a resumed run can leave some with far more shards
    # to do than others, so the final barrier may legitimately wait for hours.
    env: DistEnv = setup_distributed(args.device, timeout_minutes=BARRIER_TIMEOUT_MINUTES)
    check_args(args)

    # -- data and tokenizer, both checked before the output folder is created -------------------
    # uint8 crops: a quarter of the bytes through the workers, pinned memory and the copy to the device.
    transform = (TenCrop(args.image_size, TEN_CROP_RATIO, uint8=True) if args.ten_crop
                 else CenterCrop(args.image_size, uint8=True))
    dataset = open_images(args.data_path, transform, max_image_pixels=args.max_image_pixels)
    tokenizer = DARTokenizer.from_pretrained(args.tokenizer_ckpt, args.tokenizer_filename, device=env.device).eval()
    tokenizer.requires_grad_(False)
    seq_len = tokenizer.config.num_all_queries
    vocab_size = tokenizer.config.vq_codebook_size

    out = Path(args.out)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    logger = create_logger("extract_codes", out, env.is_main)

    num_images = len(dataset)
    num_shards = -(-num_images // args.shard_size)
    settings = settings_of(args, num_images)
    on_rank0(env, lambda: pin_settings(out, settings))
    # One view of what is done, taken before anyone writes, so the split below is the same on every
    # rank; the pending shards (not k % world_size) are dealt out, which keeps a resume balanced.
    done = set(broadcast_object(completed_shards(out) if env.is_main else None))
    stray = sorted(s for s in done if s >= num_shards)
    if stray:
        raise ExtractionError(f"{out} holds shards {stray} beyond the {num_shards} this dataset needs")
    mine = [k for k in range(num_shards) if k not in done][env.rank :: env.world_size]
    if args.max_shards is not None:
        mine = mine[: args.max_shards]
    plan = shard_batches(mine, args.shard_size, num_images, args.batch_size)
    logger.info(
        f"{num_images} images in {num_shards} shards of {args.shard_size}; {len(done)} already complete; "
        f"{settings['views']} views ({num_views(args)} per image), {seq_len} codes each, world size {env.world_size}"
    )
    loader = DataLoader(
        dataset,
        batch_sampler=[indices for _, indices in plan],
        num_workers=args.num_workers,
        collate_fn=collate_skip_bad,
        pin_memory=env.device.type == "cuda",
        persistent_workers=args.num_workers > 0,
    )

    # -- loop ---------------------------------------------------------------------------------
    parts: dict[str, list[torch.Tensor]] = {"codes": [], "labels": [], "indices": []}
    shard_stats = BadFileStats()
    progress = tqdm(total=sum(len(b) for _, b in plan), unit="img", disable=not env.is_main, desc="encode")
    for shard_id, last, batch in _iterate(loader, plan):
        shard_stats.update(batch.stats)
        if batch.labels.numel():
            images = to_model_range(batch.images.to(env.device, non_blocking=True))
            parts["codes"].append(encode_views(tokenizer, images, args.flip, args.precision).cpu())
            parts["labels"].append(batch.labels)
            parts["indices"].append(batch.indices)
        progress.update(batch.stats.seen)
        if last:
            empty = not parts["codes"]  # every image of the shard was bad: an empty, complete shard
            codes = torch.empty(0, num_views(args), seq_len, dtype=torch.long) if empty else torch.cat(parts["codes"])
            labels = torch.empty(0, dtype=torch.long) if empty else torch.cat(parts["labels"])
            indices = torch.empty(0, dtype=torch.long) if empty else torch.cat(parts["indices"])
            atomic_write_text(out / _STATS_FILE.format(shard_id), json.dumps(shard_stats.to_dict()) + "\n")
            write_shard(out, shard_id, codes, labels, indices, vocab_size)
            parts = {"codes": [], "labels": [], "indices": []}
            shard_stats = BadFileStats()
    progress.close()

    # -- manifest -----------------------------------------------------------------------------
    barrier()
    manifest = on_rank0(env, lambda: finish(out, settings, dataset, num_shards, seq_len, vocab_size,
                                            num_views(args), logger))
    cleanup_distributed()
    return manifest


def cli(argv: list[str] | None = None) -> int:
    """``python -m tokenizer.extract_codes ARGV`` run in this process (argv None: ``sys.argv[1:]``);
    returns the exit status instead of exiting."""
    return call_cli(lambda: main(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(cli())
