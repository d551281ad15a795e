"""Reconstruct an image folder or tar shards through the tokenizer: ADM ``.npz`` pair, PSNR / SSIM and a preview grid.

    torchrun --nproc_per_node=8 -m tokenizer.reconstruct --ckpt showlab/D-AR \
        --data-path /data/imagenet/val --out results/recon_v1.npz --steps 8 --sampler adams2

(``python -m tokenizer.reconstruct ...`` runs the same thing in one process.)

Output contract
    ``--out`` (e.g. ``recon.npz``): ``arr_0`` uint8 (N, H, W, 3), the reconstructions of the first
    ``--num-images`` images of the sorted file list (all by default) in file order (tar shards: shard
    order, then tar order; ``dataset.shards``), minus files
    that cannot be decoded or have more than ``--max-image-pixels`` pixels (skipped and counted).
    ``--ref-out`` (default ``recon_ref.npz``): ``arr_0`` of the matching ADM centre-cropped inputs,
    row for row, for the ADM evaluator (rFID) or any metric.
    With ``--labels`` (class-folder trees, or shards with ``.cls`` members) both files also hold ``labels``
    int64 (N,), each image's class index (in sorted class-folder order, or its ``.cls``), so ``evaluations.class_consistency`` can judge whether the
    reconstructions still show their class.
    ``--grid`` (default ``recon.png``): ``--grid-images`` rows spread evenly over the reconstructed
    images (file order): input | reconstruction | the preview after each streaming step.
    PSNR and SSIM (``evaluations.recon``, on the uint8 images) are printed and written to ``recon.json``.

Reproducibility: the decoder noise of image ``i`` is drawn from a generator seeded by (seed, i)
(``dataset.seeding.sample_seed``), so the arrays do not depend on the batch size or world size.
Pixels go through ``utils.images.to_uint8``, the official 8-bit conversion.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from dataset.images import DEFAULT_MAX_IMAGE_PIXELS, BadFileStats, CenterCrop, collate_skip_bad, to_model_range
from dataset.shards import open_images
from dataset.seeding import sample_generator
from evaluations.recon import psnr, ssim
from tokenizer import flow
from tokenizer.model import DARTokenizer
from utils.checkpoint import atomic_write, atomic_write_text
from utils.distributed import barrier, cleanup_distributed, setup_distributed
from utils.images import save_grid, to_uint8
from utils.cli import OneLineArgumentParser, require_minimums
from utils.errors import UserError, call_cli
from utils.training import autocast


class ReconstructOptionError(UserError, ValueError):
    """A command-line value of tokenizer.reconstruct that cannot work (the message names the flag)."""


def save_reconstruction_grid(
    inputs: torch.Tensor, reconstructions: torch.Tensor, previews: list[torch.Tensor], path: str | os.PathLike
) -> Path:
    """One row per image: input | reconstruction | previews. All (B, 3, H, W) in ~[-1, 1]."""
    columns = [to_uint8(inputs), to_uint8(reconstructions), *(to_uint8(p) for p in previews)]
    rows = [np.stack([column[i] for column in columns]) for i in range(inputs.shape[0])]
    return save_grid(rows, path)


def per_image_noise(model: DARTokenizer, indices: torch.Tensor, seed: int, size: int) -> torch.Tensor:
    """(B, C, size, size) start noise, row b drawn from the generator of (seed, indices[b])."""
    channels = model.config.diff_decoder.channels
    rows = [torch.randn(1, channels, size, size, generator=sample_generator(seed, 0, int(i))) for i in indices]
    return torch.cat(rows).to(model.device)


@torch.no_grad()
def reconstruct(
    model: DARTokenizer, images: torch.Tensor, noise: torch.Tensor, steps: int, sampler: str, precision: str = "fp32"
) -> torch.Tensor:
    """images (B, 3, H, W) in [-1, 1] → reconstructions (B, 3, H, W), encode then decode from ``noise``."""
    with autocast(model.device, precision):
        codes = model.encode(images.to(model.device))
        return model.decode(codes, noise=noise, steps=steps, sampler=sampler).float()


def _npz_writer(**arrays: np.ndarray) -> Any:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, **arrays)

    return write


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m tokenizer.reconstruct", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="tokenizer folder, .pt/.safetensors file, training checkpoint or hub id")
    parser.add_argument("--ckpt-filename", default=None, help="file inside a hub repo (default: the v1 tokenizer)")
    parser.add_argument("--data-path", required=True, help="image folder (read recursively, sorted), or tar shards: a .tar, a folder of "
                        "them or a pattern like shards-{000000..000099}.tar (shard order, then tar order)")
    parser.add_argument("--out", required=True, help="reconstructions .npz (arr_0 uint8 NHWC)")
    parser.add_argument("--ref-out", default=None, help="inputs .npz (default: <out>_ref.npz)")
    parser.add_argument("--grid", default=None, help="preview grid PNG (default: <out>.png)")
    parser.add_argument("--grid-images", type=int, default=8, help="rows of the grid (0: no grid)")
    parser.add_argument("--steps", type=int, default=None, help="decoder steps (default: all S)")
    parser.add_argument("--sampler", choices=flow.SAMPLERS, default="adams2")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--num-images", type=int, default=None, help="first N images of the folder (default: all)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per rank per call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--labels", action="store_true",
                        help="also store class indices (class-folder trees or shards with .cls members) as 'labels' "
                             "in both npz files")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="skip (and count) images with more pixels, from their header, before decoding them "
                             f"(default {DEFAULT_MAX_IMAGE_PIXELS})")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """One-line errors for values that cannot work; run after the device check, before anything is read."""
    least = {"image_size": 1, "batch_size": 1, "num_images": 1, "grid_images": 0, "num_workers": 0,
             "max_image_pixels": 1, "steps": 1}
    require_minimums(args, least, ReconstructOptionError)
    if not args.out.endswith(".npz"):
        raise ReconstructOptionError(f"--out must end in .npz, got {args.out}")
    for flag, path in (("--out", args.out), ("--ref-out", args.ref_out), ("--grid", args.grid)):
        if path is not None and Path(path).is_dir():
            raise ReconstructOptionError(f"{flag} {path} is a folder; pass a file name")


def main(args: argparse.Namespace) -> dict[str, Any]:
    """Write the npz pair (+ grid, metrics JSON); returns the metrics on rank 0 (``{}`` elsewhere)."""
    # -- device first, then the arguments ------------------------------------------------------
    env = setup_distributed(args.device)
    check_args(args)
    out = Path(args.out)
    ref_out = Path(args.ref_out) if args.ref_out else out.with_name(out.stem + "_ref.npz")
    grid = Path(args.grid) if args.grid else out.with_suffix(".png")

    # -- data (checked before the model is loaded): rank r takes the images r, r + R, ... ----------
    # uint8 crops: a quarter of the bytes through the workers and the copy to the device.
    dataset = open_images(args.data_path, CenterCrop(args.image_size, uint8=True), with_labels=args.labels,
                          max_image_pixels=args.max_image_pixels)
    if args.labels and not dataset.classes:
        raise ReconstructOptionError(
            f"--labels needs a class-folder tree (one sub-folder per class) or tar shards with .cls members; "
            f"{args.data_path} has no labels")
    total = len(dataset) if args.num_images is None else min(args.num_images, len(dataset))
    mine = list(range(env.rank, total, env.world_size))
    loader = DataLoader(Subset(dataset, mine), batch_size=args.batch_size, num_workers=args.num_workers,
                        collate_fn=collate_skip_bad, persistent_workers=args.num_workers > 0)

    model = DARTokenizer.from_pretrained(args.ckpt, args.ckpt_filename, device=env.device).eval()
    steps = args.steps if args.steps is not None else model.config.num_denoising_steps
    if not 1 <= steps <= model.config.num_denoising_steps:
        raise ReconstructOptionError(f"--steps must be in 1..{model.config.num_denoising_steps}, got {steps}")

    # -- reconstruct ---------------------------------------------------------------------------
    stats = BadFileStats()
    recons, refs, indices, labels = [], [], [], []
    progress = tqdm(total=len(mine), desc="reconstruct", unit="img", disable=not env.is_main)
    for batch in loader:
        stats.update(batch.stats)
        progress.update(batch.stats.seen)
        if batch.images.shape[0] == 0:
            continue
        images = to_model_range(batch.images.to(model.device))
        noise = per_image_noise(model, batch.indices, args.seed, args.image_size)
        recon = reconstruct(model, images, noise, steps, args.sampler, args.precision)
        recons.append(to_uint8(recon))
        refs.append(to_uint8(images))
        indices.append(batch.indices.numpy())
        labels.append(batch.labels.numpy())
    progress.close()
    part = out.with_name(f".{out.name}.rank{env.rank}.npz")
    empty = np.zeros((0, args.image_size, args.image_size, 3), np.uint8)
    arrays = {
        "recon": np.concatenate(recons) if recons else empty,
        "ref": np.concatenate(refs) if refs else empty,
        "index": np.concatenate(indices) if indices else np.zeros(0, np.int64),
        "labels": np.concatenate(labels) if labels else np.zeros(0, np.int64),
    }
    atomic_write(part, _npz_writer(**arrays))
    stats = stats.all_reduce(env.device)
    barrier()

    # -- merge, metrics, grid (rank 0) -----------------------------------------------------------
    metrics: dict[str, Any] = {}
    if env.is_main:
        parts = [out.with_name(f".{out.name}.rank{r}.npz") for r in range(env.world_size)]
        loaded = [dict(np.load(p)) for p in parts]
        index = np.concatenate([p["index"] for p in loaded])
        order = np.argsort(index, kind="stable")
        recon_all = np.concatenate([p["recon"] for p in loaded])[order]
        ref_all = np.concatenate([p["ref"] for p in loaded])[order]
        if len(recon_all) == 0:
            raise UserError(f"no image under {args.data_path} could be decoded ({stats.summary()})")
        extra = {"labels": np.concatenate([p["labels"] for p in loaded])[order]} if args.labels else {}
        atomic_write(out, _npz_writer(arr_0=recon_all, **extra))
        atomic_write(ref_out, _npz_writer(arr_0=ref_all, **extra))
        for p in parts:
            p.unlink()
        psnr_values, ssim_values = [], []
        for start in tqdm(range(0, len(recon_all), 256), desc="PSNR/SSIM", unit="chunk"):
            a = torch.from_numpy(ref_all[start : start + 256]).permute(0, 3, 1, 2)
            b = torch.from_numpy(recon_all[start : start + 256]).permute(0, 3, 1, 2)
            psnr_values.append(psnr(a, b))
            ssim_values.append(ssim(a, b))
        metrics = {
            "psnr": torch.cat(psnr_values).mean().item(), "ssim": torch.cat(ssim_values).mean().item(),
            "num_images": int(len(recon_all)), "steps": steps, "sampler": args.sampler, "seed": args.seed,
            "bad_files": stats.to_dict(),
        }
        atomic_write_text(out.with_suffix(".json"), json.dumps(metrics, indent=2) + "\n")
        if args.grid_images:
            # Rows spread evenly over the reconstructed images, so a class-sorted folder shows every class.
            count = min(args.grid_images, len(recon_all))
            rows = np.unique(np.linspace(0, len(recon_all) - 1, count).round().astype(int))
            picked = np.sort(index)[rows]
            inputs = to_model_range(torch.stack([dataset[int(i)].image for i in picked]))
            noise = per_image_noise(model, torch.from_numpy(picked), args.seed, args.image_size)
            with autocast(model.device, args.precision):
                codes = model.encode(inputs.to(model.device))
                previews = model.previews(codes, noise=noise, sampler=args.sampler, steps=steps)
            recon_grid = torch.from_numpy(recon_all[rows]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            save_reconstruction_grid(inputs, recon_grid, [p.float() for p in previews], grid)
        print(f"{len(recon_all)} images, {steps} {args.sampler} steps: PSNR {metrics['psnr']:.3f} dB, "
              f"SSIM {metrics['ssim']:.4f} ({stats.summary()})")
        print(f"wrote {out} and {ref_out}" + (f", grid {grid}" if args.grid_images else ""))
    barrier()
    cleanup_distributed()
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """``python -m tokenizer.reconstruct ARGV`` run in this process (argv None: ``sys.argv[1:]``);
    returns the exit status instead of exiting."""
    return call_cli(lambda: main(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(cli())
