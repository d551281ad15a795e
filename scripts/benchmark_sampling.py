"""GPT sampling speed: KV-cache decoding vs a naive full-forward loop, with per-token overhead.

    python -m scripts.benchmark_sampling                  # GPT-B: fast vs reference decode steps, bf16 vs fp32
    python -m scripts.benchmark_sampling --quick          # the same, 32 tokens (a smoke run)
    python -m scripts.benchmark_sampling --sections throughput --configs GPT-B --tokens 64 --batch-sizes 1,8 \
        --naive-max-batch 1

Models have random weights (speed does not depend on them). For every (config, batch, guidance)
the script times ``GPT.generate`` (static KV cache) and reports code tokens/s and images/s (codes
only, no pixel decoding). In the same run it times, where the batch is ≤ ``--naive-max-batch``, a
naive loop that re-runs the full forward over the whole prefix for every token, with the same
uniforms, and prints the speed-up and whether both produced the same codes.

Per-token overhead is 1 − t_matmul / t_cached, where t_matmul is the time of the step's matrix
work alone (every linear layer on a (B', 1, D) input, attention over the cache, the output head)
run back to back without the model's Python, RoPE, norms, sampling or cache writes. "tiny" is
widened to ``--tokens`` positions so that it can be measured at 256 tokens. On a shared machine
other processes' load distorts all of these numbers; rerun on an idle one before quoting them.

Fast paths against the reference in one run (the default sections, ``--sections steps,bf16``):

- ``steps``: the decode step of :func:`autoregressive.generate.decode_one_token` (filled-cache
  attention, fused sampler) against :func:`~autoregressive.generate.reference_decode_one_token`
  (whole masked cache, separate guidance and sampling), for batch 1 without guidance (1 row) and
  batch ``--guided-batch`` with guidance (2 × that many rows), interleaved, after a warm-up. Prints
  min/median ms per step, the guided / batch-1 step ratio of each path (the bandwidth floor is 1),
  peak RSS rise and whether the codes are equal.
- ``bf16``: greedy batch-1 generation with the GPT's weights and KV cache in bf16 (what
  ``--gpt-dtype bf16`` does) against fp32, the speed-up, and the fraction of codes equal to fp32's.
- ``throughput``: the table above (slow on a CPU: off by default).
``--quick``: fewer tokens and repeats (a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import time
from pathlib import Path
from typing import Any
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F

from autoregressive.config import GPT_PRESETS
from autoregressive.generate import (GuidanceSchedule, apply_guidance, decode_n_tokens, draw_uniforms, generate_codes,
                                     prefill, reference_decode_one_token, sample_token)
from autoregressive.model import GPT
from utils.cli import OneLineArgumentParser
from utils.errors import call_cli

BENCH_CFG = GuidanceSchedule(1.5, 4.0)


def build(preset: str, tokens: int, device: torch.device) -> GPT:
    config = GPT_PRESETS[preset]
    config = replace(config, block_size=max(config.block_size, tokens))
    torch.manual_seed(0)
    gpt = GPT(config)
    # The real init zeroes the head, which would make every logit equal and the naive-vs-cached check vacuous.
    torch.nn.init.normal_(gpt.output.weight, std=0.02)
    return gpt.to(device).eval()


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, object]:
    """(best wall time of ``repeats`` calls, the last call's result); callers warm up themselves."""
    best, result = float("inf"), None
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, result


@torch.no_grad()
def naive_generate(gpt: GPT, labels: torch.Tensor, uniforms: torch.Tensor, guidance: GuidanceSchedule) -> torch.Tensor:
    """Codes (B, n) by a full forward over [class, codes so far] for every token: no cache."""
    batch, n = uniforms.shape
    guided = guidance.enabled
    labels_in = torch.cat([labels, torch.full_like(labels, gpt.config.null_class)]) if guided else labels
    scales = guidance.scales(n).to(labels.device)
    codes = torch.zeros(batch, 0, dtype=torch.long, device=labels.device)
    for i in range(n):
        # forward() reads codes[:, :N-1]; the appended placeholder is never seen.
        fed = torch.cat([codes, codes.new_zeros(batch, 1)], dim=1)
        logits = gpt(torch.cat([fed, fed]) if guided else fed, labels_in)[:, -1]
        if guided:
            logits = apply_guidance(logits, scales[i])
        codes = torch.cat([codes, sample_token(logits, uniforms[:, i])[:, None]], dim=1)
    return codes


@torch.no_grad()
def matmul_only(gpt: GPT, rows: int, tokens: int, device: torch.device) -> None:
    """The matrix work of ``tokens`` cached decode steps for ``rows`` rows, without anything else."""
    cfg = gpt.config
    x = torch.randn(rows, 1, cfg.dim, device=device)
    keys = torch.randn(rows, cfg.n_head, tokens + 1, cfg.head_dim, device=device)
    for pos in range(1, tokens + 1):
        for layer in gpt.layers:
            attn, ffn = layer.attention, layer.feed_forward
            q = attn.wqkv(x)[..., : cfg.dim].view(rows, 1, cfg.n_head, cfg.head_dim).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, keys[:, :, :pos], keys[:, :, :pos])
            h = attn.wo(out.transpose(1, 2).reshape(rows, 1, cfg.dim))
            ffn.w2(ffn.w1(h) * ffn.w3(h))
        gpt.output(x)


