"""Decoded images → 8-bit arrays, grids, PNGs and GIFs: the one place that converts model output to pixels.

The tokenizer decodes to roughly [-1, 1] without clamping; the official sampling scripts turn that
into bytes with clamp(127.5·x + 128, 0, 255) (docs/checkpoint_format.md §3.4; note the 128, not 127.5) and
truncate. Every CLI that writes pixels (grids, previews, GIFs, the FID ``.npz``) goes through
:func:`to_uint8`, so an image looks the same byte for byte wherever it is saved.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils.checkpoint import atomic_write


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in ~[-1, 1] → uint8 (B, H, W, 3), the official 8-bit conversion."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images (B, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"expected floating-point images, got {images.dtype}")
    scaled = (images.detach().float() * 127.5 + 128.0).clamp(0, 255).to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(rows: Sequence[np.ndarray], pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile rows of uint8 images (each (n_r, H, W, 3)) into one (H', W', 3) array.

    Rows may have different lengths (short rows are left blank on the right); every image shares
    H, W. ``pad`` pixels of ``fill`` separate the tiles and frame the grid.
    """
    if not rows:
        raise ValueError("make_grid needs at least one row")
    shapes = {tuple(r.shape[1:]) for r in rows}
    if len(shapes) != 1 or any(r.dtype != np.uint8 or r.ndim != 4 for r in rows):
        raise ValueError(f"every row must be uint8 (n, H, W, 3) with one shared H, W; got {sorted(shapes)}")
    height, width, channels = shapes.pop()
    cols = max(r.shape[0] for r in rows)
    grid = np.full((pad + len(rows) * (height + pad), pad + cols * (width + pad), channels), fill, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            top, left = pad + i * (height + pad), pad + j * (width + pad)
            grid[top : top + height, left : left + width] = image
    return grid


def save_png(array: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a (H, W, 3) uint8 array as a PNG, atomically; returns the path."""
    path = Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            Image.fromarray(array).save(f, format="PNG")

    atomic_write(path, write)
    return path


def save_grid(rows: Sequence[np.ndarray], path: str | os.PathLike, pad: int = 2) -> Path:
    """:func:`make_grid` then :func:`save_png`."""
    return save_png(make_grid(rows, pad=pad), path)


def save_gif(frames: Sequence[np.ndarray], path: str | os.PathLike, duration_ms: int = 400,
             last_frame_ms: int = 1500) -> Path:
    """Animated GIF of (H, W, 3) uint8 frames, looping; the final frame is held for ``last_frame_ms``."""
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    path = Path(path)
    images = [Image.fromarray(f) for f in frames]
    durations = [duration_ms] * (len(images) - 1) + [last_frame_ms]

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            images[0].save(f, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)

    atomic_write(path, write)
    return path
