"""GPT sampling speed: KV-cache decoding vs a naive full-forward loop, with per-token overhead.

    python -m scripts.benchmark_sampling                                   # tiny and GPT-B, 256 tokens
    python -m scripts.benchmark_sampling --configs GPT-B --tokens 64 --batch-sizes 1,8 --naive-max-batch 1

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
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F

from autoregressive.config import GPT_PRESETS
from autoregressive.generate import GuidanceSchedule, apply_guidance, draw_uniforms, sample_token
from autoregressive.model import GPT
from utils.cli import OneLineArgumentParser
from utils.errors import run_cli

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
    parser.add_argument("--configs", type=lambda t: t.split(","), default=["tiny", "GPT-B"],
                        help=f"comma-separated presets from {', '.join(GPT_PRESETS)}")
    parser.add_argument("--batch-sizes", type=ints, default=[1, 8, 32])
    parser.add_argument("--tokens", type=int, default=256, help="codes generated per image")
    parser.add_argument("--guidance", type=lambda t: [{"on": True, "off": False}[v] for v in t.split(",")],
                        default=[False, True], help="'off', 'on' or 'off,on'")
    parser.add_argument("--naive-max-batch", type=int, default=8,
                        help="run the naive loop only up to this batch (it is slow: O(n²) per image)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (best is kept)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on CUDA)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs if c not in GPT_PRESETS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {', '.join(GPT_PRESETS)}")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device}, {torch.get_num_threads()} threads")
    results = run(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    run_cli(main)
