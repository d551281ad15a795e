"""Helpers shared by the extraction and AR-training tests: a tiny image folder and a tiny tokenizer."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tokenizer.config import TOKENIZER_PRESETS
from tokenizer.model import DARTokenizer

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 32  # the tiny tokenizer's resolution


def make_image_folder(root: Path, per_class: tuple[int, ...] = (5, 4, 4), bad: str | None = "c1/img_002.png") -> Path:
    """Class folders of random-size noise images; ``bad`` (a relative path) is replaced by text."""
    rng = np.random.default_rng(0)
    for label, count in enumerate(per_class):
        folder = root / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            h, w = int(rng.integers(32, 56)), int(rng.integers(32, 56))
            # A per-class tint makes the classes (and so the codes) distinguishable.
            base = rng.integers(0, 256, (h, w, 3)) // 2 + 40 * label
            Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(folder / f"img_{i:03d}.png")
    if bad is not None:
        (root / bad).write_text("not an image")
    return root


def make_tokenizer(directory: Path, seed: int = 0) -> Path:
    """Random tiny tokenizer saved with ``save_pretrained``; returns the folder.

    Every weight is perturbed: the real initialisation zeroes the residual gates, which would make
    the codes independent of the image and the equality tests below vacuous.
    """
    torch.manual_seed(seed)
    tokenizer = DARTokenizer(TOKENIZER_PRESETS["tiny"]).eval()
    with torch.no_grad():
        for p in tokenizer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    tokenizer.save_pretrained(directory)
    return directory


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_module(module: str, args: list[str], nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m module`` (nproc = 1) or a ``torchrun`` launch of it, from the repo root, on CPU."""
    if nproc == 1:
        cmd = [sys.executable, "-m", module, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", module, *args]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        err = result.stderr
        if len(err) > 12000:  # keep the children's first traceback and torchrun's summary
            err = err[:6000] + "\n[...]\n" + err[-6000:]
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{err}")
    return result
