"""Zero-shot layout control (SPEC §2 "Layout control"): keep a reference image's first code groups.

    python -m autoregressive.layout --gpt-ckpt showlab/D-AR --gpt-preset GPT-L --tokenizer-ckpt showlab/D-AR \\
        --reference dog.jpg --labels 207,360 --prefix-groups 2 --cfg-scale 1.2,8.0 --out layout.png

The reference is ADM centre-cropped to the tokenizer's resolution and encoded; its first
k·N/G codes are forced as ``prefix_codes`` and the GPT writes the rest for each label. Early groups
condition the noisiest denoising steps, so they fix the coarse layout and colours while the class
and the later groups decide the content. The grid has one row per label:
reference | its reconstruction | samples. Seeds follow :mod:`autoregressive.sample`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from autoregressive.model import GPT
from autoregressive.sample import (add_model_args, add_sampling_args, load_models, parse_int_list, precision_of,
                                   sampling_kwargs)
from autoregressive.stream import check_pair, image_seed, sample_images, seeded_noise
from dataset.images import arr_to_tensor, center_crop_arr, decode_rgb
from tokenizer.model import DARTokenizer
from utils.distributed import resolve_device
from utils.images import save_grid, to_uint8
from utils.training import autocast
from utils.errors import run_cli

# Index under which the reconstruction's noise is seeded (image_seed(seed, RECONSTRUCTION_INDEX)); samples
# use 0..B-1, so a very large index keeps the two apart.
RECONSTRUCTION_INDEX = 2**40


@dataclass(frozen=True)
class LayoutResult:
    reference_codes: torch.Tensor  # (1, N) codes of the cropped reference
    prefix: torch.Tensor  # (k·N/G,) the forced codes
    codes: torch.Tensor  # (L·n, N) sampled codes, label-major
    grid_path: Path


def load_reference(path: str | Path, resolution: int) -> torch.Tensor:
    """Image file → (1, 3, R, R) in [-1, 1] after the ADM centre crop (the tokenizer's training crop)."""
    image, _ = decode_rgb(path)
    return arr_to_tensor(center_crop_arr(image, resolution))[None]


@torch.no_grad()
def layout_samples(gpt: GPT, tokenizer: DARTokenizer, reference: torch.Tensor, labels: torch.Tensor,
                   prefix_groups: int, seed: int, **kwargs) -> tuple[torch.Tensor, torch.Tensor,
                                                                     torch.Tensor, torch.Tensor]:
    """Encode reference (1, 3, R, R), force its first ``prefix_groups`` groups, sample labels (B,).

    Sample i is seeded by ``image_seed(seed, i)``; ``kwargs`` go to :func:`sample_images`. Returns
    (reference codes (1, N), reconstruction (1, 3, R, R), codes (B, N), images (B, 3, R, R)).
    """
    per_group = check_pair(gpt, tokenizer)
    num_groups = tokenizer.config.num_query_groups
    if not 0 <= prefix_groups <= num_groups:
        raise ValueError(f"prefix_groups must be in 0..{num_groups}, got {prefix_groups}")
    # Nearest-codebook search in fp32 even under autocast: bf16 distances can pick a different code.
    with torch.autocast(tokenizer.device.type, enabled=False):
        reference_codes = tokenizer.encode(reference.to(tokenizer.device))  # (1, N)
    noise = seeded_noise(tokenizer, [image_seed(seed, RECONSTRUCTION_INDEX)])
    reconstruction = tokenizer.decode(reference_codes, noise=noise, sampler=kwargs.get("sampler", "adams2"))
    prefix = reference_codes[0, : prefix_groups * per_group].to(gpt.device)
    seeds = [image_seed(seed, i) for i in range(labels.shape[0])]
    codes, images = sample_images(gpt, tokenizer, labels, seeds=seeds, prefix_codes=prefix, **kwargs)
    return reference_codes, reconstruction, codes, images


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m autoregressive.layout", description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--reference", required=True, help="reference image file")
    parser.add_argument("--labels", required=True, type=parse_int_list, help="class labels, e.g. 207,360")
    parser.add_argument("--prefix-groups", type=int, required=True, help="code groups taken from the reference")
    parser.add_argument("--samples-per-label", type=int, default=4)
    parser.add_argument("--out", required=True, help="grid PNG: reference | reconstruction | samples, per label")
    args = parser.parse_args(argv)
    if args.samples_per_label < 1:
        parser.error("--samples-per-label must be positive")
    return args


@torch.no_grad()  # sampling only; a decorator, not a global switch, so in-process callers keep autograd
def main(argv: Sequence[str] | None = None) -> LayoutResult:
    args = parse_args(argv)
    device = resolve_device(args.device)
    gpt, tokenizer = load_models(args, device)

    reference = load_reference(args.reference, tokenizer.config.sampling_resolution)
    n = args.samples_per_label
    labels = torch.tensor([label for label in args.labels for _ in range(n)], device=device)
    with autocast(device, precision_of(args, device)):
        reference_codes, reconstruction, codes, images = layout_samples(
            gpt, tokenizer, reference, labels, args.prefix_groups, args.seed, **sampling_kwargs(args))

    head = np.concatenate([to_uint8(reference), to_uint8(reconstruction)])  # (2, R, R, 3)
    samples = to_uint8(images)
    rows = [np.concatenate([head, samples[r * n : (r + 1) * n]]) for r in range(len(args.labels))]
    path = save_grid(rows, args.out)
    print(f"wrote layout grid: {path}")
    return LayoutResult(reference_codes=reference_codes.cpu(),
                        prefix=reference_codes[0, : args.prefix_groups * check_pair(gpt, tokenizer)].cpu(),
                        codes=codes.cpu(), grid_path=path)


if __name__ == "__main__":
    run_cli(main)
