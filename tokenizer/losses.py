"""Auxiliary losses of tokenizer training: LPIPS, REPA, optional PatchGAN (docs/method.md §1).

Every network here is frozen except the discriminator; every loss returns one scalar term that
:class:`TokenizerObjective` names, weights and hands the trainer (flow matching, codebook and commitment
live with the model). The objective is the whole loss of tokenizer training, the trainer only calls it:

    objective = TokenizerObjective(cfg.train.loss, build_loss_networks(...), model, max_steps, precision)
    loss, terms = objective.generator_loss(out, images, step)    # terms: {"flow": ..., "lpips": ..., ...}
    disc = objective.discriminator_loss(images, out)             # only while objective.gan_active(step)

The networks on their own:

    lpips = LPIPS(pretrained=True).to(device)                     # tokenizer/lpips.py
    repa = RepaFeatureExtractor(REPA_ENCODER_PRESETS["dinov2_vitb14"]).to(device)
    terms["lpips"] = lpips(images, predicted_clean).mean()        # (B,) -> scalar; training: lpips_term
    terms["repa"] = repa_loss(repa_head_tokens, repa(images))     # (B, 256, 768) each -> scalar
    terms["gan"] = generator_loss(disc(predicted_clean))          # tokenizer/discriminator.py

REPA (Yu et al. 2024, as used by D-AR): the pixel decoder's REPA head, pooled to a G x G grid, is
pulled towards frozen DINOv2 ViT-B/14 patch features of the input image at 224 px (16 x 16 = 256
patches for v1, matching G = 16) by minimising the mean of (1 - cosine similarity) over tokens.

DINOv2 weights, in order: ``weights`` (a local timm ``model.safetensors`` or the original
``dinov2_vitb14_pretrain.pth``); the original file in the loss-network cache (``utils.hub.cache_dir``:
``$DAR_CACHE``, by default ``$TORCH_HOME/hub/checkpoints``, where the official D-AR code's torch.hub
puts it); timm's Hugging Face repo, fetched into that cache (a copy in the Hugging Face cache is used
as it is). Offline and uncached -> :class:`WeightsNotFoundError` naming the file, the ``hf download``
command that fills the cache and ``--repa-weight 0``.

The ``tiny`` encoder preset is a random-init ViT of the same family sized for the ``tiny`` tokenizer
(2 x 2 patches of width 16). It has no pretrained weights: a run that uses it (CPU tests, the offline
demo) exercises the REPA code path but does NOT align with DINOv2 features.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer.discriminator import (
    DISCRIMINATOR_PRESETS,
    DiscriminatorConfig,
    PatchGANDiscriminator,
    adaptive_gan_weight,
    discriminator_loss,
    gan_active,
    generator_loss,
)
from tokenizer.lpips import LPIPS
from utils.checkpoint import load_state_file
from utils.config import ConfigError
from utils.distributed import DistEnv, local_rank_zero_first
from utils.hub import WeightsNotFoundError, cache_dir, fetch_hub_file
from utils.training import OptimConfig, autocast, build_optimizer, learning_rate, set_lr, unwrap_model

if TYPE_CHECKING:
    from tokenizer.model import DARTokenizer, TokenizerTrainOutput

__all__ = [
    "DISCRIMINATOR_PRESETS",
    "LPIPS",
    "REPA_ENCODER_PRESETS",
    "DiscriminatorConfig",
    "LossConfig",
    "LossNetworks",
    "TokenizerObjective",
    "WeightFiles",
    "build_loss_networks",
    "loss_terms",
    "term_weights",
    "total_loss",
    "PatchGANDiscriminator",
    "RepaEncoderConfig",
    "RepaFeatureExtractor",
    "WeightsNotFoundError",
    "default_weights_file",
    "adaptive_gan_weight",
    "discriminator_loss",
    "gan_active",
    "generator_loss",
    "lpips_term",
    "repa_loss",
]

_REPA_OFF_SWITCH = "or turn the REPA term off with `--repa-weight 0`"


@dataclass(frozen=True)
class RepaEncoderConfig:
    """The frozen ViT whose patch tokens are REPA's targets.

    ``embed_dim`` / ``depth`` / ``num_heads`` override the timm architecture (None keeps it); a
    modified architecture has no published weights, so it needs ``pretrained=False`` or ``weights=``.
    """

    model_name: str = "vit_base_patch14_dinov2.lvd142m"
    img_size: int = 224  # 224 / 14 = 16 patches a side = the v1 REPA grid
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    antialias: bool = True  # resize of the input images to img_size (the official code resizes without)
    hub_repo: str = "timm/vit_base_patch14_dinov2.lvd142m"
    hub_filename: str = "model.safetensors"
    # Where the official D-AR code (torch.hub facebookresearch/dinov2) caches the same weights.
    torch_hub_filename: str | None = "dinov2_vitb14_pretrain.pth"
    torch_hub_url: str = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth"

    def __post_init__(self) -> None:
        if self.img_size < 1:
            raise ConfigError(f"RepaEncoderConfig.img_size must be positive, got {self.img_size}")

    @property
    def is_modified(self) -> bool:
        return any(v is not None for v in (self.embed_dim, self.depth, self.num_heads))


REPA_ENCODER_PRESETS: dict[str, RepaEncoderConfig] = {
    "dinov2_vitb14": RepaEncoderConfig(),
    # Matches TOKENIZER_PRESETS["tiny"] (REPA grid 2, width 16); random weights only, see module docstring.
    "tiny": RepaEncoderConfig(img_size=28, embed_dim=16, depth=1, num_heads=2),
}


class RepaFeatureExtractor(nn.Module):
    """Frozen ViT patch features. (B, 3, H, W) in [-1, 1] -> (B, N, D), N = (img_size / patch)^2.

    Images are resized to ``img_size`` (bicubic), normalised with the ImageNet mean/std and run
    through the ViT; the output drops the class and register tokens and keeps the final LayerNorm
    (DINOv2's ``x_norm_patchtokens``). Features are computed without autograd and returned in float32
    as ordinary tensors (usable as a loss target).
    """

    def __init__(
        self,
        config: RepaEncoderConfig = RepaEncoderConfig(),
        pretrained: bool = True,
        weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        overrides = {
            k: getattr(config, k) for k in ("embed_dim", "depth", "num_heads") if getattr(config, k) is not None
        }
        if not pretrained and weights is not None:
            raise ValueError("RepaFeatureExtractor(pretrained=False) builds random weights; do not also pass weights")
        if pretrained and weights is None:
            weights = default_weights_file(config)  # before building the ViT: fail fast when offline
        import timm  # here, not at module level: timm (and the torchvision it loads) add seconds to every start

        self.vit = timm.create_model(
            config.model_name, pretrained=False, img_size=config.img_size, num_classes=0, **overrides
        )
        if pretrained:
            self.load_weights(weights)
        from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

        self.register_buffer("mean", torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> RepaFeatureExtractor:
        # Frozen network: a parent's .train() must not switch it out of eval mode.
        return super().train(False)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.vit.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def embed_dim(self) -> int:
        return self.vit.embed_dim

    def load_weights(self, source: str | os.PathLike | dict[str, torch.Tensor]) -> None:
        """Strictly load timm-format or original DINOv2 weights; position embeddings are resampled to the grid."""
        if isinstance(source, dict):
            state, where = source, "(state dict)"
        else:
            path = Path(source).expanduser()
            if not path.is_file():
                raise WeightsNotFoundError(
                    f"REPA encoder weights {path} do not exist; provide that file, {_REPA_OFF_SWITCH}"
                )
            state, where = load_state_file(path), str(path)
        if not isinstance(state, dict):
            raise ValueError(f"REPA encoder weights {where}: expected a state dict, got {type(state).__name__}")
        # timm's own converter: original-DINOv2 key names -> timm, pos_embed 37x37 (518 px) -> the
        # model's grid. Bicubic without antialias is how DINOv2 itself interpolates at 224 px.
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(dict(state), self.vit, interpolation="bicubic", antialias=False)
        expected = self.vit.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise KeyError(
                f"REPA encoder weights {where}: missing key(s) {missing or 'none'}; "
                f"unexpected key(s) {unexpected or 'none'}"
            )
        self.vit.load_state_dict(state, strict=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"REPA encoder expects (B, 3, H, W) images in [-1, 1], got {tuple(images.shape)}")
        size = self.config.img_size
        # inference_mode: no autograd bookkeeping for the frozen 86M-param target network; the
        # clone below turns the result into a normal tensor that a loss may save for backward.
        with torch.inference_mode():
            x = (images.float() + 1.0) / 2.0
            x = (x - self.mean) / self.std
            if x.shape[-2:] != (size, size):
                x = F.interpolate(
                    x, size=(size, size), mode="bicubic", align_corners=False, antialias=self.config.antialias
                )
            tokens = self.vit.forward_features(x)  # (B, prefix + N, D)
            patches = tokens[:, self.vit.num_prefix_tokens :].float()  # (B, N, D)
        return patches.clone()


def default_weights_file(config: RepaEncoderConfig) -> Path:
    """The DINOv2 file for an unmodified encoder, from the loss-network cache (``utils.hub.cache_dir``).

    The official code's file (torch hub's ``dinov2_vitb14_pretrain.pth``) when it is there, else timm's
    ``model.safetensors``, fetched into the cache when missing.
    """
    if config.is_modified:
        raise WeightsNotFoundError(
            f"REPA encoder {config.model_name} with overrides (embed_dim={config.embed_dim}, depth={config.depth}, "
            f"num_heads={config.num_heads}) has no published weights: pass a weights file, use pretrained=False "
            f"(random features, for tests/demos only), {_REPA_OFF_SWITCH}."
        )
    if config.torch_hub_filename:
        official = cache_dir() / config.torch_hub_filename
        if official.is_file():
            return official
    also = (f" (or put {config.torch_hub_filename} from {config.torch_hub_url} into {cache_dir()})"
            if config.torch_hub_filename else "")
    return fetch_hub_file(config.hub_repo, config.hub_filename, f"REPA's frozen DINOv2 weights for {config.model_name}",
                          f"pass --dinov2-weights FILE{also}, {_REPA_OFF_SWITCH}")


def repa_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over batch and tokens of (1 - cos(pred, target)): 0 when aligned, 2 when opposite.

    pred: (B, N, D) REPA-head tokens (B, G^2, 768 for v1); target: (B, N, D) frozen encoder patch
    features (DINOv2 at 224 px: 16 x 16 = 256 patches). The target gets no gradient.
    """
    if pred.ndim != 3 or pred.shape != target.shape:
        raise ValueError(
            f"REPA: the tokenizer's REPA head gives {tuple(pred.shape)} but the encoder gives {tuple(target.shape)}; "
            f"both must be (B, N, D) with N = G^2 the pooled grid (v1: G = 16, DINOv2 ViT-B/14 at 224 px = "
            f"16 x 16 = 256 patches, D = 768). Make the tokenizer's repa_pool_grid**2 and repa_out_dim match the encoder's "
            f"(img_size / patch)**2 and width."
        )
    cosine = F.cosine_similarity(pred.float(), target.detach().float(), dim=-1)  # (B, N)
    return (1.0 - cosine).mean()



