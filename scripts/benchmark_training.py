"""Training speed and memory: the tokenizer (checkpointing off vs on) and GPT-B (fast vs baseline paths).

    python -m scripts.benchmark_training                                  # GPT-B forward and training step
    python -m scripts.benchmark_training --configs tiny,v1                # the tokenizer, small CPU batches
    python -m scripts.benchmark_training --device cuda --batch-v1 32      # realistic GPU batch, bf16
    python -m scripts.benchmark_training --configs lpips                  # the LPIPS term, old vs new path

One measurement is one full training step of ``tokenizer.train`` (forward, every loss term of the
recipe, backward, gradient clipping, AdamW step, EMA update) on random images; networks have random
weights (speed does not depend on them). Each (config, checkpointing) pair runs in a fresh child
process, so its peak memory is its own: CUDA ``max_memory_allocated`` on GPU, the process's peak
resident set size on CPU (which includes the Python/torch baseline). Rows are printed with their
ratio to the baseline of the same config measured in the same run (checkpointing off).

On CUDA, ``--sdpa-only`` (default on) runs the timed steps with SDPA restricted to the flash and
memory-efficient kernels, so the benchmark fails loudly if some attention call would fall back to
the slow math kernel. On a shared machine other processes' load distorts all numbers.

``--configs GPT-B`` (or ``gpt-tiny``) measures the GPT in this process, each path against its baseline
in the same run (interleaved, warm-up first, min / median of ``--repeats`` calls, peak memory rise):

- teacher-forcing forward, no grad, ``--gpt-batch`` × 256 codes: the default forward (SDPA's fused
  attention) against the same forward with SDPA restricted to its unfused math kernel; logits compared
  (max relative difference, 1e-5 allowed).
- training step (forward, cross-entropy, backward, clipping, AdamW) at ``--gpt-train-batch`` × 256:
  ``build_optimizer``'s fused AdamW against the per-tensor AdamW loop, parameters after the step
  compared; and activation checkpointing on (memory against speed).
``--quick``: 64 codes, batch 1, the smallest run that exercises every path.

``--configs lpips`` times the LPIPS term of tokenizer training (forward + backward to the reconstruction,
``--lpips-batch`` images at 256²) as the trainer computes it (``tokenizer.losses.lpips_term``: targets
without autograd, the VGG backward taken ``LPIPS_CHUNK`` images at a time) against the previous one-pass
computation, with peak memory and the gradients compared. For CPU peaks that follow the live tensors, run
with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc otherwise keeps freed blocks between the calls).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from autoregressive.config import GPT_PRESETS
from autoregressive.model import GPT
from scripts.benchmark_sampling import interleaved, peak_memory_mib

from tokenizer.config import TOKENIZER_PRESETS
from tokenizer.model import DARTokenizer
from tokenizer.losses import LossConfig, WeightFiles, build_loss_networks, loss_terms, term_weights, total_loss
from utils.distributed import DistEnv
from utils.training import OptimConfig, autocast, build_optimizer, create_ema, update_ema
from utils.cli import OneLineArgumentParser
from utils.errors import call_cli

# REPA encoder / discriminator presets that fit each tokenizer preset's REPA head and image size.
REPA_PRESET = {"tiny": "tiny", "v1": "dinov2_vitb14"}
IMAGE_SIZE = {"tiny": 32, "v1": 256}
GPT_CONFIGS = ("GPT-B", "gpt-tiny")
OTHER_CONFIGS = ("lpips",)


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
    times = []
    with context:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return {"config": config_name, "grad_ckpt": grad_ckpt, "batch": batch, "steps": steps, "precision": precision,
            "images_per_s": batch / statistics.median(times), "s_per_step": statistics.median(times),
            "s_per_step_min": min(times), "peak_mem_gib": peak,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


# ------------------------------------------------------------------------------------------------
# GPT
# ------------------------------------------------------------------------------------------------
def _gpt(name: str, tokens: int, device: torch.device) -> GPT:
    config = GPT_PRESETS["GPT-B" if name == "GPT-B" else "tiny"]
    config = replace(config, block_size=tokens, attn_dropout_p=0.0)
    torch.manual_seed(0)
    gpt = GPT(config)
    torch.nn.init.normal_(gpt.output.weight, std=0.02)  # the real zero init would make the logits trivial
    return gpt.to(device)


def _relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.abs().max().item()
    return (ours - reference).abs().max().item() / (scale if scale > 0 else 1.0)


def _row(times: list[float], memory: float | None) -> dict:
    return {"min_s": min(times), "median_s": statistics.median(times), "times_s": times, "peak_rise_mib": memory}


def gpt_measure(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    """GPT forward and training step, each fast path against its baseline in this process."""
    tokens = 64 if args.quick else 256
    gpt = _gpt(name, tokens, device)
    vocab, classes = gpt.config.vocab_size, gpt.config.num_classes
    gen = torch.Generator().manual_seed(0)
    report: dict = {"config": name, "tokens": tokens}

    batch = 1 if args.quick else args.gpt_batch
    codes = torch.randint(0, vocab, (batch, tokens), generator=gen).to(device)
    labels = torch.randint(0, classes, (batch,), generator=gen).to(device)
    gpt.eval()

    @torch.no_grad()
    def forward(math: bool) -> torch.Tensor:
        if not math:
            return gpt(codes, labels)
        with sdpa_kernel(SDPBackend.MATH):
            return gpt(codes, labels)

    calls = {"baseline": lambda: forward(True), "fast": lambda: forward(False)}
    memory, out = {}, {}
    for key, fn in calls.items():
        memory[key], out[key] = peak_memory_mib(fn, device)
    times = interleaved(calls, device, args.repeats)
    report["forward"] = {"batch": batch, **{k: _row(times[k], memory[k]) for k in calls},
                         "logits_rel_diff": _relative(out["fast"], out["baseline"])}
    del out

    batch = 1 if args.quick else args.gpt_train_batch
    codes = torch.randint(0, vocab, (batch, tokens), generator=gen).to(device)
    labels = torch.randint(0, classes, (batch,), generator=gen).to(device)
    gpt.train()
    start_state = {k: v.clone() for k, v in gpt.state_dict().items()}
    optim = OptimConfig(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)

    def make_step(fused: bool, ckpt: bool):
        optimizer = build_optimizer(gpt, optim, device)
        if not fused:
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
            optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, foreach=False)

        def step() -> dict:
            gpt.load_state_dict(start_state)  # every call is the same first step, so the results compare
            gpt.set_activation_checkpointing(ckpt)
            torch.manual_seed(1)  # dropout draws
            loss = F.cross_entropy(gpt(codes, labels).flatten(0, 1), codes.flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gpt.parameters(), optim.grad_clip)
            optimizer.step()
            return {k: v.detach().clone() for k, v in gpt.named_parameters()}

        return step

    calls = {"baseline": make_step(False, False), "fast": make_step(True, False), "fast+ckpt": make_step(True, True)}
    memory, params = {}, {}
    for key, fn in calls.items():
        memory[key], params[key] = peak_memory_mib(fn, device)
    times = interleaved(calls, device, args.repeats)
    diff = {key: max(_relative(params[key][n], params["baseline"][n]) for n in params["baseline"])
            for key in ("fast", "fast+ckpt")}
    report["train"] = {"batch": batch, **{k: _row(times[k], memory[k]) for k in calls}, "params_rel_diff": diff}
    return report


# ------------------------------------------------------------------------------------------------
# LPIPS term of tokenizer training
# ------------------------------------------------------------------------------------------------
def lpips_measure(args: argparse.Namespace, device: torch.device) -> dict:
    """Forward + backward of the LPIPS term at 256², down to the reconstruction, three ways in this process.

    ``one pass`` is the baseline (the previous code): targets and reconstructions through the VGG16 as one
    batch, the backward at the end. ``split``: ``LPIPS.forward`` runs the targets without autograd.
    ``chunked``: ``tokenizer.losses.lpips_term`` (what training uses), LPIPS_CHUNK images at a time, each
    chunk's VGG backward taken at once. bf16 autocast on CUDA, fp32 on the CPU.
    """
    from tokenizer.losses import lpips_term
    from tokenizer.lpips import LPIPS

    torch.manual_seed(0)
    net = LPIPS(pretrained=False).to(device)
    batch = args.lpips_batch
    images = torch.rand(batch, 3, 256, 256, device=device) * 2 - 1
    start = torch.rand(batch, 3, 256, 256, device=device) * 2 - 1
    precision = "bf16" if device.type == "cuda" else "fp32"

    # With both sides requiring grad, LPIPS.forward takes its one concatenated pass, and the backward runs
    # through the targets as well: the computation training did before.
    graded_images = images.clone().requires_grad_(True)

    def one_pass(recon: torch.Tensor) -> torch.Tensor:
        return net(graded_images, recon).mean()

    def run(term) -> torch.Tensor:
        recon = start.clone().requires_grad_(True)
        with autocast(device, precision):
            loss = term(recon)
        loss.backward()
        return recon.grad

    calls = {"one pass": lambda: run(one_pass), "split": lambda: run(lambda r: net(images, r).mean()),
             "chunked": lambda: run(lambda r: lpips_term(net, images, r))}
    memory, grads = {}, {}
    for key, fn in calls.items():
        memory[key], grads[key] = peak_memory_mib(fn, device)
    times = interleaved(calls, device, args.repeats)
    return {"config": "lpips", "batch": batch, "precision": precision,
            **{k: _row(times[k], memory[k]) for k in calls},
            "grad_rel_diff": {k: _relative(grads[k], grads["one pass"]) for k in ("split", "chunked")}}


def print_lpips(report: dict) -> None:
    print(f"LPIPS term, forward + backward to the reconstruction, batch {report['batch']} x 256², "
          f"{report['precision']} (min / median s, peak rise):")
    base = report["one pass"]
    for key in ("one pass", "split", "chunked"):
        row = report[key]
        mem = "n/a" if row["peak_rise_mib"] is None else f"{row['peak_rise_mib']:.0f} MiB"
        ratio = (f"  speed-up {base['min_s'] / row['min_s']:.2f}x / {base['median_s'] / row['median_s']:.2f}x"
                 if key != "one pass" else "")
        print(f"  {key:10s} {row['min_s']:8.3f} / {row['median_s']:8.3f} s  peak rise {mem}{ratio}")
    print("  gradient max relative difference vs one pass: "
          + ", ".join(f"{k} {v:.2e}" for k, v in report["grad_rel_diff"].items()))


def print_gpt(report: dict) -> None:
    for part, label in (("forward", "teacher-forcing forward, no grad"), ("train", "training step")):
        r = report[part]
        print(f"{report['config']} {label}, batch {r['batch']} x {report['tokens']} codes (min / median s, peak rise):")
        base = r["baseline"]
        for key in [k for k in r if k in ("baseline", "fast", "fast+ckpt")]:
            row = r[key]
            mem = "n/a" if row["peak_rise_mib"] is None else f"{row['peak_rise_mib']:.0f} MiB"
            ratio = (f"  speed-up {base['min_s'] / row['min_s']:.2f}x / {base['median_s'] / row['median_s']:.2f}x"
                     if key != "baseline" else "")
            print(f"  {key:10s} {row['min_s']:8.3f} / {row['median_s']:8.3f} s  peak rise {mem}{ratio}")
        if part == "forward":
            print(f"  logits max relative difference fast vs baseline: {r['logits_rel_diff']:.2e} (allowed 1e-5)")
        else:
            print("  parameters after the step, max relative difference vs baseline: "
                  + ", ".join(f"{k} {v:.2e}" for k, v in r["params_rel_diff"].items()))


def _sdpa_fast_kernels():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


def format_row(row: dict, base: dict) -> str:
    speed = row["images_per_s"] / base["images_per_s"]
    memory = row["peak_mem_gib"] / base["peak_mem_gib"]
    return (f"{row['config']:>4} ckpt={'on ' if row['grad_ckpt'] else 'off'} B={row['batch']:<3} {row['precision']}: "
            f"{row['images_per_s']:9.4g} img/s, s/step min {row['s_per_step_min']:.3f} median {row['s_per_step']:.3f}"
            f"  peak {row['peak_mem_gib']:7.2f} GiB  | vs ckpt off: speed x{speed:.2f} (median), memory x{memory:.2f}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m scripts.benchmark_training", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", type=lambda t: t.split(","), default=["GPT-B"],
                        help="comma-separated: tiny, v1 (tokenizer), GPT-B, gpt-tiny, lpips (the LPIPS term)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-tiny", type=int, default=None, help="default 8 on CPU, 256 on GPU")
    parser.add_argument("--batch-v1", type=int, default=None, help="default 1 on CPU, 32 on GPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 2 on CPU, 10 on GPU)")
    parser.add_argument("--no-sdpa-only", dest="sdpa_only", action="store_false",
                        help="allow the math SDPA kernel on CUDA")
    parser.add_argument("--gpt-batch", type=int, default=8, help="GPT forward batch (x 256 codes)")
    parser.add_argument("--gpt-train-batch", type=int, default=None, help="GPT training batch (default 2 on CPU, 8 on GPU)")
    parser.add_argument("--repeats", type=int, default=3, help="GPT, lpips: timed calls per path after the warm-up")
    parser.add_argument("--lpips-batch", type=int, default=None, help="lpips: images (default 16 on CPU, 64 on GPU)")
    parser.add_argument("--quick", action="store_true", help="GPT: 64 codes, batch 1 (a smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # "config,ckpt": one measurement
    args = parser.parse_args(argv)
    known = (*IMAGE_SIZE, *GPT_CONFIGS, *OTHER_CONFIGS)
    unknown = [c for c in args.configs if c not in known]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {', '.join(known)}")
    gpu = args.device.startswith("cuda")
    args.batch_tiny = args.batch_tiny or (256 if gpu else 8)
    args.batch_v1 = args.batch_v1 or (32 if gpu else 1)
    args.steps = args.steps or (10 if gpu else 2)
    args.gpt_train_batch = args.gpt_train_batch or (8 if gpu else 2)
    args.lpips_batch = args.lpips_batch or (64 if gpu else 16)
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
    for name in [c for c in args.configs if c in GPT_CONFIGS]:
        report = gpt_measure(name, args, torch.device(args.device))
        print_gpt(report)
        rows.append(report)
    if "lpips" in args.configs:
        report = lpips_measure(args, torch.device(args.device))
        print_lpips(report)
        rows.append(report)
    for name in [c for c in args.configs if c in IMAGE_SIZE]:
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


def cli(argv: list[str] | None = None) -> int:
    """``python -m scripts.benchmark_training ARGV`` run in this process (argv None: ``sys.argv[1:]``); returns
    the exit status instead of exiting."""
    return call_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
