"""Auxiliary losses of tokenizer training: LPIPS, REPA, optional PatchGAN (docs/method.md §1).

Every network here is frozen except the discriminator; every loss returns one scalar term that the
trainer names, weights and logs (flow matching, codebook and commitment live with the model):

    lpips = LPIPS(pretrained=True).to(device)                     # tokenizer/lpips.py
    repa = RepaFeatureExtractor(REPA_ENCODER_PRESETS["dinov2_vitb14"]).to(device)
    terms["lpips"] = lpips(images, predicted_clean).mean()        # (B,) -> scalar
    terms["repa"] = repa_loss(repa_head_tokens, repa(images))     # (B, 256, 768) each -> scalar
    terms["gan"] = generator_loss(disc(predicted_clean))          # tokenizer/discriminator.py

REPA (Yu et al. 2024, as used by D-AR): the pixel decoder's REPA head, pooled to a G x G grid, is
pulled towards frozen DINOv2 ViT-B/14 patch features of the input image at 224 px (16 x 16 = 256
patches for v1, matching G = 16) by minimising the mean of (1 - cosine similarity) over tokens.

DINOv2 weights, in order: ``weights`` (a local timm ``model.safetensors`` or the original
``dinov2_vitb14_pretrain.pth``); the original file in the torch hub cache if the official D-AR code
already put it there (``$TORCH_HOME/hub/checkpoints``); timm's Hugging Face repo through the hub cache
(``HF_HUB_OFFLINE=1`` works once cached). Offline and uncached -> :class:`WeightsNotFoundError` naming
the file and ``--repa-weight 0``.

The ``tiny`` encoder preset is a random-init ViT of the same family sized for the ``tiny`` tokenizer
(2 x 2 patches of width 16). It has no pretrained weights: a run that uses it (CPU tests, the offline
demo) exercises the REPA code path but does NOT align with DINOv2 features.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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
from utils.hub import WeightsNotFoundError, hf_download_command, resolve_file

__all__ = [
    "DISCRIMINATOR_PRESETS",
    "LPIPS",
    "REPA_ENCODER_PRESETS",
    "DiscriminatorConfig",
    "PatchGANDiscriminator",
    "RepaEncoderConfig",
    "RepaFeatureExtractor",
    "WeightsNotFoundError",
    "default_weights_file",
    "adaptive_gan_weight",
    "discriminator_loss",
    "gan_active",
    "generator_loss",
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
    """The DINOv2 file for an unmodified encoder: torch hub cache (official code's copy), then the HF hub."""
    if config.is_modified:
        raise WeightsNotFoundError(
            f"REPA encoder {config.model_name} with overrides (embed_dim={config.embed_dim}, depth={config.depth}, "
            f"num_heads={config.num_heads}) has no published weights: pass a weights file, use pretrained=False "
            f"(random features, for tests/demos only), {_REPA_OFF_SWITCH}."
        )
    if config.torch_hub_filename:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / config.torch_hub_filename
        if cached.is_file():
            return cached
    try:
        return resolve_file(config.hub_repo, config.hub_filename)
    except WeightsNotFoundError as error:
        raise WeightsNotFoundError(
            f"REPA needs frozen DINOv2 weights for {config.model_name} and none were found. Provide either "
            f"`{config.hub_filename}` from https://huggingface.co/{config.hub_repo} (into the Hugging Face cache "
            f"with `{hf_download_command(config.hub_repo, config.hub_filename)}`, or as a local path) or "
            f"`{config.torch_hub_filename}` from {config.torch_hub_url} (local path, or put it in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}), {_REPA_OFF_SWITCH}.\nHub lookup said: {error}"
        ) from error


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