# ------------------------------------------------------------------------------------------------
# Fast paths against the reference, in one run
# ------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_memory_mib(fn: Callable[[], Any], device: torch.device) -> tuple[float | None, Any]:
    """(peak memory rise during ``fn()`` in MiB, or None where it cannot be measured; its result).

    CUDA: max_memory_allocated above the allocation before the call. CPU: the resident set's high-water
    mark, reset before the call through /proc/self/clear_refs (Linux); includes the allocator's slack.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, result
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _status_kib("VmRSS")
    except OSError:
        before = None
    if before is None:
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result = fn()
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return ((peak_after - peak_before) / 1024 if peak_after > peak_before else None), result
    result = fn()
    peak = _status_kib("VmHWM")
    return (None if peak is None else (peak - before) / 1024), result


def interleaved(calls: dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> dict[str, list[float]]:
    """Wall times of ``repeats`` rounds, each calling every entry once in order (so load hits all alike)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def stats(times: list[float]) -> dict[str, float]:
    return {"min_s": min(times), "median_s": statistics.median(times)}


def machine() -> dict[str, Any]:
    """CPU model, core and thread counts, torch version and load average, for the report."""
    name = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": name, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


@torch.no_grad()
def sample_codes(gpt: GPT, labels: torch.Tensor, uniforms: torch.Tensor, guidance: GuidanceSchedule,
                 step: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Codes (B, n) by generate_codes' cached decoding with a chosen decode step."""
    guided = guidance.enabled
    labels_in = torch.cat([labels, torch.full_like(labels, gpt.config.null_class)]) if guided else labels
    n = uniforms.shape[1]
    scales = guidance.scales(n).to(labels.device)
    gpt.setup_caches(labels_in.shape[0], n, device=labels.device)
    logits = prefill(gpt, labels_in)
    first = sample_token(apply_guidance(logits, scales[0]) if guided else logits, uniforms[:, 0])
    rest = decode_n_tokens(gpt, first, 1, scales[1:], uniforms[:, 1:], 1.0, 0, 1.0, guided, step=step)
    return torch.cat([first[:, None], rest], dim=1)


def reference_codes(gpt: GPT, labels: torch.Tensor, uniforms: torch.Tensor, guidance: GuidanceSchedule) -> torch.Tensor:
    """Codes (B, n) the way generation ran before the fast paths: the reference step, unfused sampler."""
    return sample_codes(gpt, labels, uniforms, guidance, reference_decode_one_token)


def fast_codes(gpt: GPT, labels: torch.Tensor, uniforms: torch.Tensor, guidance: GuidanceSchedule,
               temperature: float = 1.0) -> torch.Tensor:
    """Codes (B, n) by the default path (what GPT.generate runs)."""
    return generate_codes(gpt, labels, uniforms, guidance=guidance, temperature=temperature)


def step_section(gpt: GPT, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Per-step time of the fast and reference decode at batch 1 and at the guided batch."""
    n = args.tokens
    cases = {"batch1": (1, GuidanceSchedule()), "guided": (args.guided_batch, BENCH_CFG)}
    report: dict[str, Any] = {"tokens": n, "guided_batch": args.guided_batch, "rows": {}}
    for case, (batch, guidance) in cases.items():
        labels = torch.arange(batch, device=device) % gpt.config.num_classes
        uniforms = draw_uniforms(batch, n, seeds=list(range(batch)), device=device)
        calls = {"reference": lambda: reference_codes(gpt, labels, uniforms, guidance),
                 "fast": lambda: fast_codes(gpt, labels, uniforms, guidance)}
        memory, codes = {}, {}
        for name, fn in calls.items():  # also the warm-up
            memory[name], codes[name] = peak_memory_mib(fn, device)
        times = interleaved(calls, device, args.repeats)
        row = {name: {**stats(times[name]), "times_s": times[name], "peak_rise_mib": memory[name],
                      "ms_per_step_min": 1e3 * min(times[name]) / n,
                      "ms_per_step_median": 1e3 * statistics.median(times[name]) / n} for name in calls}
        row["rows_fed"] = batch * (2 if guidance.enabled else 1)
        row["speedup_min"] = row["reference"]["min_s"] / row["fast"]["min_s"]
        row["speedup_median"] = row["reference"]["median_s"] / row["fast"]["median_s"]
        row["codes_equal"] = bool(torch.equal(codes["fast"], codes["reference"]))
        report["rows"][case] = row
    for name in ("reference", "fast"):
        one, many = report["rows"]["batch1"][name], report["rows"]["guided"][name]
        report[f"ratio_{name}_min"] = many["min_s"] / one["min_s"]
        report[f"ratio_{name}_median"] = many["median_s"] / one["median_s"]
    return report


def bf16_section(gpt: GPT, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Greedy batch-1 generation: bf16 weights and KV cache against fp32, speed and code agreement."""
    n = args.tokens
    gpt_bf16 = copy.deepcopy(gpt).to(torch.bfloat16)
    labels = torch.tensor([7], device=device)
    uniforms = draw_uniforms(1, n, seeds=[0], device=device)
    greedy = GuidanceSchedule()
    calls = {"fp32": lambda: fast_codes(gpt, labels, uniforms, greedy, temperature=0.0),
             "bf16": lambda: fast_codes(gpt_bf16, labels, uniforms, greedy, temperature=0.0)}
    memory, codes = {}, {}
    for name, fn in calls.items():
        memory[name], codes[name] = peak_memory_mib(fn, device)
    times = interleaved(calls, device, args.repeats)
    agreement = (codes["bf16"] == codes["fp32"]).float().mean().item()
    first_diff = (codes["bf16"] != codes["fp32"]).nonzero()
    # Free-running codes diverge for good at the first differing token (and random weights give near-tied
    # logits), so also the per-position argmax agreement when both read the fp32 codes (teacher forcing).
    with torch.no_grad():
        forced = (gpt_bf16(codes["fp32"], labels).argmax(-1) == gpt(codes["fp32"], labels).argmax(-1))
    report = {name: {**stats(times[name]), "times_s": times[name], "peak_rise_mib": memory[name]} for name in calls}
    report.update(tokens=n, teacher_forced_agreement=forced.float().mean().item(), speedup_min=min(times["fp32"]) / min(times["bf16"]),
                  speedup_median=statistics.median(times["fp32"]) / statistics.median(times["bf16"]),
                  agreement=agreement, first_difference=int(first_diff[0, 1]) if len(first_diff) else None,
                  cache_dtype=str(gpt_bf16.layers[0].attention.kv_cache.k_cache.dtype))
    del gpt_bf16
    return report


def print_steps(report: dict[str, Any]) -> None:
    print(f"decode steps, {report['tokens']} tokens per run (min / median ms per step):")
    for case, row in report["rows"].items():
        label = "batch 1, no cfg" if case == "batch1" else f"batch {report['guided_batch']}, cfg ({row['rows_fed']} rows)"
        for name in ("reference", "fast"):
            r = row[name]
            mem = "n/a" if r["peak_rise_mib"] is None else f"{r['peak_rise_mib']:.0f} MiB"
            print(f"  {label:22s} {name:9s} {r['ms_per_step_min']:8.2f} / {r['ms_per_step_median']:8.2f} ms"
                  f"  peak rise {mem}")
        print(f"  {label:22s} speed-up  {row['speedup_min']:.2f}x / {row['speedup_median']:.2f}x  codes "
              f"{'equal' if row['codes_equal'] else 'DIFFERENT'}")
    for name in ("reference", "fast"):
        print(f"  guided/batch-1 step ratio, {name:9s}: {report[f'ratio_{name}_min']:.2f}x (min) / "
              f"{report[f'ratio_{name}_median']:.2f}x (median)")


def print_bf16(report: dict[str, Any]) -> None:
    print(f"greedy batch 1, {report['tokens']} tokens, bf16 weights + {report['cache_dtype']} cache vs fp32:")
    for name in ("fp32", "bf16"):
        r = report[name]
        mem = "n/a" if r["peak_rise_mib"] is None else f"{r['peak_rise_mib']:.0f} MiB"
        print(f"  {name}: {r['min_s']:.3f} / {r['median_s']:.3f} s (min / median)  peak rise {mem}")
    print(f"  speed-up bf16/fp32 {report['speedup_min']:.2f}x (min) / {report['speedup_median']:.2f}x (median); "
          f"codes equal to fp32: {report['agreement']:.1%} (first difference at position {report['first_difference']}); "
          f"argmax equal under teacher forcing: {report['teacher_forced_agreement']:.1%}")


def run_sections(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    report: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    m = report["machine"]
    print(f"{m['cpu']}, {m['cpus']} CPUs, {m['torch_threads']} torch threads, torch {m['torch']}, "
          f"load average {m['load_average']}, device {device}", flush=True)
    for preset in args.configs:
        gpt = build(preset, args.tokens, device)
        print(f"== {preset}, random weights, fp32 eager ==", flush=True)
        if "steps" in args.sections:
            report[f"{preset}/steps"] = step_section(gpt, args, device)
            print_steps(report[f"{preset}/steps"])
        if "bf16" in args.sections:
            report[f"{preset}/bf16"] = bf16_section(gpt, args, device)
            print_bf16(report[f"{preset}/bf16"])
        gpt.clear_caches()
    if "throughput" in args.sections:
        report["throughput"] = run(args)
    return report


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    results = []
    for preset in args.configs:
        gpt = build(preset, args.tokens, device)
        n = args.tokens
        for batch in args.batch_sizes:
            for guided in args.guidance:
                guidance = BENCH_CFG if guided else GuidanceSchedule()
                labels = torch.arange(batch, device=device) % gpt.config.num_classes
                uniforms = draw_uniforms(batch, n, seeds=list(range(batch)), device=device)
                cached = lambda: gpt.generate(labels, guidance, seeds=list(range(batch)), num_tokens=n,  # noqa: E731
                                              compile=args.compile)
                cached_codes = cached()  # also the warm-up (and the compilation with --compile)
                t_cached, _ = timed(cached, device, args.repeats)
                rows = batch * (2 if guided else 1)
                matmul_only(gpt, rows, n, device)
                t_matmul, _ = timed(lambda: matmul_only(gpt, rows, n, device), device, args.repeats)
                row = {"config": preset, "batch": batch, "cfg": guided, "tokens": n, "compile": args.compile,
                       "tokens_per_s": batch * n / t_cached, "images_per_s": batch / t_cached,
                       "ms_per_step": 1e3 * t_cached / n, "overhead": max(0.0, 1 - t_matmul / t_cached)}
                if batch <= args.naive_max_batch:
                    # One run: it is the slow side, and the model is already warm from the cached runs.
                    t_naive, naive_codes = timed(lambda: naive_generate(gpt, labels, uniforms, guidance), device, 1)
                    row.update(speedup_vs_naive=t_naive / t_cached,
                               naive_same_codes=bool(torch.equal(naive_codes, cached_codes)))
                results.append(row)
                print(format_row(row), flush=True)
    return results


def format_row(row: dict) -> str:
    text = (f"{row['config']:>6} B={row['batch']:<3} cfg={'on ' if row['cfg'] else 'off'} n={row['tokens']}: "
            f"{row['tokens_per_s']:10.1f} tok/s {row['images_per_s']:8.3f} img/s "
            f"{row['ms_per_step']:7.2f} ms/step  overhead {100 * row['overhead']:5.1f}%")
    if "speedup_vs_naive" in row:
        same = "same codes" if row["naive_same_codes"] else "DIFFERENT codes"
        text += f"  {row['speedup_vs_naive']:6.1f}x vs naive ({same})"
    return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m scripts.benchmark_sampling", description=__doc__.split("\n\n")[0])
    ints = lambda text: [int(v) for v in text.split(",")]  # noqa: E731
    parser.add_argument("--configs", type=lambda t: t.split(","), default=["GPT-B"],
                        help=f"comma-separated presets from {', '.join(GPT_PRESETS)}")
    parser.add_argument("--sections", type=lambda t: t.split(","), default=["steps", "bf16"],
                        help="comma-separated: steps (fast vs reference decode), bf16 (greedy bf16 vs fp32), "
                             "throughput (the tokens/s table)")
    parser.add_argument("--quick", action="store_true", help="32 tokens, 3 repeats: a smoke run")
    parser.add_argument("--guided-batch", type=int, default=8, help="images of the guided step (2x rows)")
    parser.add_argument("--batch-sizes", type=ints, default=[1, 8, 32], help="throughput section")
    parser.add_argument("--tokens", type=int, default=None, help="codes generated per image (default 256; quick 32)")
    parser.add_argument("--guidance", type=lambda t: [{"on": True, "off": False}[v] for v in t.split(",")],
                        default=[False, True], help="'off', 'on' or 'off,on'")
    parser.add_argument("--naive-max-batch", type=int, default=8,
                        help="run the naive loop only up to this batch (it is slow: O(n²) per image)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement after the warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on CUDA)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs if c not in GPT_PRESETS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {', '.join(GPT_PRESETS)}")
    bad = [s for s in args.sections if s not in ("steps", "bf16", "throughput")]
    if bad:
        parser.error(f"unknown section(s) {bad}; choose from steps, bf16, throughput")
    if args.tokens is None:
        args.tokens = 32 if args.quick else 256
    if args.tokens < 2 or args.repeats < 1:
        parser.error("--tokens must be >= 2 and --repeats >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = run_sections(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return report


def cli(argv: list[str] | None = None) -> int:
    """``python -m scripts.benchmark_sampling ARGV`` run in this process (argv None: ``sys.argv[1:]``); returns
    the exit status instead of exiting."""
    return call_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
