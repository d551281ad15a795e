"""Class consistency of class-conditional samples, judged by a small classifier trained on real data.

FID says whether samples look like the data; it does not say whether a sample asked to be a "sneaker"
is one. This module trains a small CNN on the labelled training images, reports its accuracy on the
held-out real images (the ceiling: how well the judge itself does), and then the share of generated
samples it assigns to the class they were generated for. A class consistency close to the held-out
accuracy means the generator follows its labels as well as real data can be told apart.

CLI::

    python -m evaluations.class_consistency --train-data DIR --test-data DIR \
        --samples samples.npz [--image-size 32] [--epochs 3] [--json out.json]

``samples.npz`` holds ``arr_0`` uint8 [N, H, W, 3] and ``labels`` int [N] (what ``autoregressive.sample_ddp``
writes). ``--also NAME=other.npz`` (repeatable) judges more labelled sets with the same classifier, e.g. the
tokenizer's reconstructions of the held-out images (``tokenizer.reconstruct --labels``): how much class
identity survives encoding and decoding, next to how much the generator's samples show.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tqdm.auto import tqdm

from dataset.images import CenterCrop, ImageFolderDataset, collate_skip_bad
from evaluations.evaluator import NpzContentError, check_images, open_npz_array
from utils.checkpoint import atomic_write_text
from utils.distributed import resolve_device
from utils.cli import OneLineArgumentParser
from utils.errors import UserError, call_cli, require_path


class SmallConvNet(nn.Module):
    """Three conv stages + linear head: ~85% on held-out Fashion-MNIST after two CPU epochs on 6k images."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        self.features = nn.Sequential(stage(3, width), stage(width, 2 * width), stage(2 * width, 4 * width))
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, 3, H, W) in [-1, 1] -> logits (B, num_classes)
        return self.head(self.features(x).mean(dim=(2, 3)))


def load_labelled_images(root: str | Path, image_size: int) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """All images of a class-folder tree as ([N,3,H,W] in [-1,1], labels [N], class names)."""
    dataset = ImageFolderDataset(root, CenterCrop(image_size))
    items = [dataset[i] for i in tqdm(range(len(dataset)), desc=f"read {Path(root).name}", unit="img")]
    batch = collate_skip_bad(items)
    if batch.images.numel() == 0:
        raise UserError(f"no image under {root} could be decoded ({batch.stats.summary()})")
    return batch.images, batch.labels, tuple(dataset.classes)