# ------------------------------------------------------------------------------------------------
# The objective: which terms, their weights and schedules, and the discriminator's optimizer
# ------------------------------------------------------------------------------------------------
# taming / LlamaGen discriminator optimizer: same LR, no warmup of its own (it starts at gan_start_step).
DISC_OPTIM = OptimConfig(lr=2e-4, betas=(0.9, 0.95), weight_decay=0.0, decay_matrices_only=False, grad_clip=1.0)


@dataclass(frozen=True)
class LossConfig:
    """The ``train.loss`` section of a tokenizer recipe (docs/method.md §1 "Tokenizer training losses")."""

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
    repa_encoder: str = "dinov2_vitb14"  # key of REPA_ENCODER_PRESETS
    repa_pretrained: bool = True  # false: random-init encoder, same caveat as above
    # The paper's tokenizer recipe has no GAN; the option is weight 0.5 from step 20k (docs/method.md §1
    # "Tokenizer training losses").
    gan_weight: float = 0.0
    gan_start_step: int = 20000
    gan_loss: Literal["non_saturating", "hinge"] = "non_saturating"
    adaptive_gan_weight: bool = False  # VQGAN balance at the pixel decoder's last layer
    discriminator: str = "patchgan"  # key of DISCRIMINATOR_PRESETS
    disc_optim: OptimConfig = DISC_OPTIM


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


