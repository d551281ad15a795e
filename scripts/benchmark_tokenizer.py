"""Tokenizer inference speed: the fast encode/decode paths against the reference module path, same run.

    python -m scripts.benchmark_tokenizer                 # official-size v1, 2 images to encode, one 8-step decode
    python -m scripts.benchmark_tokenizer --tiny          # the same code on configs/tokenizer/tiny.yaml (seconds)

The model has random weights (speed does not depend on them; the official init zeroes the gates
and the output projection, which would make the equality checks vacuous, so every float tensor is
perturbed). Encode takes ``--encode-batch`` images of the config's resolution; decode is one image,
all S steps (8 for v1). The fast path (``DARTokenizer.encode`` / ``decode``) and the reference path
(``reference=True``, the module-by-module forward) are called alternately after one warm-up call
each, ``--repeats`` timed calls each, so that both see the same machine load; min and median are
reported with their ratio. Peak memory is the rise of the process's resident set during one call
(the kernel's high-water mark, reset before the call where /proc/self/clear_refs allows it).
Equality: codes must be identical, decoded images within 1e-5 of the reference relative to its
largest magnitude (the fast path is bit-identical in float32 on the machines we measured).
``--bf16`` also decodes once with ``dtype=torch.bfloat16`` and reports its PSNR against float32
(data range 2, images in [-1, 1]). On a shared machine other processes' load distorts wall times;
the process CPU time of each call (all threads, ``time.process_time``) is reported next to them, and
``--threads 1`` makes it a measure of the work done that other jobs' load barely moves (with several
threads it also counts threads waiting at a barrier while a sibling is descheduled).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from scripts.benchmark_sampling import peak_memory_mib
from tokenizer import TOKENIZER_PRESETS, DARTokenizer, load_tokenizer_config
from utils.cli import OneLineArgumentParser, positive_int
from utils.errors import call_cli
from utils.fileio import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tokenizer" / "tiny.yaml"
IMAGE_TOLERANCE = 1e-5


def build(tiny: bool, seed: int) -> DARTokenizer:
    config = load_tokenizer_config(TINY_CONFIG) if tiny else TOKENIZER_PRESETS["v1"]
    torch.manual_seed(seed)
    model = DARTokenizer(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.02)
    return model.eval()


def peak_rss_rise_mib(fn: Callable[[], Any]) -> tuple[float | None, Any]:
    """(rise of the resident set during ``fn()`` in MiB, or None where it cannot be measured; its result)."""
    return peak_memory_mib(fn, torch.device("cpu"))


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def interleaved(calls: dict[str, Callable[[], Any]], repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall times, CPU times) of ``repeats`` rounds, each calling every entry once in order."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    cpu_times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            wall, cpu, _ = timed(fn)
            times[name].append(wall)
            cpu_times[name].append(cpu)
    return times, cpu_times


def summary(times: dict[str, list[float]], cpu_times: dict[str, list[float]], memory: dict[str, float | None]) -> dict[str, Any]:
    def one(name: str) -> dict[str, Any]:
        wall, cpu = times[name], cpu_times[name]
        return {"min_s": min(wall), "median_s": statistics.median(wall), "times_s": wall,
                "cpu_min_s": min(cpu), "cpu_median_s": statistics.median(cpu), "cpu_times_s": cpu,
                "peak_rss_rise_mib": memory[name]}

    fast, ref = one("fast"), one("reference")
    return {
        "fast": fast,
        "reference": ref,
        "speedup_min": ref["min_s"] / fast["min_s"],
        "speedup_median": ref["median_s"] / fast["median_s"],
        "cpu_speedup_min": ref["cpu_min_s"] / fast["cpu_min_s"],
        "cpu_speedup_median": ref["cpu_median_s"] / fast["cpu_median_s"],
    }


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    scale = reference.abs().max().item()
    return (ours - reference).abs().max().item() / (scale if scale > 0 else 1.0)


def psnr(ours: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> float:
    mse = (ours.double() - reference.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def machine() -> dict[str, Any]:
    model_name = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": model_name, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "load_average": load}


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    model = build(args.tiny, args.seed)
    config = model.config
    size = config.sampling_resolution
    generator = torch.Generator().manual_seed(args.seed + 1)
    images = torch.rand(args.encode_batch, config.diff_decoder.channels, size, size, generator=generator) * 2 - 1
    noise = torch.randn(1, config.diff_decoder.channels, size, size, generator=generator)
    report: dict[str, Any] = {"config": "tiny" if args.tiny else "v1", "machine": machine(), "repeats": args.repeats}

    encode = {"fast": lambda: model.encode(images), "reference": lambda: model.encode(images, reference=True)}
    memory, codes = {}, {}
    for name, fn in encode.items():  # the warm-up call, also measured for memory and kept for the check
        memory[name], codes[name] = peak_rss_rise_mib(fn)
    report["encode"] = summary(*interleaved(encode, args.repeats), memory)
    report["encode"]["images"] = list(images.shape)
    report["encode"]["codes_equal"] = bool(torch.equal(codes["fast"], codes["reference"]))

    one = codes["reference"][:1]
    decode = {"fast": lambda: model.decode(one, noise=noise),
              "reference": lambda: model.decode(one, noise=noise, reference=True)}
    # Every step has the same shapes, so a one-step decode warms up what a full decode runs.
    for name in decode:
        model.decode(one, noise=noise, steps=1, reference=name == "reference")
    memory, decoded = {}, {}
    times: dict[str, list[float]] = {name: [] for name in decode}
    cpu_times: dict[str, list[float]] = {name: [] for name in decode}
    for _ in range(args.repeats):
        for name, fn in decode.items():
            wall, cpu, (rise, decoded[name]) = timed(lambda: peak_rss_rise_mib(fn))  # noqa: B023
            times[name].append(wall)
            cpu_times[name].append(cpu)
            memory[name] = rise if memory.get(name) is None else max(memory[name], rise or 0.0)
    report["decode"] = summary(times, cpu_times, memory)
    report["decode"]["steps"] = config.num_denoising_steps
    difference = relative_difference(decoded["fast"], decoded["reference"])
    report["decode"]["max_relative_difference"] = difference
    report["decode"]["bit_identical"] = bool(torch.equal(decoded["fast"], decoded["reference"]))
    report["decode"]["within_tolerance"] = difference <= IMAGE_TOLERANCE
    if args.bf16:
        wall, cpu, low = timed(lambda: model.decode(one, noise=noise, dtype=torch.bfloat16))
        report["decode_bf16"] = {"time_s": wall, "cpu_s": cpu, "psnr_vs_fp32_db": psnr(low, decoded["fast"])}
    return report


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    print(f"tokenizer {report['config']}; {m['cpu']}, {m['cpus']} CPUs, {m['torch_threads']} torch threads, "
          f"torch {m['torch']}, load average {m['load_average']}")
    for task in ("encode", "decode"):
        r = report[task]
        what = f"{r['images'][0]} images {r['images'][2]}²" if task == "encode" else f"1 image, {r['steps']} steps"
        print(f"{task} ({what}), {report['repeats']} timed calls each after a warm-up:")
        for name in ("reference", "fast"):
            mem = r[name]["peak_rss_rise_mib"]
            mem_text = "n/a" if mem is None else f"{mem:.0f} MiB"
            print(f"  {name:9s} min {r[name]['min_s']:8.3f} s  median {r[name]['median_s']:8.3f} s  "
                  f"(CPU min {r[name]['cpu_min_s']:8.3f} s  median {r[name]['cpu_median_s']:8.3f} s)  peak RSS rise {mem_text}")
        print(f"  speed-up  min {r['speedup_min']:.2f}x  median {r['speedup_median']:.2f}x  "
              f"(CPU time: min {r['cpu_speedup_min']:.2f}x  median {r['cpu_speedup_median']:.2f}x)")
    print(f"codes equal: {report['encode']['codes_equal']}; decoded images bit-identical: "
          f"{report['decode']['bit_identical']} (max relative difference {report['decode']['max_relative_difference']:.2e})")
    if "decode_bf16" in report:
        r = report["decode_bf16"]
        print(f"bf16 decode: {r['time_s']:.3f} s (CPU {r['cpu_s']:.3f} s), PSNR vs fp32 {r['psnr_vs_fp32_db']:.2f} dB")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m scripts.benchmark_tokenizer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="configs/tokenizer/tiny.yaml instead of v1 (a smoke test)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed calls per path after the warm-up")
    parser.add_argument("--encode-batch", type=positive_int, default=2, help="images per encode call")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="also decode once in bf16 and report its PSNR against fp32")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the report to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = run(args)
    print_report(report)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    if not report["encode"]["codes_equal"] or not report["decode"]["within_tolerance"]:
        raise SystemExit("the fast path disagrees with the reference (see above)")
    return report


def cli(argv: list[str] | None = None) -> int:
    """``python -m scripts.benchmark_tokenizer ARGV`` run in this process (argv None: ``sys.argv[1:]``); returns
    the exit status instead of exiting."""
    return call_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
