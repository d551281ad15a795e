"""Train the sequential diffusion tokenizer with all D-AR losses (docs/method.md §1 "Tokenizer training losses").

    torchrun --nproc_per_node=8 -m tokenizer.train --config configs/tokenizer/train_v1.yaml \
        --data-path /data/imagenet/train --results-dir results/tokenizer_v1

(``python -m tokenizer.train ...`` runs the same thing in one process; gloo on CPU, nccl on CUDA.)

Objective per step, each a named term with its weight in ``train.loss``:
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

Run folder: ``config.yaml``; ``metrics.jsonl`` (per logged step: ``step``, ``epoch``, ``loss`` and every
term averaged over the steps since the previous line, ``lr``, ``grad_norm``, ``images_per_s`` summed
over ranks; ``disc``/``disc_lr`` while the GAN is on; a ``bad_files`` record at every epoch end);
``checkpoints/step_XXXXXXX.pt`` + ``latest`` (``utils.training`` layout, plus top-level ``ema`` and
``tokenizer_config`` entries so that ``DARTokenizer.from_pretrained(checkpoint)`` loads the EMA
tokenizer); ``samples/step_XXXXXXX.png`` (EMA reconstructions: input | reconstruction | the
streaming previews); ``final/`` (EMA weights via ``save_pretrained``) once ``max_steps`` is reached.
``--resume auto`` continues from the latest checkpoint; a run killed at any moment and resumed on
the same world size logs exactly the losses of an uninterrupted run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from dataset.images import (
    BadFileStats,
    CenterCrop,
    ImageFolderDataset,
    RandomCropFlip,
    SkipImage,
    collate_skip_bad,
    decode_rgb,
)
from dataset.sampler import ResumableDistributedSampler
from tokenizer.config import TOKENIZER_PRESETS, TokenizerConfig, load_tokenizer_config
from tokenizer.losses import (
    DISCRIMINATOR_PRESETS,
    LPIPS,
    REPA_ENCODER_PRESETS,
    PatchGANDiscriminator,
    RepaFeatureExtractor,
    WeightsNotFoundError,
    adaptive_gan_weight,
    discriminator_loss,
    gan_active,
    generator_loss,
    repa_loss,
)
from tokenizer.flow import TIME_SAMPLINGS, TimeSampling
from tokenizer.model import DARTokenizer, TokenizerTrainOutput
from tokenizer.reconstruct import save_reconstruction_grid
from utils.checkpoint import CheckpointManager
from autoregressive.config import GPTConfig
from utils.config import ConfigError, config_differences, dataclass_from_dict, dataclass_to_dict, keys_fit, load_yaml
from utils.distributed import (
    DistEnv,
    all_reduce_mean,
    all_reduce_sum,
    barrier,
    gradient_sync,
    resolve_device,
    run_then_cleanup,
    seed_everything,
    setup_distributed,
)
from utils.run import RunFolder, create_logger, start_log_file
from utils.training import (
    InfiniteLoader,
    NonFiniteGuard,
    OptimConfig,
    Throughput,
    WandbLogger,
    add_common_train_args,
    all_ranks_agree,
    check_finite_weights,
    check_fresh_start,
    check_optim,
    check_positive_ints,
    check_results_dir,
    check_run_options,
    check_weights_source,
    open_image_folder,
    require_setting,
    autocast,
    build_optimizer,
    create_ema,
    default_precision,
    learning_rate,
    load_train_checkpoint,
    resolve_resume,
    save_train_checkpoint,
    set_lr,
    unwrap_model,
    finish_cli_config,
    normalise_common_args,
    update_ema,
)
from utils.cli import OneLineArgumentParser
from utils.errors import UserError, require_path, run_cli

# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------
# Official recipe (docs/method.md §1 "Tokenizer training recipe"): AdamW 2e-4, wd 0, betas (0.9, 0.95),
# 500 warmup steps then constant, clip 1.0, EMA 0.999.
OFFICIAL_OPTIM = OptimConfig(
    lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, decay_matrices_only=False, warmup_steps=500,
    schedule="constant", grad_clip=1.0, ema_decay=0.999,
)
# taming / LlamaGen discriminator optimizer: same LR, no warmup of its own (it starts at gan_start_step).
DISC_OPTIM = OptimConfig(lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, decay_matrices_only=False, grad_clip=1.0)


@dataclass(frozen=True)
class LossConfig:
    flow_weight: float = 1.0
    codebook_weight: float = 1.0
    commitment_weight: float = 1.0  # β itself is model.commitment_beta; this multiplies β·commitment
    # Codebook-usage entropy term (tokenizer.model.Quantizer.entropy_loss); 0 in the paper's recipe.
    # Short runs (the offline demo) collapse onto a few dozen codes without it.
    entropy_weight: float = 0.0
    entropy_temperature: float = 0.01
    perceptual_weight: float = 0.5
    # MSE between the input and the predicted clean image x_t + (1 − t)·v, the image LPIPS compares; 0 in the
    # paper's recipe. It needs no weights, so the offline demo uses it where LPIPS cannot run. Added to the
    # flow loss it re-weights the error towards high noise, where only the condition tokens know the image.
    pixel_weight: float = 0.0
    # false: random-init LPIPS network (tests / offline smoke runs only; loudly warned about)
    perceptual_pretrained: bool = True
    repa_weight: float = 0.5
    repa_encoder: str = "dinov2_vitb14"  # key of tokenizer.losses.REPA_ENCODER_PRESETS
    repa_pretrained: bool = True  # false: random-init encoder, same caveat as above
    # The paper's tokenizer recipe has no GAN; the option is weight 0.5 from step 20k (docs/method.md §1
    # "Tokenizer training losses").
    gan_weight: float = 0.0
    gan_start_step: int = 20000
    gan_loss: Literal["non_saturating", "hinge"] = "non_saturating"
    adaptive_gan_weight: bool = False  # VQGAN balance at the pixel decoder's last layer
    discriminator: str = "patchgan"  # key of tokenizer.losses.DISCRIMINATOR_PRESETS
    disc_optim: OptimConfig = DISC_OPTIM


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
    # Flow-matching draws per image and step (tokenizer.model.DARTokenizer.forward): 1 is the paper's recipe;
    # K > 1 encodes each image once and trains the pixel decoder on K stratified noise levels of it (MAR's
    # diffusion batch multiplier). It pays when the encoder is a large share of a step; on the offline demo
    # (pixel decoder ~60 % of a step) K = 2 at equal time was worse: 13.4 vs 14.2 dB held-out PSNR.
    flow_draws: int = 1
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
    compile: bool = False
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
    if keys_fit(GPTConfig, data) or (keys_fit(GPTConfig, model) and not keys_fit(TokenizerConfig, model)):
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
                            "flow_draws": "--flow-draws", "log_every": "--log-every", "ckpt_every": "--ckpt-every",
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


def term_weights(w: LossConfig) -> dict[str, float]:
    return {"flow": w.flow_weight, "codebook": w.codebook_weight, "commitment": w.commitment_weight,
            "entropy": w.entropy_weight, "lpips": w.perceptual_weight, "pixel": w.pixel_weight,
            "repa": w.repa_weight, "gan": w.gan_weight}


# ------------------------------------------------------------------------------------------------
# Loss networks and the objective
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightFiles:
    """Local weight files for the frozen loss networks (None: the usual caches / downloads)."""

    lpips: str | None = None  # LPIPS v0.1 linear heads (vgg.pth)
    vgg: str | None = None  # torchvision vgg16-397923af.pth
    dinov2: str | None = None  # timm model.safetensors or dinov2_vitb14_pretrain.pth


@dataclass
class LossNetworks:
    lpips: nn.Module | None
    repa: nn.Module | None
    disc: nn.Module | None


def build_loss_networks(w: LossConfig, files: WeightFiles, env: DistEnv, log: Any) -> LossNetworks:
    """Frozen LPIPS / REPA encoder and the discriminator for the terms with a non-zero weight.

    Rank 0 builds first (it may download into the shared cache), the others after it.
    """
    if not env.is_main:
        barrier()
    try:
        nets = _build_loss_networks(w, files, log)
    except WeightsNotFoundError as error:
        raise WeightsNotFoundError(f"{error}\n(tokenizer.train takes local files with --vgg-weights, --lpips-weights "
                                   "and --dinov2-weights)") from error
    if env.is_main:
        barrier()
    for net in (nets.lpips, nets.repa, nets.disc):
        if net is not None:
            net.to(env.device)
    return nets


def _build_loss_networks(w: LossConfig, files: WeightFiles, log: Any) -> LossNetworks:
    nets = LossNetworks(None, None, None)
    if w.perceptual_weight > 0 and not w.perceptual_pretrained:
        log.warning("!!! LPIPS uses RANDOM weights (perceptual_pretrained: false): the perceptual term is NOT "
                    "LPIPS. Only for tests and offline smoke runs. !!!")
        nets.lpips = LPIPS(pretrained=False)
    elif w.perceptual_weight > 0:
        nets.lpips = LPIPS(pretrained=True, backbone_weights=files.vgg, head_weights=files.lpips)
    preset = REPA_ENCODER_PRESETS[w.repa_encoder]
    if w.repa_weight > 0 and not w.repa_pretrained:
        log.warning("!!! the REPA encoder uses RANDOM weights (repa_pretrained: false): REPA does NOT align with "
                    "DINOv2. Only for tests and offline smoke runs. !!!")
        nets.repa = RepaFeatureExtractor(preset, pretrained=False)
    elif w.repa_weight > 0:
        nets.repa = RepaFeatureExtractor(preset, pretrained=True, weights=files.dinov2)
    if w.gan_weight > 0:
        nets.disc = PatchGANDiscriminator(DISCRIMINATOR_PRESETS[w.discriminator])
    return nets


def last_decoder_layer(model: DARTokenizer) -> torch.Tensor:
    """The pixel decoder's output weight, where the adaptive GAN weight compares gradient norms."""
    decoder = model.pixel_decoder
    return decoder.linear_out.linear.weight if decoder.cfg.mlp_head else decoder.conv_out.weight


