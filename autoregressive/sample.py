"""Sample a grid of class-conditional images, optionally with streaming previews and a GIF.

    python -m autoregressive.sample --gpt-ckpt showlab/D-AR --gpt-preset GPT-L \\
        --tokenizer-ckpt showlab/D-AR --labels 207,360,387,974 --cfg-scale 1.2,8.0 --out grid.png \\
        --previews previews.png --gif stream.gif

Outputs (all uint8 through :func:`utils.images.to_uint8`):

- ``--out``: one row per label, ``--samples-per-label`` images per row.
- ``--previews``: one row per sample, one column per code group: the preview after k groups
  (docs/method.md §1 "Groups"); the last column is the final image. ``--previews-per-label K`` keeps the first
  K samples of each label (the same images as in the grid), so a strip stays readable for many samples.
- ``--gif``: one frame per code group, each frame the whole grid at that point of the stream.

Image j of label row r has index r·n + j and seed ``image_seed(--seed, index)``, so a sample does
not change when other labels are added or the batch size changes.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from autoregressive.generate import GuidanceSchedule, SamplingOptions
from autoregressive.config import GPT_PRESETS
from autoregressive.model import GPT, GPTLoadError
from autoregressive.stream import check_pair, image_seed, sample_images, stream
from tokenizer.model import DARTokenizer
from utils.checkpoint_kind import WrongModelError
from utils.distributed import resolve_device
from utils.cli import (
    OneLineArgumentParser, guidance_scale, non_negative_float, non_negative_int, positive_int, top_p_float,
)
from utils.errors import UserError, call_cli
from utils.images import make_grid, save_gif, save_grid, to_uint8
from utils.training import autocast, default_precision

# What the model flags accept, for messages about a checkpoint of the wrong model.
GPT_CKPT_ACCEPTS = ("a GPT save_pretrained folder such as RUN/final, a .safetensors/.pt file, "
                    "RUN/checkpoints/latest of autoregressive.train, or showlab/D-AR with --gpt-preset")
TOKENIZER_CKPT_ACCEPTS = ("a tokenizer save_pretrained folder such as RUN/final, a .safetensors/.pt file, "
                          "RUN/checkpoints/latest of tokenizer.train, or showlab/D-AR")
GPT_FLAGS = {"preset": "--gpt-preset", "ema": "--ema", "filename": "--gpt-file"}
# --gpt-dtype: what the GPT's weights (and so its KV cache) are cast to after loading.
GPT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# Shared by the sampling CLIs (sample, layout, sample_ddp)
# ------------------------------------------------------------------------------------------------
class FlagError(UserError, ValueError):
    """A flag whose value is wrong for the models it is used with (checked after they are loaded)."""


def cfg_scale_arg(text: str) -> GuidanceSchedule:
    """argparse ``type`` of ``--cfg-scale``: "S" or "START,END" (:func:`utils.cli.guidance_scale`)."""
    return GuidanceSchedule.from_value(guidance_scale(text))


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Checkpoint, device and precision flags."""
    group = parser.add_argument_group("models")
    group.add_argument("--gpt-ckpt", required=True,
                       help="GPT: save_pretrained folder, .safetensors/.pt file, RUN/checkpoints/latest, "
                            "or hub repo id (showlab/D-AR)")
    group.add_argument("--gpt-file", default=None, help="file inside --gpt-ckpt when it is a hub repo")
    group.add_argument("--gpt-preset", "--gpt-model", dest="gpt_preset", default=None, choices=sorted(GPT_PRESETS),
                       help="architecture for files that carry no config (official .pt files)")
    group.add_argument("--ema", action="store_true", help="load the 'ema' weights of a training checkpoint")
    group.add_argument("--tokenizer-ckpt", "--vq-ckpt", dest="tokenizer_ckpt", required=True,
                       help="tokenizer: save_pretrained folder, .safetensors/.pt file, RUN/checkpoints/latest, "
                            "or hub repo id")
    group.add_argument("--tokenizer-file", default=None, help="file inside --tokenizer-ckpt when it is a hub repo")
    group.add_argument("--tokenizer-config", default=None, help="tokenizer preset or YAML overriding the stored one")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)")
    group.add_argument("--precision", "--mixed-precision", dest="precision", default=None,
                       choices=("fp32", "bf16", "fp16"),
                       help="autocast dtype of GPT and tokenizer (default: bf16 on CUDA, fp32 on CPU)")
    group.add_argument("--gpt-dtype", default="fp32", choices=tuple(GPT_DTYPES),
                       help="dtype of the GPT's weights and KV cache; bf16 casts them as the official FID "
                            "sampler does (the tokenizer keeps its fp32 weights either way)")
    group.add_argument("--compile", action="store_true", help="torch.compile the GPT decode step")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """Guidance, token-selection and pixel-sampler flags (paper defaults: no top-k/top-p, T = 1)."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--cfg-scale", default="1.0", type=cfg_scale_arg,
                       help="guidance scale: 'S' constant or 'START,END' linear over the codes (paper: 1.1,8.0)")
    group.add_argument("--temperature", type=non_negative_float, default=1.0)
    group.add_argument("--top-k", type=non_negative_int, default=0, help="0 = off")
    group.add_argument("--top-p", type=top_p_float, default=1.0, help="in (0, 1]; 1.0 = off")
    group.add_argument("--sampler", default="adams2", choices=("adams2", "euler"), help="pixel-decoder ODE solver")
    group.add_argument("--seed", "--global-seed", dest="seed", type=non_negative_int, default=0,
                       help="global seed; image i uses image_seed(seed, i)")


def check_model_args(args: argparse.Namespace) -> None:
    """Mistakes in the model flags that need no loading (call after the device check)."""
    for ckpt, name, file_flag in ((args.gpt_ckpt, args.gpt_file, "--gpt-file"),
                                  (args.tokenizer_ckpt, args.tokenizer_file, "--tokenizer-file")):
        if name is not None and Path(ckpt).expanduser().is_file():
            raise UserError(f"{ckpt} is a file; drop {file_flag} (it picks a file inside a folder or hub repo)")


def check_output_path(path: str | os.PathLike, flag: str, folder: bool = False) -> None:
    """Refuse an output path that cannot be written, before any work (and before any output) is done.

    A file output must not be an existing folder (a folder output not an existing file); the nearest
    existing ancestor must be a writable folder (missing folders are created when writing).
    """
    target = Path(path).expanduser()
    if folder and target.exists() and not target.is_dir():
        raise UserError(f"{flag} {path} is a file; pass a folder (it is created if missing)")
    if not folder and target.is_dir():
        raise UserError(f"{flag} {path} is a folder; pass a file name inside it")
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{flag} {path}: {ancestor} is a file, so no folder can be made under it")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {ancestor} is not writable; pick another location")


def load_models(args: argparse.Namespace, device: torch.device) -> tuple[GPT, DARTokenizer]:
    """The eval-mode GPT and tokenizer named by :func:`add_model_args` flags, on ``device``.

    Library messages name ``from_pretrained``'s arguments; here they are reworded with the flags.
    """
    check_model_args(args)
    try:
        gpt = GPT.from_pretrained(args.gpt_ckpt, filename=args.gpt_file, preset=args.gpt_preset, ema=args.ema,
                                  map_location=device)
    except WrongModelError as error:
        raise error.for_flag("--gpt-ckpt", GPT_CKPT_ACCEPTS) from None
    except GPTLoadError as error:
        raise error.for_flags(GPT_FLAGS) from None
    try:
        tokenizer = DARTokenizer.from_pretrained(args.tokenizer_ckpt, filename=args.tokenizer_file,
                                                 config=args.tokenizer_config, device=device)
    except WrongModelError as error:
        raise error.for_flag("--tokenizer-ckpt", TOKENIZER_CKPT_ACCEPTS) from None
    check_pair(gpt, tokenizer)
    # Weights, not autocast: the GPT then computes in bf16 and allocates its KV cache in bf16 too.
    gpt = gpt.to(GPT_DTYPES[getattr(args, "gpt_dtype", None) or "fp32"])
    return gpt.eval(), tokenizer.eval()


def check_label_flag(labels: Sequence[int], gpt: GPT, flag: str = "--labels") -> None:
    """Sampling labels must be real classes of this GPT: [0, num_classes); the null class is guidance's."""
    num_classes = gpt.config.num_classes
    bad = sorted({label for label in labels if not 0 <= label < num_classes})
    if bad:
        null = (f"; {num_classes} is the null class, which --cfg-scale uses internally"
                if num_classes in bad and gpt.config.has_null_class else "")
        raise FlagError(f"{flag} must be in [0, {num_classes}) for this GPT ({num_classes} classes), "
                        f"got {', '.join(map(str, bad))}{null}")


