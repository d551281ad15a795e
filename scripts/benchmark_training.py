"""Tokenizer training speed and memory: images/s and peak memory, gradient checkpointing off vs on.

    python -m scripts.benchmark_training                                  # tiny and v1, small CPU batches
    python -m scripts.benchmark_training --device cuda --batch-v1 32      # realistic GPU batch, bf16

One measurement is one full training step of ``tokenizer.train`` (forward, every loss term of the
recipe, backward, gradient clipping, AdamW step, EMA update) on random images; networks have random
weights (speed does not depend on them). Each (config, checkpointing) pair runs in a fresh child
process, so its peak memory is its own: CUDA ``max_memory_allocated`` on GPU, the process's peak
resident set size on CPU (which includes the Python/torch baseline). Rows are printed with their
ratio to the baseline of the same config measured in the same run (checkpointing off).

On CUDA, ``--sdpa-only`` (default on) runs the timed steps with SDPA restricted to the flash and
memory-efficient kernels, so the benchmark fails loudly if some attention call would fall back to
the slow math kernel. On a shared machine other processes' load distorts all numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

import torch

from tokenizer.config import TOKENIZER_PRESETS
from tokenizer.model import DARTokenizer
from tokenizer.losses import LossConfig, WeightFiles, build_loss_networks, loss_terms, term_weights, total_loss
from utils.distributed import DistEnv
from utils.training import OptimConfig, autocast, build_optimizer, create_ema, update_ema
from utils.cli import OneLineArgumentParser
from utils.errors import run_cli

# REPA encoder / discriminator presets that fit each tokenizer preset's REPA head and image size.
REPA_PRESET = {"tiny": "tiny", "v1": "dinov2_vitb14"}
IMAGE_SIZE = {"tiny": 32, "v1": 256}


def measure(config_name: str, grad_ckpt: bool, batch: int, steps: int, device: torch.device, sdpa_only: bool) -> dict:
    """Time ``steps`` training steps after one warm-up step; returns one result row."""
    config = TOKENIZER_PRESETS[config_name]
    config = replace(config, grad_checkpointing=grad_ckpt,
                     diff_decoder=replace(config.diff_decoder, grad_checkpointing=grad_ckpt))
    torch.manual_seed(0)
    model = DARTokenizer(config).to(device).train()
    ema = create_ema(model)
    losses = LossConfig(perceptual_pretrained=False, repa_pretrained=False, repa_encoder=REPA_PRESET[config_name])
    nets = build_loss_networks(losses, WeightFiles(), DistEnv(0, 1, 0, device), logging.getLogger("benchmark"))
    weights = term_weights(losses)
    optim = OptimConfig(lr=2e-4, betas=(0.9, 0.95), ema_decay=0.999)
    optimizer = build_optimizer(model, optim, device)
    precision = "bf16" if device.type == "cuda" else "fp32"
    size = IMAGE_SIZE[config_name]
    images = torch.rand(batch, 3, size, size, device=device) * 2 - 1

    def step() -> None:
        with autocast(device, precision):
            out = model(images)
            terms = loss_terms(out, images, nets, weights, use_gan=False)
        loss, _ = total_loss(terms, weights, adaptive=False, last_layer=None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        update_ema(ema, model, optim.ema_decay)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    context = _sdpa_fast_kernels() if sdpa_only and device.type == "cuda" else contextlib.nullcontext()
    with context:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"config": config_name, "grad_ckpt": grad_ckpt, "batch": batch, "steps": steps, "precision": precision,
            "images_per_s": batch * steps / elapsed, "s_per_step": elapsed / steps, "peak_mem_gib": peak,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def _sdpa_fast_kernels():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def format_row(row: dict, base: dict) -> str:
    speed = row["images_per_s"] / base["images_per_s"]
    memory = row["peak_mem_gib"] / base["peak_mem_gib"]
    return (f"{row['config']:>4} ckpt={'on ' if row['grad_ckpt'] else 'off'} B={row['batch']:<3} {row['precision']}: "
            f"{row['images_per_s']:9.4g} img/s {row['s_per_step']:8.3f} s/step  peak {row['peak_mem_gib']:7.2f} GiB"
            f"  | vs ckpt off: speed x{speed:.2f}, memory x{memory:.2f}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m scripts.benchmark_training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=lambda t: t.split(","), default=["tiny", "v1"], help="tiny and/or v1")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-tiny", type=int, default=None, help="default 8 on CPU, 256 on GPU")
    parser.add_argument("--batch-v1", type=int, default=None, help="default 1 on CPU, 32 on GPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 2 on CPU, 10 on GPU)")
    parser.add_argument("--no-sdpa-only", dest="sdpa_only", action="store_false",
                        help="allow the math SDPA kernel on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "config,ckpt": one measurement
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs if c not in IMAGE_SIZE]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {', '.join(IMAGE_SIZE)}")
    gpu = args.device.startswith("cuda")
    args.batch_tiny = args.batch_tiny or (256 if gpu else 8)
    args.batch_v1 = args.batch_v1 or (32 if gpu else 1)
    args.steps = args.steps or (10 if gpu else 2)
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = {"tiny": args.batch_tiny, "v1": args.batch_v1}
    if args.child is not None:
        name, ckpt = args.child.split(",")
        row = measure(name, ckpt == "on", batches[name], args.steps, torch.device(args.device), args.sdpa_only)
        print(json.dumps(row))
        return [row]
    print(f"device {args.device}, {torch.get_num_threads()} threads, {args.steps} timed steps per row")
    rows = []
    passthrough = list(argv if argv is not None else sys.argv[1:])
    for name in args.configs:
        base = None
        for ckpt in ("off", "on"):
            child = subprocess.run([sys.executable, "-m", "scripts.benchmark_training", *passthrough,
                                    "--child", f"{name},{ckpt}"], capture_output=True, text=True)
            if child.returncode != 0:
                print(f"{name} ckpt={ckpt}: FAILED\n{child.stderr[-3000:]}", flush=True)
                continue
            row = json.loads(child.stdout.strip().splitlines()[-1])
            base = base or row
            rows.append(row)
            print(format_row(row, base), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    run_cli(main)