def term_weights(w: LossConfig) -> dict[str, float]:
    return {"flow": w.flow_weight, "codebook": w.codebook_weight, "commitment": w.commitment_weight,
            "entropy": w.entropy_weight, "lpips": w.perceptual_weight, "pixel": w.pixel_weight,
            "repa": w.repa_weight, "gan": w.gan_weight}


def build_loss_networks(w: LossConfig, files: WeightFiles, env: DistEnv, log: Any) -> LossNetworks:
    """Frozen LPIPS / REPA encoder and the discriminator for the terms with a non-zero weight.

    Local rank 0 of each node builds first (it may fetch missing weights into the cache folder,
    ``utils.hub.cache_dir``); the node's other ranks then read them from there.
    """
    try:
        nets = local_rank_zero_first(partial(_build_loss_networks, w, files, log))
    except WeightsNotFoundError as error:
        raise WeightsNotFoundError(f"{error} (tokenizer.train takes local files with --vgg-weights, --lpips-weights "
                                   "and --dinov2-weights)") from error
    for net in (nets.lpips, nets.repa, nets.disc):
        if net is not None:
            net.to(env.device)
    return nets


def _build_loss_networks(w: LossConfig, files: WeightFiles | None, log: Any) -> LossNetworks:
    files = files or WeightFiles()
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


