"""Streaming speed: the pipelined path of ``autoregressive.stream`` against the sequential one, same run.

    python -m scripts.benchmark_streaming            # one guided GPT-B + tokenizer-v1 image at 256² (minutes on CPU)
    python -m scripts.benchmark_streaming --quick    # the same models, pixel decoder at 128² (4x fewer pixels)
    python -m scripts.benchmark_streaming --tiny     # the tiny presets (seconds; a smoke test of this script)

Both models have random weights (speed does not depend on them; every float tensor is perturbed so
that the tokenizer's zero-initialised gates do not make the equality check vacuous). One image of
``--label`` with linear guidance ``--cfg-scale`` is streamed with ``pipeline=False`` and
``pipeline=True`` alternately, one warm-up call each, then ``--repeats`` timed calls each, so both
see the same machine load. Reported per path: time to the first preview and to the final image
(min and median), and their ratios sequential / pipelined (> 1: pipelining is faster). Equality:
every yielded record's codes and preview must be identical between the two paths (fp32).
``--decoder-threads`` sets the CPU decoder thread's intra-op threads (default: the caller's; other
counts may change the float rounding, which the equality check then reports). On CUDA the times are
taken after a device synchronisation. On a shared machine other processes' load distorts all times.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from autoregressive import GPT, GPT_PRESETS, stream
from tokenizer import TOKENIZER_PRESETS, DARTokenizer
from utils.cli import OneLineArgumentParser, positive_int
from utils.distributed import resolve_device
from utils.errors import call_cli
from utils.fileio import atomic_write_text


def perturbed(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator).to(tensor.device) * scale)
    return model.eval()


def build(size: str, device: torch.device, seed: int) -> tuple[GPT, DARTokenizer]:
    """(GPT, tokenizer) of ``size``: "full" (GPT-B, v1 at 256²), "quick" (v1 sampling at 128²) or "tiny"."""
    if size == "tiny":
        gpt_config = replace(GPT_PRESETS["tiny"], class_dropout_prob=0.1)
        tok_config = TOKENIZER_PRESETS["tiny"]
        gpt_config = replace(gpt_config, vocab_size=tok_config.vq_codebook_size, block_size=tok_config.num_all_queries)
    else:
        gpt_config, tok_config = GPT_PRESETS["GPT-B"], TOKENIZER_PRESETS["v1"]
        if size == "quick":
            tok_config = replace(tok_config, sampling_resolution=tok_config.sampling_resolution // 2)
    torch.manual_seed(seed)
    gpt = perturbed(GPT(gpt_config), seed, 0.02).to(device)
    tokenizer = perturbed(DARTokenizer(tok_config), seed + 1, 0.02).to(device)
    return gpt, tokenizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_stream(gpt: GPT, tokenizer: DARTokenizer, labels: torch.Tensor, seeds: list[int], cfg: tuple[float, float],
                 pipeline: bool, decoder_threads: int | None) -> tuple[float, float, list]:
    """(seconds to the first preview, seconds to the final image, the yielded records on the CPU)."""
    device = tokenizer.device
    _sync(device)
    start = time.perf_counter()
    first = None
    records = []
    for step in stream(gpt, tokenizer, labels, cfg_scale=cfg, seeds=seeds, pipeline=pipeline,
                       decoder_threads=decoder_threads):
        if step.preview is not None:
            step.preview.sum().item()  # the consumer looks at it: waits for it on any device
            if first is None:
                first = time.perf_counter() - start
        records.append(step)
    final = time.perf_counter() - start
    records = [(s.groups, s.steps, s.codes.cpu(), None if s.preview is None else s.preview.cpu()) for s in records]
    return first, final, records


def same_records(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for (ga, sa, ca, pa), (gb, sb, cb, pb) in zip(a, b):
        if ga != gb or sa != sb or not torch.equal(ca, cb):
            return False
        if (pa is None) != (pb is None) or (pa is not None and not torch.equal(pa, pb)):
            return False
    return True


def summary(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values)}


def run_benchmark(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    size = "tiny" if args.tiny else "quick" if args.quick else "full"
    gpt, tokenizer = build(size, device, args.seed)
    labels = torch.tensor([args.label % gpt.config.num_classes], device=device)  # tiny: 10 classes
    cfg = (1.0, args.cfg_scale)
    times: dict[str, dict[str, list[float]]] = {p: {"first": [], "final": []} for p in ("sequential", "pipelined")}
    equal = True
    reference = None
    for repeat in range(args.repeats + 1):  # repeat 0 is the warm-up of both paths
        for name in ("sequential", "pipelined"):
            first, final, records = timed_stream(gpt, tokenizer, labels, [args.seed + repeat], cfg,
                                                 name == "pipelined", args.decoder_threads)
            if name == "sequential":
                reference = records
            else:
                equal = equal and same_records(reference, records)
            if repeat:
                times[name]["first"].append(first)
                times[name]["final"].append(final)
                print(f"repeat {repeat} {name:10s} first preview {first:7.2f} s   final image {final:7.2f} s", flush=True)
    result = {
        "size": size,
        "device": str(device),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpu_count": torch.get_num_threads() if device.type == "cpu" else None,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "repeats": args.repeats,
        "decoder_threads": args.decoder_threads,
        "tokens": gpt.config.block_size,
        "resolution": tokenizer.config.sampling_resolution,
        "outputs_equal": equal,
    }
    for name, series in times.items():
        result[name] = {key: summary(values) for key, values in series.items()}
    for key in ("first", "final"):
        for stat in ("min", "median"):
            result[f"speedup_{key}_{stat}"] = result["sequential"][key][stat] / result["pipelined"][key][stat]
    return result


def report(result: dict) -> str:
    lines = [f"{result['size']} ({result['tokens']} tokens, {result['resolution']}² pixels) on {result['device']}, "
             f"torch {result['torch']}, intra-op threads {result['cpu_count']}, decoder threads "
             f"{result['decoder_threads'] or 'as the caller'}, {result['repeats']} repeats, {result['date']}",
             f"{'path':12s} {'first preview min / median':>28s} {'final image min / median':>28s}"]
    for name in ("sequential", "pipelined"):
        first, final = result[name]["first"], result[name]["final"]
        lines.append(f"{name:12s} {first['min']:12.2f} s / {first['median']:7.2f} s"
                     f" {final['min']:12.2f} s / {final['median']:7.2f} s")
    lines.append(f"{'speed-up':12s} {result['speedup_first_min']:13.2f}x / {result['speedup_first_median']:6.2f}x"
                 f" {result['speedup_final_min']:13.2f}x / {result['speedup_final_median']:6.2f}x")
    lines.append(f"outputs equal (codes and every preview, bit for bit): {result['outputs_equal']}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(prog="python -m scripts.benchmark_streaming", description=__doc__.split("\n\n")[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="pixel decoder at 128² instead of 256²")
    sizes.add_argument("--tiny", action="store_true", help="tiny presets (a smoke test)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed calls per path after one warm-up")
    parser.add_argument("--decoder-threads", type=positive_int, default=None,
                        help="CPU: intra-op threads of the decoder thread (default: the caller's)")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU: torch.set_num_threads first")
    parser.add_argument("--label", type=int, default=207)
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="linear guidance 1.0 → this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_benchmark(args)
    print(report(result))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n")
    return result


def cli(argv: list[str] | None = None) -> int:
    """``python -m scripts.benchmark_streaming ARGV`` run in this process (argv None: ``sys.argv[1:]``); returns
    the exit status instead of exiting."""
    return call_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