def uint8_nhwc_to_tensor(images: np.ndarray) -> torch.Tensor:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 [N,H,W,3] images, got {images.dtype} {images.shape}")
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, num_classes: int, epochs: int = 3, batch_size: int = 128,
    lr: float = 2e-3, seed: int = 0, device: torch.device | str = "cpu",
) -> SmallConvNet:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallConvNet(num_classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1))
    model.train()
    progress = tqdm(total=steps, desc="train judge", unit="step")
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            x = images[idx].to(device)
            # Random horizontal flips: garments are roughly mirror-symmetric, and it regularises the judge.
            flip = torch.rand(len(idx), generator=generator) < 0.5
            x[flip.to(device)] = x[flip.to(device)].flip(-1)
            loss = F.cross_entropy(model(x), labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.update()
    progress.close()
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    device = next(model.parameters()).device
    batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
    return torch.cat([model(batch.to(device)).argmax(-1).cpu() for batch in batches])


def judge_samples(
    model: nn.Module, classes: tuple[str, ...], images: np.ndarray, labels: np.ndarray, size: tuple[int, int]
) -> dict[str, Any]:
    """Share of ``images`` (uint8 NHWC) that ``model`` assigns to their ``labels``, overall and per class."""
    check_labels(images, labels, len(classes))
    wanted = torch.from_numpy(np.asarray(labels)).long()
    samples = uint8_nhwc_to_tensor(images)
    if samples.shape[-2:] != size:
        samples = F.interpolate(samples, size=size, mode="bilinear", antialias=True, align_corners=False)
    overall, per_class = agreement(predict(model, samples), wanted, classes)
    return {"class_consistency": overall, "class_consistency_per_class": per_class, "num_samples": int(len(wanted))}


class LabelError(UserError, ValueError):
    """Labels that do not fit the images or the classes of the training folders."""


def check_labels(images: np.ndarray, labels: np.ndarray, num_classes: int, name: str = "samples") -> None:
    if len(images) != len(labels):
        raise LabelError(f"{name}: {len(images)} images but {len(labels)} labels; store one label per image")
    labels = np.asarray(labels)
    if not len(labels):
        return
    if not (np.issubdtype(labels.dtype, np.integer) and 0 <= labels.min() <= labels.max() < num_classes):
        raise LabelError(
            f"{name}: labels must be class indices in 0..{num_classes - 1}, got {labels.dtype} "
            f"{labels.min()}..{labels.max()}; the classes are the sorted class folders of the training data"
        )


def agreement(
    predicted: torch.Tensor, wanted: torch.Tensor, classes: tuple[str, ...]
) -> tuple[float, dict[str, float]]:
    """(share of predicted == wanted, the same per wanted class that occurs)."""
    per_class = {
        classes[c]: float((predicted[wanted == c] == c).float().mean())
        for c in range(len(classes))
        if (wanted == c).any()
    }
    return float((predicted == wanted).float().mean()), per_class


def class_consistency(
    train_dir: str | Path, test_dir: str | Path, sample_images: np.ndarray, sample_labels: np.ndarray,
    image_size: int, epochs: int = 3, seed: int = 0, device: torch.device | str = "cpu",
    also: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Train the judge, then score the samples (and every ``also`` set under ``result["also"][name]``)."""
    train_x, train_y, classes = load_labelled_images(train_dir, image_size)
    test_x, test_y, test_classes = load_labelled_images(test_dir, image_size)
    if classes != test_classes:
        raise LabelError(f"train and test class folders differ: {classes} vs {test_classes}; "
                         "pass two folders with the same class sub-folders")
    # Refuse bad labels before spending minutes on the judge.
    for name, (x, y) in {"samples": (sample_images, sample_labels), **(also or {})}.items():
        check_labels(x, y, len(classes), name)
    model = train_classifier(train_x, train_y, len(classes), epochs=epochs, seed=seed, device=device)
    size = tuple(test_x.shape[-2:])
    accuracy, accuracy_per_class = agreement(predict(model, test_x), test_y, classes)
    result = {
        "classifier_heldout_accuracy": accuracy,
        "classifier_heldout_accuracy_per_class": accuracy_per_class,
        **judge_samples(model, classes, sample_images, sample_labels, size),
    }
    if also:
        result["also"] = {name: judge_samples(model, classes, x, y, size) for name, (x, y) in also.items()}
    return result


def load_labelled_npz(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, H, W, 3] images, [N] labels) of an npz, each checked; mistakes name the file."""
    images = check_images(path, open_npz_array(path, "arr_0", hint="the images must be arr_0: uint8 [N, H, W, 3]"))
    labels = open_npz_array(path, "labels", hint="class consistency needs the requested classes as 'labels' "
                                                 "(autoregressive.sample_ddp and tokenizer.reconstruct --labels "
                                                 "write them)")
    if labels.ndim != 1:
        raise NpzContentError(f"{path}: labels must be one class index per image, shape [N], got {labels.shape}")
    return np.array(images), np.array(labels)  # copies: the arrays may be read-only memory maps


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = OneLineArgumentParser(prog="python -m evaluations.class_consistency", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-data", required=True)
    parser.add_argument("--test-data", required=True)
    parser.add_argument("--samples", required=True, help="npz with arr_0 uint8 [N,H,W,3] and labels [N]")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when available)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--also", action="append", default=[], metavar="NAME=NPZ",
                        help="judge another labelled npz with the same classifier (repeatable)")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)  # first, so a missing GPU is the first thing said
    for flag, value in (("--image-size", args.image_size), ("--epochs", args.epochs)):
        if value < 1:
            raise UserError(f"{flag} must be positive, got {value}")
    for flag, folder in (("--train-data", args.train_data), ("--test-data", args.test_data)):
        require_path(folder, flag, "pass a folder with one sub-folder of images per class")
    if args.json is not None and Path(args.json).is_dir():
        raise UserError(f"--json {args.json} is a folder; pass a file name")
    also = {}
    for item in args.also:
        name, sep, path = item.partition("=")
        if not sep or not name or not path or name in also:
            parser.error(f"--also wants distinct NAME=PATH entries, got {item!r}")
        also[name] = load_labelled_npz(path)
    images, labels = load_labelled_npz(args.samples)
    result = class_consistency(args.train_data, args.test_data, images, labels, args.image_size, args.epochs,
                               args.seed, device, also=also)
    print(f"Classifier held-out accuracy: {result['classifier_heldout_accuracy']:.4f}")
    print(f"Class consistency of samples: {result['class_consistency']:.4f} ({result['num_samples']} samples)")
    for name, judged in result.get("also", {}).items():
        print(f"Class consistency of {name}: {judged['class_consistency']:.4f} ({judged['num_samples']} images)")
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2))
    return result


def cli(argv: list[str] | None = None) -> int:
    """``python -m evaluations.class_consistency ARGV`` run in this process (argv None: ``sys.argv[1:]``);
    returns the exit status instead of exiting."""
    return call_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