def sampling_options(args: argparse.Namespace) -> SamplingOptions:
    """The :func:`add_sampling_args` flags that choose codes, as one :class:`SamplingOptions`."""
    return SamplingOptions(guidance=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """Keyword arguments of :func:`autoregressive.stream.stream` / ``sample_images`` from the flags."""
    return dict(options=sampling_options(args), sampler=args.sampler, compile=args.compile)


def precision_of(args: argparse.Namespace, device: torch.device) -> str:
    return args.precision or default_precision(device)


def parse_int_list(text: str) -> list[int]:
    """"207,360" → [207, 360]."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


# ------------------------------------------------------------------------------------------------
# This CLI
# ------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m autoregressive.sample", description=__doc__.split("\n\n")[0])
    add_model_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--labels", required=True, type=parse_int_list, help="class labels, e.g. 207,360,387")
    parser.add_argument("--samples-per-label", type=positive_int, default=4)
    parser.add_argument("--batch-size", type=positive_int, default=32, help="samples per forward pass")
    parser.add_argument("--out", required=True, help="grid PNG: one row per label")
    parser.add_argument("--previews", default=None, help="PNG strip: one row per sample, one column per group")
    parser.add_argument("--previews-per-label", type=int, default=None,
                        help="rows of --previews per label: its first K samples (default: all)")
    parser.add_argument("--gif", default=None, help="animated GIF of the whole grid, one frame per group")
    parser.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=None,
                        help="with --previews/--gif: decode group k while the GPT writes group k+1 (same images; "
                             "default: the faster path measured on the device, see autoregressive.stream)")
    args = parser.parse_args(argv)
    if args.previews_per_label is not None:
        if not 1 <= args.previews_per_label <= args.samples_per_label:
            parser.error(f"--previews-per-label must be in 1..{args.samples_per_label} (--samples-per-label), "
                         f"got {args.previews_per_label}")
        if not args.previews:
            parser.error("--previews-per-label needs --previews")
    return args


@torch.no_grad()
def generate_grid(gpt: GPT, tokenizer: DARTokenizer, labels: torch.Tensor, seeds: list[int], batch_size: int,
                  streamed: bool, precision: str, pipeline: bool | None = None,
                  **kwargs) -> tuple[np.ndarray, list[np.ndarray]]:
    """(final images uint8 (B, H, W, 3), previews per group [uint8 (B, H, W, 3)] or [] unless streamed)."""
    finals, previews = [], []
    for start in range(0, len(seeds), batch_size):
        chunk_labels, chunk_seeds = labels[start : start + batch_size], seeds[start : start + batch_size]
        with autocast(gpt.device, precision):
            if streamed:
                steps = [s.preview for s in stream(gpt, tokenizer, chunk_labels, seeds=chunk_seeds,
                                                   pipeline=pipeline, **kwargs) if s.preview is not None]
                previews.append(np.stack([to_uint8(p) for p in steps], axis=1))  # (b, groups, H, W, 3)
                finals.append(to_uint8(steps[-1]))
            else:
                _, images = sample_images(gpt, tokenizer, chunk_labels, seeds=chunk_seeds, **kwargs)
                finals.append(to_uint8(images))
    per_group = list(np.concatenate(previews).transpose(1, 0, 2, 3, 4)) if previews else []
    return np.concatenate(finals), per_group


@torch.no_grad()  # sampling only; a decorator, not a global switch, so in-process callers keep autograd
def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    args = parse_args(argv)
    device = resolve_device(args.device)  # first: a missing GPU is the first thing to say
    for flag in ("out", "previews", "gif"):
        if getattr(args, flag):
            check_output_path(getattr(args, flag), f"--{flag}")
    gpt, tokenizer = load_models(args, device)
    check_label_flag(args.labels, gpt)

    n = args.samples_per_label
    labels = torch.tensor([label for label in args.labels for _ in range(n)], device=device)
    seeds = [image_seed(args.seed, i) for i in range(labels.shape[0])]
    streamed = bool(args.previews or args.gif)
    finals, per_group = generate_grid(gpt, tokenizer, labels, seeds, args.batch_size, streamed,
                                      precision_of(args, device), pipeline=args.pipeline, **sampling_kwargs(args))

    rows = lambda images: [images[r * n : (r + 1) * n] for r in range(len(args.labels))]  # noqa: E731
    written = {"grid": save_grid(rows(finals), args.out)}
    if args.previews:
        kept = args.previews_per_label or n
        picked = [r * n + j for r in range(len(args.labels)) for j in range(kept)]
        strip = [np.stack([group[b] for group in per_group]) for b in picked]
        written["previews"] = save_grid(strip, args.previews)
    if args.gif:
        written["gif"] = save_gif([make_grid(rows(group)) for group in per_group], args.gif)
    for name, path in written.items():
        print(f"wrote {name}: {path}")
    return written


def cli(argv: list[str] | None = None) -> int:
    """``python -m autoregressive.sample ARGV`` run in this process (argv None: ``sys.argv[1:]``);
    returns the exit status instead of exiting."""
    return call_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
