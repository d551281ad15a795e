"""Train the sequential diffusion tokenizer with all D-AR losses (docs/method.md §1 "Tokenizer training losses").

    torchrun --nproc_per_node=8 -m tokenizer.train --config configs/tokenizer/train_v1.yaml \
        --data-path /data/imagenet/train --results-dir results/tokenizer_v1

(``python -m tokenizer.train ...`` runs the same thing in one process; gloo on CPU, nccl on CUDA.)

Objective per step (:class:`tokenizer.losses.TokenizerObjective`), each a named term with its weight in
``train.loss``:
    flow        flow-matching MSE / data_std² at one random time per image (tokenizer.flow)
    codebook    VQ codebook loss, masked to the codes up to the trained group
    commitment  β · commitment loss (β = model.commitment_beta), same mask
    entropy     optional codebook-usage entropy term (0 in the paper's recipe)
    lpips       LPIPS-VGG16 between the input and the predicted clean image x_t + (1 − t)·v
    pixel       optional MSE between the input and that predicted clean image (0 in the paper's recipe)
    repa        1 − cosine between the pixel decoder's REPA head and frozen DINOv2 ViT-B/14 patch features
    gan         optional non-saturating PatchGAN generator loss on the predicted clean image, from
                ``gan_start_step`` (the discriminator has its own optimizer; its loss is logged as ``disc``)
A term whose weight is 0 is neither computed nor its network built (so ``--perceptual-weight 0`` /
``--repa-weight 0`` train offline without those weights).

Recipe: one YAML (``configs/tokenizer/train_*.yaml``) with ``model:`` (a preset name, a model YAML
path relative to the recipe, or a mapping with optional ``preset:`` plus overrides) and ``train:``
(:class:`TokenizerTrainSettings`); unknown keys are errors, CLI flags override single fields and the
fully resolved :class:`TokenizerTrainConfig` is written to ``RESULTS/config.yaml``.

The loop, checkpoints, metrics and export are ``utils.trainer``'s, shared with ``autoregressive.train``.
Run folder: ``config.yaml``; ``metrics.jsonl`` (per logged step: ``step``, ``epoch``, ``loss`` and every
term averaged over the steps since the previous line, ``lr``, ``grad_norm``, ``images_per_s`` summed
over ranks; ``disc``/``disc_lr`` while the GAN is on; a ``bad_files`` record at every epoch end);
``checkpoints/step_XXXXXXX.pt`` + ``latest`` (``utils.training`` layout, plus top-level ``ema`` and
``tokenizer_config`` entries so that ``DARTokenizer.from_pretrained(checkpoint)`` loads the EMA
tokenizer); ``samples/step_XXXXXXX.png`` (EMA reconstructions: input | reconstruction | the
streaming previews); once ``max_steps`` is reached ``final/`` (the EMA weights, via ``save_pretrained``)
and ``final_raw/`` (the trained weights without averaging; only when the run keeps an EMA).
``--resume auto`` continues from the latest checkpoint; a run killed at any moment and resumed on
the same world size logs exactly the losses of an uninterrupted run. Resume is elastic: each global step
trains on the same images at any world size (``dataset.sampler``'s global-batch layout), and each image's
flow time and noise come from its own generator seeded by (seed, epoch, dataset index)
(:func:`flow_generators`), so a run continued on another number of ranks, at the same global batch and
the same per-rank micro-batch (the pooled codebook / commitment means are per micro-batch: 2 ranks → 1
rank with twice the ``--grad-accum-steps``), follows the same trajectory up to float summation order.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from autoregressive.config import GPT_PRESETS, GPTConfig
from dataset.images import (CenterCrop, DecodedImageDataset, RandomCropFlip, SkipImage, collate_skip_bad, decode_rgb,
                            to_model_range)
from dataset.shards import open_images, require_data_path
from dataset.sampler import ResumableDistributedSampler
from dataset.seeding import sample_seed
from tokenizer.config import TOKENIZER_PRESETS, TokenizerConfig, load_tokenizer_config
from tokenizer.flow import TIME_SAMPLINGS, TimeSampling
from tokenizer.losses import (
    DISCRIMINATOR_PRESETS,
    REPA_ENCODER_PRESETS,
    LossConfig,
    TokenizerObjective,
    WeightFiles,
    build_loss_networks,
)
from tokenizer.model import DARTokenizer
from tokenizer.reconstruct import save_reconstruction_grid
from utils.cli import OneLineArgumentParser
from utils.config import ConfigError, dataclass_from_dict, dataclass_to_dict, keys_fit, load_yaml
from utils.distributed import DistEnv, gradient_sync, resolve_device, run_then_cleanup, seed_everything, setup_distributed
from utils.errors import call_cli
from utils.run import create_logger, start_log_file
from utils.trainer import (
    RunContext,
    RunOptions,
    StepResult,
    TrainState,
    apply_update,
    clip_gradients,
    create_run_folder,
    finish,
    next_batch,
    open_run,
    reduce_micro_batches,
    resume,
    run_loop,
    run_options_from_args,
    track_bad_files,
)
from utils.training import (
    InfiniteLoader,
    NonFiniteGuard,
    CompileSetting,
    OptimConfig,
    WandbLogger,
    add_common_train_args,
    autocast,
    build_optimizer,
    check_finite_weights,
    check_optim,
    check_positive_ints,
    check_weights_source,
    create_ema,
    default_precision,
    finish_cli_config,
    learning_rate,
    normalise_common_args,
    require_setting,
    resolve_compile,
    set_lr,
    unwrap_model,
)

# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
# Official recipe (docs/method.md §1 "Tokenizer training recipe"): AdamW 2e-4, wd 0, betas (0.9, 0.95),
# 500 warmup steps then constant, clip 1.0, EMA 0.999.
OFFICIAL_OPTIM = OptimConfig(
    lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, decay_matrices_only=False, warmup_steps=500,
    schedule="constant", grad_clip=1.0, ema_decay=0.999,
)


@dataclass(frozen=True)
class DataConfig:
    data_path: str | None = None  # image folder (class folders or flat, read recursively; labels unused)
    min_crop_frac: float = 0.8  # ADM random-resized crop: 80-100 % of the short side
    max_crop_frac: float = 1.0
    flip: bool = True
    # Files with a shorter side below this are skipped (counted); 0 upsamples them as ADM does.
    min_size: int = 0
    num_workers: int = 4


@dataclass(frozen=True)
class TokenizerTrainSettings:
    """The ``train:`` section of a recipe."""

    image_size: int = 256
    global_batch_size: int = 512
    max_steps: int = 400_000
    # Micro-batches per optimizer step (gradient accumulation): the per-rank forward batch is
    # global_batch_size / (world size × grad_accum_steps). Per-batch statistics (the entropy term's batch
    # average, the pooled VQ means) are then taken per micro-batch; everything else equals one big batch.
    grad_accum_steps: int = 1
    # How training draws pick u: "uniform" (the paper) or "group_balanced" (every condition window gets the
    # same share of draws; under uniform u the first group gets half a middle group's share).
    time_sampling: TimeSampling = "uniform"
    optim: OptimConfig = OFFICIAL_OPTIM
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 10000
    sample_every: int = 5000
    num_sample_images: int = 8
    # torch.compile the tokenizer: "auto" = on CUDA, off on the CPU; true / false force it (--compile / --no-compile).
    compile: CompileSetting = "auto"
    # Same switch name as the GPT recipe; null leaves the model's grad_checkpointing (encoder, code decoder
    # and pixel decoder) as it is, true / false overrides it everywhere (with_activation_checkpointing).
    activation_checkpointing: bool | None = None
    init_from: str | None = None  # fine-tune: tokenizer weights (official file, our checkpoint/folder, hub id)


@dataclass(frozen=True)
class TokenizerTrainConfig:
    model: TokenizerConfig
    train: TokenizerTrainSettings


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve_model_section(value: Any, recipe_dir: Path) -> TokenizerConfig:
    """``model:`` of a recipe → :class:`TokenizerConfig` (preset, YAML path relative to the recipe, or mapping)."""
    if isinstance(value, str):
        if value in TOKENIZER_PRESETS:
            return TOKENIZER_PRESETS[value]
        path = Path(value) if Path(value).is_absolute() else recipe_dir / value
        if not path.is_file():
            raise ConfigError(f"model: {value!r} is neither a tokenizer preset ({', '.join(TOKENIZER_PRESETS)}) nor "
                              f"a model YAML ({path} does not exist)")
        return load_tokenizer_config(path)
    if isinstance(value, dict):
        section = dict(value)
        preset = section.pop("preset", None)
        if preset is not None:
            section = _merge(dataclass_to_dict(resolve_model_section(preset, recipe_dir)), section)
        return dataclass_from_dict(TokenizerConfig, section, _where="model")
    raise ConfigError(f"model: expected a preset name, a YAML path or a mapping, got {value!r}")


RECIPE_EXAMPLE = "configs/tokenizer/train_tiny.yaml"


def load_train_config(path: str | Path) -> TokenizerTrainConfig:
    """Strictly load a recipe: top-level ``model`` (required) and ``train`` (official defaults if absent)."""
    data = load_yaml(path)
    if keys_fit(TokenizerConfig, data):
        raise ConfigError(f"{path} is a model config; pass a training recipe such as {RECIPE_EXAMPLE} "
                          "(its model: entry may name this file)")
    model = data.get("model")
    preset = model.get("preset") if isinstance(model, dict) else model
    gpt_preset = isinstance(preset, str) and preset in GPT_PRESETS and preset not in TOKENIZER_PRESETS
    gpt_model = gpt_preset or (keys_fit(GPTConfig, model) and not keys_fit(TokenizerConfig, model))
    if keys_fit(GPTConfig, data) or gpt_model:
        raise ConfigError(f"{path} is a GPT config (for autoregressive.train); pass a tokenizer training recipe "
                          f"such as {RECIPE_EXAMPLE}")
    unknown = sorted(set(data) - {"model", "train"})
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s) {', '.join(unknown)}; expected 'model' and 'train'")
    if "model" not in data:
        raise ConfigError(f"{path}: a tokenizer training recipe needs a 'model' entry")
    model = resolve_model_section(data["model"], Path(path).parent)
    train = dataclass_from_dict(TokenizerTrainSettings, data.get("train") or {}, _where="train")
    return TokenizerTrainConfig(model=model, train=train)


def with_activation_checkpointing(cfg: TokenizerTrainConfig) -> TokenizerTrainConfig:
    """``train.activation_checkpointing`` (when set) written into the model's ``grad_checkpointing`` flags."""
    flag = cfg.train.activation_checkpointing
    if flag is None:
        return cfg
    pixel = replace(cfg.model.diff_decoder, grad_checkpointing=flag)
    return replace(cfg, model=replace(cfg.model, grad_checkpointing=flag, diff_decoder=pixel))


