"""Zero-shot layout control (docs/method.md §2 "Layout control"): keep a reference image's first code groups.

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
from autoregressive.sample import (FlagError, add_model_args, add_sampling_args,
                                   check_label_flag, check_output_path, load_models, non_negative_int,
                                   parse_int_list, positive_int, precision_of, sampling_kwargs)
from autoregressive.stream import check_pair, image_seed, sample_images, seeded_noise
from dataset.images import SkipImage, arr_to_tensor, center_crop_arr, decode_rgb
from tokenizer.model import DARTokenizer
from utils.distributed import resolve_device
from utils.cli import OneLineArgumentParser
from utils.errors import UserError, call_cli, require_path
from utils.images import save_grid, to_uint8
from utils.training import autocast

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
    require_path(path)
    try:
        image, _ = decode_rgb(path)
    except SkipImage as error:
        raise UserError(f"{path} cannot be used as an image ({error})") from None
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
    parser = OneLineArgumentParser(prog="python -m autoregressive.layout", description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--reference", required=True, help="reference image file")
    parser.add_argument("--labels", required=True, type=parse_int_list, help="class labels, e.g. 207,360")
    parser.add_argument("--prefix-groups", type=non_negative_int, required=True,
                        help="code groups taken from the reference")
    parser.add_argument("--samples-per-label", type=positive_int, default=4)
    parser.add_argument("--out", required=True, help="grid PNG: reference | reconstruction | samples, per label")
    return parser.parse_args(argv)


@torch.no_grad()  # sampling only; a decorator, not a global switch, so in-process callers keep autograd
def main(argv: Sequence[str] | None = None) -> LayoutResult:
    args = parse_args(argv)
    device = resolve_device(args.device)  # first: a missing GPU is the first thing to say
    require_path(args.reference, "--reference")
    check_output_path(args.out, "--out")
    gpt, tokenizer = load_models(args, device)
    check_label_flag(args.labels, gpt)
    num_groups = tokenizer.config.num_query_groups
    if args.prefix_groups > num_groups:
        raise FlagError(f"--prefix-groups {args.prefix_groups} is too large: prefix_groups must be in "
                        f"0..{num_groups} (the tokenizer's code groups)")

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


def cli(argv: list[str] | None = None) -> int:
    """``python -m autoregressive.layout ARGV`` run in this process (argv None: ``sys.argv[1:]``);
    returns the exit status instead of exiting."""
    return call_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