def loss_terms(
    out: TokenizerTrainOutput, images: torch.Tensor, nets: LossNetworks, weights: dict[str, float], use_gan: bool
) -> dict[str, torch.Tensor]:
    """Unweighted scalar terms of the generator objective (only those that are switched on)."""
    terms = dict(out.losses)  # flow, codebook, commitment
    targets = out.expand(images)  # each image once per flow draw, lined up with out.clean_image
    if nets.lpips is not None:
        terms["lpips"] = nets.lpips(targets, out.clean_image).mean()
    if weights["pixel"] > 0:
        terms["pixel"] = F.mse_loss(out.clean_image.float(), targets.float())
    if nets.repa is not None:
        terms["repa"] = repa_loss(out.repa, out.expand(nets.repa(images)))  # (B·K, g², D) vs (B·K, N, D)
    if use_gan:
        disc = unwrap_model(nets.disc)
        disc.requires_grad_(False)  # the generator step must not touch the discriminator's gradients
        terms["gan"] = generator_loss(disc(out.clean_image))
        disc.requires_grad_(True)
    return {k: v.float() for k, v in terms.items() if weights[k] > 0 or k in out.losses}


def total_loss(
    terms: dict[str, torch.Tensor], weights: dict[str, float], adaptive: bool, last_layer: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weighted sum; with ``adaptive`` the GAN weight is scaled by the VQGAN gradient-norm balance."""
    loss = sum(weights[k] * v for k, v in terms.items() if k != "gan")
    balance = None
    if "gan" in terms:
        gan_weight = weights["gan"]
        if adaptive:
            reconstruction = sum(terms[k] * weights[k] for k in ("flow", "lpips", "pixel") if k in terms)
            balance = adaptive_gan_weight(reconstruction, terms["gan"], last_layer)
            gan_weight = gan_weight * balance
        loss = loss + gan_weight * terms["gan"]
    return loss, balance


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunOptions:
    """Per-launch settings that do not change what is trained."""

    results_dir: str
    resume: str | None = None
    device: str = "auto"
    keep_last: int = 3
    stop_after_step: int | None = None  # checkpoint and exit here without changing the schedule
    weights: WeightFiles = field(default_factory=WeightFiles)
    wandb: bool = False
    wandb_project: str = "dar"


def sample_images(dataset: ImageFolderDataset, image_size: int, count: int) -> torch.Tensor:
    """The first ``count`` decodable training files, ADM centre-cropped: (n, 3, H, W) in [-1, 1]."""
    crop, images = CenterCrop(image_size), []
    for path in dataset.files:
        if len(images) == count:
            break
        try:
            image, _ = decode_rgb(path, dataset.min_size)
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


def main(cfg: TokenizerTrainConfig, opts: RunOptions) -> dict[str, Any]:
    """Train; returns ``{"step": last step, "results_dir": ...}``."""
    return run_then_cleanup(_train, cfg, opts)


def _train(cfg: TokenizerTrainConfig, opts: RunOptions) -> dict[str, Any]:
    """The body of :func:`main`, which tears the process group down after it."""
    # -- distributed (first: --device cuda without a GPU is the first thing to say) -------------
    env = setup_distributed(opts.device)

    # -- every input is checked before the run folder is created --------------------------------
    check_settings(cfg)
    check_run_options(opts.keep_last, opts.stop_after_step)
    cfg = with_activation_checkpointing(cfg)
    t = cfg.train
    d = t.data
    require_path(d.data_path, "--data-path")
    check_weights_source(t.init_from, "--init-from")
    precision = default_precision(env.device) if t.precision == "auto" else t.precision
    t = replace(t, precision=precision)
    cfg = replace(cfg, train=t)
    if t.global_batch_size % (env.world_size * t.grad_accum_steps):
        raise ConfigError(f"--global-batch-size {t.global_batch_size} is not divisible by world size "
                          f"{env.world_size} x grad_accum_steps {t.grad_accum_steps}")
    batch_size = t.global_batch_size // (env.world_size * t.grad_accum_steps)  # per rank, per micro-batch
    weights = term_weights(t.loss)
    entropy_temperature = t.loss.entropy_temperature if t.loss.entropy_weight > 0 else None
    check_results_dir(opts.results_dir)
    run = RunFolder(opts.results_dir, env.is_main, create=False)
    manager = CheckpointManager(run.checkpoints, keep_last=opts.keep_last)
    resume_path = resolve_resume(opts.resume, manager)
    check_fresh_start(resume_path, manager)
    if env.is_main:
        manager.sweep()  # temporaries of checkpoint writes a kill interrupted (before any rank can write)
    logger = create_logger("tokenizer.train", None, env.is_main, defer_file=True)
    seed_everything(t.seed)  # identical initialisation on every rank
    nets = build_loss_networks(t.loss, opts.weights, env, logger)  # first: missing weight files fail fast
    transform = RandomCropFlip(t.image_size, d.min_crop_frac, d.max_crop_frac, d.flip)
    dataset = open_image_folder(lambda: ImageFolderDataset(d.data_path, transform, with_labels=False, seed=t.seed,
                                                           min_size=d.min_size), d.data_path)
    sampler = ResumableDistributedSampler(len(dataset), env.world_size, env.rank, seed=t.seed, drop_last=True)
    steps_per_epoch = sampler.num_samples // (batch_size * t.grad_accum_steps)
    if steps_per_epoch == 0:
        raise ConfigError(f"{d.data_path} holds {len(dataset)} images, no full batch of {t.global_batch_size}; "
                          "pass a smaller --global-batch-size")
    init_state = None
    if t.init_from is not None and resume_path is None:
        # Fine-tuning starts from the source's EMA weights (from_pretrained prefers them), strictly.
        init_state = DARTokenizer.from_pretrained(t.init_from, config=cfg.model).state_dict()

    # -- run folder ----------------------------------------------------------------------------
    run.create()
    if env.is_main:
        start_log_file(logger, run.root)
    if resume_path is None:
        run.truncate_metrics(0)  # lines of an earlier launch that died before its first checkpoint
    run.save_config(cfg)

    # -- model / EMA / loss networks -----------------------------------------------------------
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
    logger.info(f"tokenizer: {num_params / 1e6:.1f}M parameters; EMA {t.optim.ema_decay or 'off'}; terms "
                + ", ".join(f"{k}×{v:g}" for k, v in weights.items() if v > 0))
    if t.compile:
        model.compile()
    ddp_args = {"device_ids": [env.device.index]} if env.device.type == "cuda" else {}
    trained = DistributedDataParallel(model, **ddp_args) if env.distributed else model
    disc = nets.disc
    if disc is not None and env.distributed:
        nets.disc = DistributedDataParallel(disc, **ddp_args)

    # -- optimizer -----------------------------------------------------------------------------
    optimizer = build_optimizer(model, t.optim, env.device)
    guard = NonFiniteGuard(t.optim.max_bad_steps)
    modules: dict[str, nn.Module] = {"model": model}
    optimizers: dict[str, torch.optim.Optimizer] = {"optimizer": optimizer}
    if ema is not None:
        modules["ema"] = ema
    if disc is not None:
        modules["disc"] = disc
        optimizers["disc_optimizer"] = build_optimizer(disc, t.loss.disc_optim, env.device)

    # -- data ----------------------------------------------------------------------------------
    # Bad-file counts: this rank's since the last sync, and the epoch's global total up to that sync
    # (synced at checkpoints too, so a resumed run still reports whole epochs).
    bad = {"local": BadFileStats(), "synced": BadFileStats()}
    state: dict[str, Any] = {"step": 0}

    def sync_bad_files() -> None:
        bad["synced"].update(bad["local"].all_reduce(env.device))
        bad["local"] = BadFileStats()

    def on_epoch_end(epoch: int) -> None:
        sync_bad_files()
        total = bad["synced"]
        logger.info(f"epoch {epoch} done: {total.summary()}")
        # Logged with the step being fetched, so a resume's metrics truncation treats it like that step.
        run.log_metrics({"step": state["step"] + 1, "epoch_end": epoch,
                         **{f"bad_files/{k}": v for k, v in total.to_dict().items()}})
        if total.seen > 0 and total.num_skipped == total.seen:
            raise UserError(f"epoch {epoch}: every one of the {total.seen} files in {d.data_path} was skipped "
                            f"({total.summary()}); check the folder holds readable images")
        bad["synced"] = BadFileStats()

    loader = InfiniteLoader(dataset, sampler, batch_size, env.world_size, num_workers=d.num_workers,
                            collate_fn=collate_skip_bad, pin_memory=env.device.type == "cuda", on_epoch_end=on_epoch_end)
    accum = f" in {t.grad_accum_steps} micro-batches of {batch_size}" if t.grad_accum_steps > 1 else ""
    logger.info(f"{len(dataset)} images, {steps_per_epoch} steps/epoch, {t.max_steps} steps, batch "
                f"{t.global_batch_size} over {env.world_size} rank(s){accum}, {precision} on {env.device}")

    # -- resume --------------------------------------------------------------------------------
    seed_everything(t.seed * env.world_size + env.rank)  # per-rank time / noise streams
    window: dict[str, float] = {}
    empty_batches = 0
    if resume_path is not None:
        extra = load_train_checkpoint(resume_path, env, modules, optimizers, log=logger.warning)
        state["step"] = extra["step"]
        loader.load_state_dict(extra["loader"])
        guard.load_state_dict(extra["guard"])
        window = dict(extra["window"])
        empty_batches = int(extra["empty_batches"])
        bad["synced"] = BadFileStats(**extra["bad_files"])
        for diff in config_differences(extra["config"], dataclass_to_dict(cfg)):
            logger.warning(f"config changed since the checkpoint: {diff}")
        run.truncate_metrics(state["step"])
        logger.info(f"resumed from {resume_path} at step {state['step']}")
    wandb = WandbLogger(opts.wandb, env, opts.wandb_project, run.root.name, cfg)

    def save(at_step: int) -> None:
        sync_bad_files()
        extra = {"loader": loader.state_dict(), "guard": guard.state_dict(), "window": dict(window),
                 "empty_batches": empty_batches, "bad_files": dataclasses.asdict(bad["synced"]),
                 "config": dataclass_to_dict(cfg)}
        # from_pretrained reads `ema` (else `model`) and `tokenizer_config`; the tensors are shared
        # with `modules`, so the file does not grow.
        weights_key = "ema" if ema is not None else "model"
        aliases = {weights_key: modules[weights_key].state_dict(), "tokenizer_config": dataclass_to_dict(cfg.model)}
        save_train_checkpoint(manager, env, at_step, cfg, modules, optimizers, extra=extra, aliases=aliases)
        logger.info(f"saved checkpoint at step {at_step}")

    # -- loop ----------------------------------------------------------------------------------
    last_step = t.max_steps if opts.stop_after_step is None else min(t.max_steps, opts.stop_after_step)
    sample_batch = sample_images(dataset, t.image_size, t.num_sample_images) if env.is_main else None
    throughput = Throughput()
    last_layer = last_decoder_layer(model) if t.loss.adaptive_gan_weight and disc is not None else None
    disc_lr: float | None = None
    while state["step"] < last_step:
        step = state["step"]
        lr = learning_rate(step, t.max_steps, t.optim)
        set_lr(optimizer, lr)
        use_gan = disc is not None and gan_active(step, t.loss.gan_start_step)
        optimizer.zero_grad(set_to_none=True)
        if use_gan:
            disc_optimizer = optimizers["disc_optimizer"]
            disc_lr = learning_rate(step - t.loss.gan_start_step, t.max_steps - t.loss.gan_start_step, t.loss.disc_optim)
            set_lr(disc_optimizer, disc_lr)
            disc_optimizer.zero_grad(set_to_none=True)
        micro: list[dict[str, torch.Tensor]] = []  # per micro-batch: "loss", then its terms
        micro_gan: list[dict[str, torch.Tensor]] = []  # per micro-batch: "disc"[, "gan_balance"]
        images_this_step = 0
        while len(micro) < t.grad_accum_steps:
            batch = next(loader)
            bad["local"].update(batch.stats)
            if not all_ranks_agree(batch.images.shape[0] > 0, env.device):
                empty_batches += 1  # some rank drew only bad files: every rank skips this batch together
                logger.warning(f"step {step + 1}: skipped a batch without decodable images on some rank")
                continue
            images = batch.images.to(env.device, non_blocking=True)  # (B, 3, H, W) in [-1, 1]
            sync = len(micro) == t.grad_accum_steps - 1  # reduce gradients over ranks on the last micro-batch only
            with gradient_sync(trained, sync):
                with autocast(env.device, precision):
                    out = trained(images, entropy_temperature=entropy_temperature, draws=t.flow_draws,
                                  time_sampling=t.time_sampling)
                    terms = loss_terms(out, images, nets, weights, use_gan)
                loss, balance = total_loss(terms, weights, t.loss.adaptive_gan_weight, last_layer)
                (loss / t.grad_accum_steps).backward()
            record = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
            if use_gan:
                with gradient_sync(nets.disc, sync), autocast(env.device, precision):
                    # Real and fake in one forward: one DDP reduction, and per-sample GroupNorm keeps them
                    # independent. With K flow draws there are K fakes per real image; each side is averaged
                    # on its own.
                    logits = nets.disc(torch.cat([images, out.clean_image.detach()])).float()
                    real_logits, fake_logits = logits[: images.shape[0]], logits[images.shape[0]:]
                    disc_loss = discriminator_loss(real_logits, fake_logits, kind=t.loss.gan_loss)
                    (disc_loss / t.grad_accum_steps).backward()
                micro_gan.append({"disc": disc_loss.detach(),
                                  **({"gan_balance": balance.detach()} if balance is not None else {})})
            micro.append(record)
            images_this_step += images.shape[0]
        clip = t.optim.grad_clip if t.optim.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        names = list(micro[0])
        reduced = all_reduce_mean(torch.stack([torch.stack([m[k] for m in micro]).mean() for k in names]))
        record_terms = dict(zip(names, reduced))
        if use_gan:
            disc_clip = t.loss.disc_optim.grad_clip if t.loss.disc_optim.grad_clip > 0 else math.inf
            disc_norm = torch.nn.utils.clip_grad_norm_(disc.parameters(), disc_clip)
            for key in micro_gan[0]:
                record_terms[key] = all_reduce_mean(torch.stack([m[key] for m in micro_gan]).mean())
        if guard.check(reduced, grad_norm, *([record_terms["disc"], disc_norm] if use_gan else [])):
            optimizer.step()
            if use_gan:
                optimizers["disc_optimizer"].step()
            if ema is not None:
                update_ema(ema, model, t.optim.ema_decay)
            for key, value in record_terms.items():
                window[key] = window.get(key, 0.0) + float(value)
            window["count"] = window.get("count", 0.0) + 1
        else:
            logger.warning(f"step {step + 1}: non-finite loss or gradient, update skipped ({guard.consecutive} in a row)")
        state["step"] = step = step + 1
        throughput.add(images_this_step)

        if step % t.log_every == 0 or step == last_step:
            rate = all_reduce_sum(torch.tensor(throughput.rate(), device=env.device)).item()
            count = window.pop("count", 0.0)
            record: dict[str, Any] = {"step": step, "epoch": loader.epoch + loader.consumed_in_epoch / (
                steps_per_epoch * t.global_batch_size)}
            record.update({k: v / count for k, v in window.items()} if count else {"loss": float("nan")})
            record.update(lr=lr, grad_norm=grad_norm.item(), images_per_s=rate)
            if disc_lr is not None:
                record["disc_lr"] = disc_lr
            if env.device.type == "cuda":
                record["max_mem_gb"] = torch.cuda.max_memory_allocated(env.device) / 2**30
            if guard.total or empty_batches:
                record.update(skipped_steps=guard.total, empty_batches=empty_batches)
            run.log_metrics(record)
            wandb.log(record)
            logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            window = {}
        if sample_batch is not None and len(sample_batch) and (step % t.sample_every == 0 or step == last_step):
            write_samples(ema if ema is not None else model, sample_batch, t.seed, run.samples / f"step_{step:07d}.png")
        if step % t.ckpt_every == 0 or step == last_step:
            save(step)

    # -- save ----------------------------------------------------------------------------------
    if state["step"] >= t.max_steps:
        if env.is_main:
            final = unwrap_model(ema if ema is not None else model)
            check_finite_weights(final, f"the final tokenizer weights to {run.root / 'final'}")
            final.save_pretrained(run.root / "final")
        logger.info(f"done: {state['step']} steps; bad files this epoch so far: {bad['synced'].summary()}; "
                    f"inference weights in {run.root / 'final'}")
    else:
        logger.info(f"stopped after step {state['step']} of {t.max_steps}; continue with --resume auto")
    wandb.finish()
    return {"step": state["step"], "results_dir": str(run.root)}


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
        ("init_from", args.init_from), ("image_size", args.image_size), ("flow_draws", args.flow_draws),
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


def parse_args(argv: list[str] | None = None) -> tuple[TokenizerTrainConfig, RunOptions]:
    parser = OneLineArgumentParser(prog="python -m tokenizer.train", description=__doc__.split("\n\n")[0])
    add_common_train_args(parser)
    parser.add_argument("--data-path", default=None, help="training images (class folders or a flat tree)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--perceptual-weight", type=float, default=None, help="LPIPS weight (0 turns LPIPS off)")
    parser.add_argument("--pixel-weight", type=float, default=None,
                        help="MSE between input and predicted clean image (0 = off, the paper's recipe)")
    parser.add_argument("--grad-accum-steps", "--gradient-accumulation-steps", dest="grad_accum_steps", type=int,
                        default=None, help="micro-batches per optimizer step")
    parser.add_argument("--flow-draws", type=int, default=None,
                        help="flow-matching draws per image and step (1 = the paper's recipe; K > 1: MAR's "
                             "diffusion batch multiplier, stratified noise levels)")
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
    opts = RunOptions(
        results_dir=args.results_dir, resume=args.resume, device=args.device, keep_last=args.keep_last,
        stop_after_step=args.stop_after_step, wandb=args.wandb, wandb_project=args.wandb_project,
        weights=WeightFiles(lpips=args.lpips_weights, vgg=args.vgg_weights, dinov2=args.dinov2_weights),
    )
    return cfg, opts


if __name__ == "__main__":
    run_cli(lambda: main(*parse_args()))