def check_settings(cfg: TokenizerTrainConfig) -> None:
    """Every setting in range before anything is built or written (a :class:`ConfigError` names the flag)."""
    t, w = cfg.train, cfg.train.loss
    if t.data.data_path is None:
        raise ConfigError("no training images: pass --data-path (or set train.data.data_path)")
    check_positive_ints(t, {"image_size": "--image-size", "global_batch_size": "--global-batch-size",
                            "max_steps": "--max-steps", "grad_accum_steps": "--grad-accum-steps",
                            "log_every": "--log-every", "ckpt_every": "--ckpt-every",
                            "sample_every": "--sample-every"})
    check_positive_ints(t, {"num_sample_images": None}, minimum=0)
    check_positive_ints(t.data, {"num_workers": "--num-workers", "min_size": None}, "data.", minimum=0)
    check_positive_ints(w, {"gan_start_step": "--gan-start-step"}, "loss.", minimum=0)
    check_optim(t.optim)
    check_optim(w.disc_optim, "loss.disc_optim.", lr_flag=None)
    if t.time_sampling not in TIME_SAMPLINGS:
        raise ConfigError(f"train.time_sampling {t.time_sampling!r}: choose one of {', '.join(TIME_SAMPLINGS)}")
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision {t.precision!r}: use fp32 or bf16 (fp16 would need loss scaling)")
    resolve_compile(t.compile, torch.device("cpu"))  # true, false or auto
    flags = {"perceptual_weight": "--perceptual-weight", "pixel_weight": "--pixel-weight",
             "repa_weight": "--repa-weight", "gan_weight": "--gan-weight", "entropy_weight": "--entropy-weight"}
    for name in ("flow_weight", "codebook_weight", "commitment_weight", "entropy_weight", "perceptual_weight",
                 "pixel_weight", "repa_weight", "gan_weight"):
        value = getattr(w, name)
        require_setting(isinstance(value, (int, float)) and math.isfinite(value) and value >= 0, f"loss.{name}",
                        value, "a finite number >= 0", flags.get(name))
    require_setting(math.isfinite(w.entropy_temperature) and w.entropy_temperature > 0, "loss.entropy_temperature",
                    w.entropy_temperature, "a finite number > 0 (must be positive)")
    if w.repa_weight > 0 and not cfg.model.diff_decoder.has_repa_head:
        raise ConfigError("train.loss.repa_weight > 0 but the model has no REPA head (diff_decoder.depth <= "
                          "repa_layer); pass --repa-weight 0")
    if w.repa_encoder not in REPA_ENCODER_PRESETS:
        raise ConfigError(f"unknown REPA encoder {w.repa_encoder!r}; choose from {', '.join(REPA_ENCODER_PRESETS)}")
    if w.discriminator not in DISCRIMINATOR_PRESETS:
        raise ConfigError(f"unknown discriminator {w.discriminator!r}; choose from {', '.join(DISCRIMINATOR_PRESETS)}")
    if not 0 < t.data.min_crop_frac <= t.data.max_crop_frac <= 1:
        raise ConfigError("train.data crop fractions must satisfy 0 < min_crop_frac <= max_crop_frac <= 1")
    if t.image_size % cfg.model.encoder_patch_size or t.image_size % cfg.model.diff_decoder.patch_size:
        raise ConfigError(f"--image-size {t.image_size} must be a multiple of both patch sizes "
                          f"({cfg.model.encoder_patch_size} and {cfg.model.diff_decoder.patch_size})")