# Images per LPIPS pass while training. Kept until the step's backward, the term's VGG16 activations were
# 11.5 GiB of the v1 recipe's micro-batch of 64 in bf16 (scripts.estimate_memory), so the term is computed
# and differentiated this many images at a time.
LPIPS_CHUNK = 8


class _PrecomputedGradient(torch.autograd.Function):
    """A scalar ``value`` whose gradient with respect to ``inputs`` was computed already (``grad``)."""

    @staticmethod
    def forward(ctx: Any, inputs: torch.Tensor, value: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second-order gradient would silently be zero
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return (grad.float() * grad_output).to(grad.dtype), None, None  # one rounding, as a plain backward


def lpips_term(lpips: nn.Module, images: torch.Tensor, recon: torch.Tensor, chunk: int = LPIPS_CHUNK) -> torch.Tensor:
    """Mean LPIPS distance of ``recon`` (B, 3, H, W) to ``images``, as a term of the generator loss.

    While gradients are recorded, the term is evaluated ``chunk`` images at a time and each chunk's
    backward through the VGG16 runs at once, down to ``recon``; only dLPIPS/d(recon) (the size of the
    images) is kept for the loss's backward. Without this the VGG activations of the whole micro-batch
    stayed alive until the backward of the step, at the moment the model's activations peak. Same value
    and gradient (up to the rounding of a different batch size), no recomputation. Targets that require
    grad themselves take the plain path.
    """
    if not (torch.is_grad_enabled() and recon.requires_grad) or images.requires_grad:
        return lpips(images, recon).mean()
    batch = recon.shape[0]
    value = recon.new_zeros((), dtype=torch.float32)
    grads = []
    for begin in range(0, batch, chunk):
        part = recon[begin:begin + chunk].detach().requires_grad_(True)
        distance = lpips(images[begin:begin + chunk], part).sum() / batch
        with torch.autocast(recon.device.type, enabled=False):  # a backward, like the step's own, outside autocast
            (grad,) = torch.autograd.grad(distance, part)
        value = value + distance.detach()
        grads.append(grad)
    return _PrecomputedGradient.apply(recon, value, torch.cat(grads))


def last_decoder_layer(model: DARTokenizer) -> torch.Tensor:
    """The pixel decoder's output weight, where the adaptive GAN weight compares gradient norms."""
    decoder = unwrap_model(model).pixel_decoder
    return decoder.linear_out.linear.weight if decoder.cfg.mlp_head else decoder.conv_out.weight


def loss_terms(
    out: TokenizerTrainOutput, images: torch.Tensor, nets: LossNetworks, weights: dict[str, float], use_gan: bool
) -> dict[str, torch.Tensor]:
    """Unweighted scalar terms of the generator objective (only those that are switched on)."""
    terms = dict(out.losses)  # flow, codebook, commitment
    if nets.lpips is not None:
        terms["lpips"] = lpips_term(nets.lpips, images, out.clean_image)
    if weights["pixel"] > 0:
        terms["pixel"] = F.mse_loss(out.clean_image.float(), images.float())
    if nets.repa is not None:
        terms["repa"] = repa_loss(out.repa, nets.repa(images))  # (B, g², D) vs (B, N, D)
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


class TokenizerObjective:
    """The whole tokenizer loss: weighted terms, the GAN's start step and adaptive weight, the discriminator.

    ``nets.disc`` may be DDP-wrapped; ``model`` is the (unwrapped) tokenizer whose pixel decoder's last
    layer the adaptive GAN weight looks at. The discriminator's optimizer lives here too (its LR schedule
    starts at ``gan_start_step``); the trainer checkpoints it as ``disc_optimizer``.
    """

    def __init__(self, cfg: LossConfig, nets: LossNetworks, model: nn.Module, max_steps: int,
                 precision: str = "fp32") -> None:
        self.cfg, self.nets, self.max_steps, self.precision = cfg, nets, max_steps, precision
        self.weights = term_weights(cfg)
        self.entropy_temperature = cfg.entropy_temperature if cfg.entropy_weight > 0 else None
        self.last_layer = last_decoder_layer(model) if cfg.adaptive_gan_weight and nets.disc is not None else None
        self.disc_optimizer: torch.optim.Optimizer | None = None
        if nets.disc is not None:
            device = next(unwrap_model(nets.disc).parameters()).device
            self.disc_optimizer = build_optimizer(unwrap_model(nets.disc), cfg.disc_optim, device)

    @property
    def disc(self) -> nn.Module | None:
        return self.nets.disc

    def gan_active(self, step: int) -> bool:
        """Whether the GAN terms (generator and discriminator) are on at the 0-based ``step``."""
        return self.nets.disc is not None and gan_active(step, self.cfg.gan_start_step)

    def generator_loss(self, out: TokenizerTrainOutput, images: torch.Tensor,
                       step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted total, unweighted named terms [+ "gan_balance" with the adaptive weight])."""
        with autocast(images.device, self.precision):
            terms = loss_terms(out, images, self.nets, self.weights, self.gan_active(step))
        loss, balance = total_loss(terms, self.weights, self.cfg.adaptive_gan_weight, self.last_layer)
        if balance is not None:
            terms["gan_balance"] = balance
        return loss, terms

    def discriminator_loss(self, images: torch.Tensor, out: TokenizerTrainOutput) -> torch.Tensor:
        """The discriminator's loss on real ``images`` and the (detached) predicted clean images."""
        with autocast(images.device, self.precision):
            # Real and fake in one forward: one DDP reduction, and per-sample GroupNorm keeps them independent.
            logits = self.nets.disc(torch.cat([images, out.clean_image.detach()])).float()
            real, fake = logits[: images.shape[0]], logits[images.shape[0]:]
            return discriminator_loss(real, fake, kind=self.cfg.gan_loss)

    def begin_step(self, step: int) -> float | None:
        """Set the discriminator's LR and clear its gradients when the GAN is on; its LR (None when off)."""
        if not self.gan_active(step):
            return None
        start = self.cfg.gan_start_step
        lr = learning_rate(step - start, self.max_steps - start, self.cfg.disc_optim)
        set_lr(self.disc_optimizer, lr)
        self.disc_optimizer.zero_grad(set_to_none=True)
        return lr

    def clip_discriminator(self) -> torch.Tensor:
        """Clip the discriminator's gradients (``disc_optim.grad_clip``, 0 = measure only); their norm."""
        clip = self.cfg.disc_optim.grad_clip if self.cfg.disc_optim.grad_clip > 0 else math.inf
        return torch.nn.utils.clip_grad_norm_(unwrap_model(self.nets.disc).parameters(), clip)
