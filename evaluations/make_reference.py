"""Build an ADM-style reference batch from an image folder.

    python -m evaluations.make_reference --data-path IMAGES --out ref.npz [--image-size 256] [--num 50000]

Each image gets ADM's centre crop (BOX halvings while the short side is >= 2x the size, one BICUBIC
resize of the short side to the size, central square). The output holds ``arr_0`` (uint8
[N, S, S, 3], in folder order) plus ``mu``, ``sigma``, ``mu_s``, ``sigma_s`` of its Inception
features, i.e. the layout of ADM's ``VIRTUAL_imagenet256_labeled.npz``, so
``evaluations.evaluator`` uses the stored statistics for FID / sFID and ``arr_0`` for
precision/recall. This is how tokenizer rFID on ImageNet-val is measured: the reference from the
50k validation images, the samples from their reconstructions.

Files the dataset code cannot decode, or with more than ``--max-image-pixels`` pixels, are skipped
and counted (never silently kept); folders with more than ``--num`` images contribute a seeded
random subset.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from dataset.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    BadFileStats,
    ImageFolderDataset,
    center_crop_arr,
    collate_skip_bad,
)
from evaluations.evaluator import default_batch_size
from evaluations.inception import load_fid_inception
from evaluations.metrics import feature_statistics
from utils.checkpoint import atomic_write
from utils.distributed import resolve_device
from utils.cli import OneLineArgumentParser
from utils.errors import UserError, call_cli


@dataclass(frozen=True)
class Uint8CenterCrop:
    """ADM centre crop as a uint8 (S, S, 3) tensor: the pixels ADM batches store."""

    image_size: int

    def __call__(self, image: Image.Image, generator: torch.Generator) -> torch.Tensor:
        return torch.from_numpy(np.array(center_crop_arr(image, self.image_size)))  # writable copy


def _subset_indices(total: int, num: int, seed: int) -> list[int]:
    if num >= total:
        return list(range(total))
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:num]
    return sorted(chosen.tolist())


def make_reference(
    data_path: str | os.PathLike,
    out: str | os.PathLike,
    image_size: int = 256,
    num: int = 50000,
    *,
    weights: str | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    num_workers: int = 4,
    seed: int = 0,
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> dict[str, Any]:
    """Write the reference batch to ``out``; return {"num_images", "skipped", "bad_files"}.

    Checked in this order, before anything is written: the device, the numbers, the folder.
    """
    device = resolve_device(device)
    for flag, value, least in (("--image-size", image_size, 1), ("--num", num, 2), ("--num-workers", num_workers, 0),
                               ("--batch-size", 1 if batch_size is None else batch_size, 1),
                               ("--max-image-pixels", 1 if max_image_pixels is None else max_image_pixels, 1)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if Path(out).is_dir():
        raise UserError(f"--out {out} is a folder; pass the .npz file to write")
    batch_size = default_batch_size(device) if batch_size is None else batch_size
    dataset = ImageFolderDataset(data_path, Uint8CenterCrop(image_size), with_labels=False,
                                 max_image_pixels=max_image_pixels)
    indices = _subset_indices(len(dataset), num, seed)
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skip_bad,
    )
    model = load_fid_inception(weights, device=device)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Crops go to a disk-backed buffer: 50k crops at 256 are 9.8 GB, and the final count (after
    # skipped files) is only known at the end, when the .npz header has to be written.
    scratch = out.with_name(f".{out.name}.arr_0.npy")
    shape = (len(indices), image_size, image_size, 3)
    images = np.lib.format.open_memmap(scratch, mode="w+", dtype=np.uint8, shape=shape)
    try:
        bad = BadFileStats()
        pool, spatial = [], []
        count = 0
        for batch in tqdm(loader, desc="reference", unit="batch", total=len(loader)):
            bad.update(batch.stats)
            if batch.images.numel() == 0:
                continue
            crops = batch.images  # (B', S, S, 3) uint8
            images[count : count + len(crops)] = crops.numpy()
            count += len(crops)
            feats = model(crops)
            pool.append(feats["pool"].cpu().numpy())
            spatial.append(feats["spatial"].cpu().numpy())
        if count < 2:
            raise UserError(f"only {count} readable images under {data_path} ({bad.summary()}); "
                            "a reference needs at least 2")
        mu, sigma = feature_statistics(np.concatenate(pool))
        mu_s, sigma_s = feature_statistics(np.concatenate(spatial))
        images.flush()

        def write(tmp: str) -> None:
            # A file object keeps np.savez from appending ".npz"; savez streams the memmap in chunks.
            with open(tmp, "wb") as f:
                np.savez(f, arr_0=images[:count], mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)

        atomic_write(out, write)
    finally:
        del images
        scratch.unlink(missing_ok=True)
    return {"num_images": count, "skipped": bad.num_skipped, "bad_files": bad.to_dict()}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(
        prog="python -m evaluations.make_reference",
        description="Build an ADM-style reference batch (arr_0 + FID statistics).",
    )
    parser.add_argument("--data-path", required=True, help="image folder (class folders or flat, recursive)")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--image-size", type=int, default=256, help="ADM centre-crop size")
    parser.add_argument("--num", type=int, default=50000, help="at most this many images (seeded subset if more)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset when the folder has more than --num")
    parser.add_argument("--weights", default=None, help="FID Inception weights (see evaluations.evaluator --help)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="Inception images per forward pass (default: 128 on a GPU, 10 on a CPU)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)")
    parser.add_argument("--num-workers", type=int, default=4, help="image decoding processes")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="skip images with more pixels, from their header, before decoding them "
                             f"(default {DEFAULT_MAX_IMAGE_PIXELS})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    summary = make_reference(
        args.data_path,
        args.out,
        args.image_size,
        args.num,
        weights=args.weights,
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.num_workers,
        seed=args.seed,
        max_image_pixels=args.max_image_pixels,
    )
    print(f"wrote {args.out}: {summary['num_images']} images ({summary['skipped']} unreadable files skipped)")
    return summary


def cli(argv: list[str] | None = None) -> int:
    """``python -m evaluations.make_reference ARGV`` run in this process (argv None: ``sys.argv[1:]``);
    returns the exit status instead of exiting."""
    return call_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