def sample_images(dataset: DecodedImageDataset, image_size: int, count: int) -> torch.Tensor:
    """The first ``count`` decodable training files, ADM centre-cropped: (n, 3, H, W) in [-1, 1]."""
    crop, images = CenterCrop(image_size), []
    for path in dataset.files:
        if len(images) == count:
            break
        try:
            image, _ = decode_rgb(path, dataset.min_size, dataset.max_image_pixels)
        except SkipImage:
            continue
        images.append(crop(image, torch.Generator()))
    return torch.stack(images) if images else torch.empty(0, 3, image_size, image_size)


@torch.no_grad()
def write_samples(model: DARTokenizer, images: torch.Tensor, seed: int, path: Path) -> None:
    """input | reconstruction | previews grid from ``model`` (eval mode), fixed noise across steps."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    codes = model.encode(images.to(model.device))
    noise = model.make_noise(images.shape[0], generator)
    previews = model.previews(codes, noise=noise)
    save_reconstruction_grid(images, previews[-1], previews, path)
    model.train(was_training)




# ------------------------------------------------------------------------------------------------
# Main: config → data → model → objective → loop
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerRunOptions(RunOptions):
    """The shared per-launch settings plus the local weight files of the frozen loss networks."""

    weights: WeightFiles = field(default_factory=WeightFiles)


def check_inputs(cfg: TokenizerTrainConfig, env: DistEnv) -> tuple[TokenizerTrainConfig, int]:
    """Every setting and input path checked; (config with the resolved precision, per-rank micro-batch size)."""
    check_settings(cfg)
    cfg = with_activation_checkpointing(cfg)
    t = cfg.train
    require_data_path(t.data.data_path, "--data-path")
    check_weights_source(t.init_from, "--init-from")
    precision = default_precision(env.device) if t.precision == "auto" else t.precision
    cfg = replace(cfg, train=replace(t, precision=precision, compile=resolve_compile(t.compile, env.device)))
    if t.global_batch_size % (env.world_size * t.grad_accum_steps):
        raise ConfigError(f"--global-batch-size {t.global_batch_size} is not divisible by world size "
                          f"{env.world_size} x grad_accum_steps {t.grad_accum_steps}")
    return cfg, t.global_batch_size // (env.world_size * t.grad_accum_steps)


def build_data(t: TokenizerTrainSettings, env: DistEnv, batch_size: int) -> tuple[DecodedImageDataset, InfiniteLoader, int]:
    """(dataset, resumable loader, optimizer steps per epoch)."""
    d = t.data
    # uint8 out of the workers: a quarter of the bytes to pin and copy; the device converts (bit-identical).
    transform = RandomCropFlip(t.image_size, d.min_crop_frac, d.max_crop_frac, d.flip, uint8=True)
    dataset = open_images(d.data_path, transform, with_labels=False, seed=t.seed, min_size=d.min_size)
    if len(dataset) < t.global_batch_size:
        raise ConfigError(f"{d.data_path} holds {len(dataset)} images, no full batch of {t.global_batch_size}; "
                          "pass a smaller --global-batch-size")
    # Global batches cut from one permutation per epoch: the same images per step at any world size.
    sampler = ResumableDistributedSampler(len(dataset), env.world_size, env.rank, seed=t.seed, drop_last=True,
                                          global_batch_size=t.global_batch_size)
    steps_per_epoch = sampler.num_samples // (batch_size * t.grad_accum_steps)  # whole global batches
    loader = InfiniteLoader(dataset, sampler, batch_size, env.world_size, num_workers=d.num_workers,
                            collate_fn=collate_skip_bad, pin_memory=env.device.type == "cuda")
    return dataset, loader, steps_per_epoch


def build_model(cfg: TokenizerTrainConfig, env: DistEnv, init_state: dict[str, torch.Tensor] | None,
                logger: Any) -> tuple[DARTokenizer, nn.Module | None, nn.Module]:
    """(tokenizer, its EMA or None, the module the step calls: DDP-wrapped when distributed)."""
    t = cfg.train
    model = DARTokenizer(cfg.model)
    if init_state is not None:
        model.load_state_dict(init_state, strict=True)
        logger.info(f"initialised from {t.init_from}")
    model.to(env.device).train()
    if t.loss.repa_weight == 0 and cfg.model.diff_decoder.has_repa_head:
        # Unused parameters would stall DDP's gradient reduction; a frozen head is simply not trained.
        model.pixel_decoder.repa_out.requires_grad_(False)
    ema = create_ema(model) if t.optim.ema_decay > 0 else None
    num_params = sum(p.numel() for p in model.parameters())
    logger.info(f"tokenizer: {num_params / 1e6:.1f}M parameters; EMA {t.optim.ema_decay or 'off'}")
    if t.compile:
        model.compile()
    return model, ema, _ddp(model, env)


def _ddp(module: nn.Module, env: DistEnv) -> nn.Module:
    if not env.distributed:
        return module
    return DistributedDataParallel(module, **({"device_ids": [env.device.index]} if env.device.type == "cuda" else {}))


def build_state(cfg: TokenizerTrainConfig, env: DistEnv, parts: tuple, objective: TokenizerObjective,
                loader: InfiniteLoader) -> TrainState:
    """The training state: optimizer(s), guard and the modules a checkpoint holds."""
    model, ema, trained = parts
    t = cfg.train
    optimizer = build_optimizer(model, t.optim, env.device)
    modules: dict[str, nn.Module] = {"model": model}
    optimizers: dict[str, torch.optim.Optimizer] = {"optimizer": optimizer}
    if ema is not None:
        modules["ema"] = ema
    if objective.disc is not None:
        modules["disc"] = unwrap_model(objective.disc)
        optimizers["disc_optimizer"] = objective.disc_optimizer
    return TrainState(model=model, trained=trained, ema=ema, ema_decay=t.optim.ema_decay, optimizer=optimizer,
                      lr=partial(learning_rate, max_steps=t.max_steps, cfg=t.optim), loader=loader,
                      guard=NonFiniteGuard(t.optim.max_bad_steps), modules=modules, optimizers=optimizers)


def main(cfg: TokenizerTrainConfig, opts: TokenizerRunOptions) -> dict[str, Any]:
    """Train; returns ``{"step": last step, "results_dir": ...}``."""
    return run_then_cleanup(_train, cfg, opts)


def _train(cfg: TokenizerTrainConfig, opts: TokenizerRunOptions) -> dict[str, Any]:
    """The body of :func:`main`, which tears the process group down after it."""
    env = setup_distributed(opts.device)  # first: --device cuda without a GPU is the first thing to say
    cfg, batch_size = check_inputs(cfg, env)  # every input is checked before the run folder is created
    run, manager, resume_path = open_run(opts, env)
    t = cfg.train
    logger = create_logger("tokenizer.train", None, env.is_main, defer_file=True)
    seed_everything(t.seed)  # identical initialisation on every rank
    nets = build_loss_networks(t.loss, opts.weights, env, logger)  # first: missing weight files fail fast
    dataset, loader, steps_per_epoch = build_data(t, env, batch_size)
    init_state = None
    if t.init_from is not None and resume_path is None:
        # Fine-tuning starts from the source's EMA weights (from_pretrained prefers them), strictly.
        init_state = DARTokenizer.from_pretrained(t.init_from, config=cfg.model).state_dict()

    # -- run folder ----------------------------------------------------------------------------
    create_run_folder(run, manager, env, resume_path)
    if env.is_main:
        start_log_file(logger, run.root)
    run.save_config(cfg)

    # -- model, objective, state ---------------------------------------------------------------
    parts = build_model(cfg, env, init_state, logger)
    nets.disc = _ddp(nets.disc, env) if nets.disc is not None else None
    objective = TokenizerObjective(t.loss, nets, parts[0], t.max_steps, t.precision)
    logger.info("loss terms " + ", ".join(f"{k}×{v:g}" for k, v in objective.weights.items() if v > 0))
    state = build_state(cfg, env, parts, objective, loader)
    last_step = t.max_steps if opts.stop_after_step is None else min(t.max_steps, opts.stop_after_step)
    ctx = RunContext(env=env, run=run, manager=manager, logger=logger, config=cfg, max_steps=t.max_steps,
                     last_step=last_step, log_every=t.log_every, ckpt_every=t.ckpt_every,
                     steps_per_epoch=steps_per_epoch, global_batch_size=t.global_batch_size,
                     aliases=partial(checkpoint_aliases, cfg.model), elastic=True)
    track_bad_files(state, ctx, t.data.data_path)
    accum = f" in {t.grad_accum_steps} micro-batches of {batch_size}" if t.grad_accum_steps > 1 else ""
    logger.info(f"{len(dataset)} images, {steps_per_epoch} steps/epoch, {t.max_steps} steps, batch "
                f"{t.global_batch_size} over {env.world_size} rank(s){accum}, {t.precision} on {env.device}")

    # -- resume, loop, export ------------------------------------------------------------------
    # The flow draws come from per-image generators (flow_generators), not from these streams; one seed on
    # every rank keeps whatever else might draw independent of the rank too.
    seed_everything(t.seed)
    if resume_path is not None:
        resume(state, ctx, resume_path)
    ctx.wandb = WandbLogger(opts.wandb, env, opts.wandb_project, run.root.name, cfg)
    sample_batch = sample_images(dataset, t.image_size, t.num_sample_images) if env.is_main else None
    run_loop(state, ctx, partial(train_step, objective, t, ctx),
             partial(maybe_write_samples, t, ctx, sample_batch))
    return finish(state, ctx, partial(write_final, env))


# ------------------------------------------------------------------------------------------------
# One optimizer step
# ------------------------------------------------------------------------------------------------
def train_step(objective: TokenizerObjective, t: TokenizerTrainSettings, ctx: RunContext,
               state: TrainState) -> StepResult:
    """``grad_accum_steps`` micro-batches, then one update of the tokenizer (and the discriminator)."""
    lr = state.lr(state.step)
    set_lr(state.optimizer, lr)
    state.optimizer.zero_grad(set_to_none=True)
    disc_lr = objective.begin_step(state.step)
    records: list[dict[str, torch.Tensor]] = []
    images_seen = 0
    while len(records) < t.grad_accum_steps:
        batch = next_batch(state, ctx, lambda b: b.images.shape[0])
        images = to_model_range(batch.images.to(ctx.env.device, non_blocking=True))  # (B, 3, H, W) in [-1, 1]
        sync = len(records) == t.grad_accum_steps - 1  # reduce gradients over ranks on the last micro-batch only
        generators = flow_generators(batch.indices, state.loader.epoch, t.seed, images.device)
        records.append(micro_step(objective, t, state, images, generators, sync))
        images_seen += images.shape[0]
    grad_norm = clip_gradients(state.model, t.optim.grad_clip)
    terms = reduce_micro_batches(records)
    checks, others = [torch.stack(list(terms.values())), grad_norm], []
    if disc_lr is not None:
        checks.append(objective.clip_discriminator())
        others.append(objective.disc_optimizer)
    applied = apply_update(state, checks, *others)
    extras = {"disc_lr": disc_lr} if disc_lr is not None else {}
    return StepResult(terms=terms, grad_norm=grad_norm, lr=lr, items=images_seen, applied=applied, extras=extras)


def micro_step(objective: TokenizerObjective, t: TokenizerTrainSettings, state: TrainState, images: torch.Tensor,
               generators: list[torch.Generator], sync: bool) -> dict[str, torch.Tensor]:
    """Forward and backward of one micro-batch (generator, then discriminator); its detached terms."""
    with gradient_sync(state.trained, sync):
        with autocast(images.device, t.precision):
            out = state.trained(images, generators, entropy_temperature=objective.entropy_temperature,
                                time_sampling=t.time_sampling)
        loss, terms = objective.generator_loss(out, images, state.step)
        (loss / t.grad_accum_steps).backward()
    record = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
    if objective.gan_active(state.step):
        with gradient_sync(objective.disc, sync):
            disc_loss = objective.discriminator_loss(images, out)
            (disc_loss / t.grad_accum_steps).backward()
        record["disc"] = disc_loss.detach()
    return record


# Mixed into the per-image seeds so that the flow draws and the crop/flip draws of one image are
# different streams.
_FLOW_STREAM = 0x70CE_F10E


def flow_generators(indices: torch.Tensor, epoch: int, seed: int, device: torch.device) -> list[torch.Generator]:
    """One generator per image (on ``device``) for its flow time and noise, seeded from (seed, epoch, dataset
    index) like its augmentation: the same draws on any rank and at any world size, and a skipped file
    shifts no other image's draws. ``indices`` (B,) is the loader's CPU tensor, so no device value is read."""
    generators = []
    for index in indices.numpy().tolist():
        generator = torch.Generator(device)
        generator.manual_seed(sample_seed(seed, epoch, index) ^ _FLOW_STREAM)
        generators.append(generator)
    return generators


def checkpoint_aliases(model_config: TokenizerConfig, state: TrainState) -> dict[str, Any]:
    """``ema`` (else ``model``) + ``tokenizer_config``: what ``DARTokenizer.from_pretrained`` reads.

    The tensors are shared with the checkpoint's ``modules``, so the file does not grow.
    """
    key = "ema" if state.ema is not None else "model"
    return {key: state.modules[key].state_dict(), "tokenizer_config": dataclass_to_dict(model_config)}


def maybe_write_samples(t: TokenizerTrainSettings, ctx: RunContext, images: torch.Tensor | None,
                        state: TrainState) -> None:
    step = state.step
    if images is not None and len(images) and (step % t.sample_every == 0 or step == ctx.last_step):
        write_samples(state.sampling_model, images, t.seed, ctx.run.samples / f"step_{step:07d}.png")


def write_final(env: DistEnv, module: nn.Module, path: Path) -> None:
    if env.is_main:
        final = unwrap_model(module)
        check_finite_weights(final, f"the final tokenizer weights to {path}")
        final.save_pretrained(path)


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def apply_overrides(cfg: TokenizerTrainConfig, args: argparse.Namespace) -> TokenizerTrainConfig:
    """CLI flags that are set replace the recipe's fields."""
    t = cfg.train
    pick = lambda pairs: {k: v for k, v in pairs if v is not None}  # noqa: E731
    optim = replace(t.optim, **pick([("lr", args.lr), ("max_bad_steps", args.max_bad_steps),
                                     ("ema_decay", args.ema_decay)]))
    loss = replace(t.loss, **pick([("perceptual_weight", args.perceptual_weight), ("pixel_weight", args.pixel_weight),
                                   ("repa_weight", args.repa_weight),
                                   ("gan_weight", args.gan_weight), ("gan_start_step", args.gan_start_step),
                                   ("entropy_weight", args.entropy_weight)]))
    data = replace(t.data, **pick([("data_path", args.data_path), ("num_workers", args.num_workers)]))
    changes: dict[str, Any] = pick([
        ("max_steps", args.max_steps), ("global_batch_size", args.global_batch_size), ("log_every", args.log_every),
        ("ckpt_every", args.ckpt_every), ("sample_every", args.sample_every), ("seed", args.seed),
        ("init_from", args.init_from), ("image_size", args.image_size),
        ("time_sampling", args.time_sampling), ("grad_accum_steps", args.grad_accum_steps),
    ])
    if args.precision != "auto":
        changes["precision"] = args.precision
    if args.compile is not None:
        changes["compile"] = bool(args.compile)
    model = cfg.model
    if args.grad_checkpointing is not None:
        flag = args.grad_checkpointing == "on"
        model = replace(model, grad_checkpointing=flag, diff_decoder=replace(model.diff_decoder, grad_checkpointing=flag))
        changes["activation_checkpointing"] = flag  # the flag beats the recipe's train.activation_checkpointing
    return TokenizerTrainConfig(model=model, train=replace(t, optim=optim, loss=loss, data=data, **changes))


def parse_args(argv: list[str] | None = None) -> tuple[TokenizerTrainConfig, TokenizerRunOptions]:
    parser = OneLineArgumentParser(prog="python -m tokenizer.train", description=__doc__.split("\n\n")[0])
    add_common_train_args(parser)
    parser.add_argument("--data-path", default=None, help="training images (class folders or a flat tree)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--perceptual-weight", type=float, default=None, help="LPIPS weight (0 turns LPIPS off)")
    parser.add_argument("--pixel-weight", type=float, default=None,
                        help="MSE between input and predicted clean image (0 = off, the paper's recipe)")
    parser.add_argument("--grad-accum-steps", "--gradient-accumulation-steps", dest="grad_accum_steps", type=int,
                        default=None, help="micro-batches per optimizer step")
    parser.add_argument("--time-sampling", choices=TIME_SAMPLINGS, default=None,
                        help="training times: uniform (the paper) or group_balanced (equal draws per group window)")
    parser.add_argument("--repa-weight", type=float, default=None, help="REPA weight (0 turns DINOv2 off)")
    parser.add_argument("--gan-weight", type=float, default=None, help="PatchGAN generator weight (0 = no GAN)")
    parser.add_argument("--gan-start-step", type=int, default=None)
    parser.add_argument("--entropy-weight", type=float, default=None,
                        help="codebook-usage entropy term (0 = off, the paper's recipe)")
    parser.add_argument("--ema-decay", type=float, default=None, help="EMA decay (0 disables EMA)")
    parser.add_argument("--sample-every", type=int, default=None, help="reconstruction grids every N steps")
    parser.add_argument("--activation-checkpointing", "--grad-checkpointing", dest="grad_checkpointing",
                        choices=["on", "off"], default=None,
                        help="override the model config's gradient checkpointing (encoder, code decoder, pixel decoder)")
    parser.add_argument("--init-from", default=None,
                        help="fine-tune: start from these tokenizer weights (official .pt, our checkpoint or folder, hub id)")
    parser.add_argument("--lpips-weights", default=None, help="LPIPS v0.1 head file (vgg.pth)")
    parser.add_argument("--vgg-weights", default=None, help="torchvision vgg16-397923af.pth")
    parser.add_argument("--dinov2-weights", default=None, help="DINOv2 ViT-B/14 weights (timm safetensors or .pth)")
    parser.add_argument("--stop-after-step", type=int, default=None,
                        help="checkpoint and exit after this step without changing the schedule (time-limited jobs)")
    args = parser.parse_args(argv)
    resolve_device(args.device)  # --device cuda without a GPU is said before anything else
    cfg = finish_cli_config(apply_overrides(load_train_config(args.config), normalise_common_args(args)), args)
    weights = WeightFiles(lpips=args.lpips_weights, vgg=args.vgg_weights, dinov2=args.dinov2_weights)
    return cfg, TokenizerRunOptions(**run_options_from_args(args), weights=weights)


def cli(argv: list[str] | None = None) -> int:
    """``python -m tokenizer.train ARGV`` run in this process (argv None: ``sys.argv[1:]``);
    returns the exit status instead of exiting."""
    return call_cli(lambda: main(*parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(cli())
