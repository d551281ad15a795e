"""Optional PatchGAN loss for tokenizer training: non-saturating, weight 0.5, from step 20k (docs/method.md §1).

The discriminator is the pix2pix / taming-transformers ``NLayerDiscriminator``: a 4x4 stride-2 conv
and LeakyReLU(0.2), ``num_layers - 1`` more stride-2 convs with normalisation, one stride-1 conv with
normalisation, and a final stride-1 conv to one logit per overlapping patch.

Normalisation and DDP. taming/LlamaGen use BatchNorm. Under DDP plain BatchNorm normalises each
rank's local batch (so results depend on the per-rank batch size), its running statistics are
overwritten from rank 0 at every forward, and calling a DDP-wrapped BatchNorm discriminator twice
(real, then fake) before one backward trips autograd's in-place-version check. GroupNorm has none
of these problems: it is per sample, has no buffers, and gives identical numbers for any world size
(which the exact-resume guarantee relies on). It is therefore the default (``norm="group"``, 16 groups
as in the official D-AR discriminator). ``norm="batch"`` reproduces taming exactly; on CUDA wrap it
with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` and feed real and fake in one forward
(``torch.cat``) if you use it under DDP. SyncBatchNorm does not run on CPU/gloo.

The official D-AR discriminator additionally modulates its norms with the diffusion time; that
variant is not implemented (the paper's tokenizer recipe trains without a GAN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.config import ConfigError

GanLossKind = Literal["non_saturating", "hinge"]
NormKind = Literal["group", "batch"]


@dataclass(frozen=True)
class DiscriminatorConfig:
    """PatchGAN architecture; widths are ``base_channels * min(2**n, 8)`` as in taming."""

    in_channels: int = 3
    base_channels: int = 64  # ndf
    num_layers: int = 3  # 256 px -> 30x30 logits
    norm: NormKind = "group"
    num_groups: int = 16  # GroupNorm only

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.base_channels < 1 or self.in_channels < 1:
            raise ConfigError("DiscriminatorConfig: num_layers, base_channels and in_channels must be positive")
        if self.norm not in ("group", "batch"):
            raise ConfigError(f"DiscriminatorConfig.norm must be 'group' or 'batch', got {self.norm!r}")
        if self.norm == "group":
            for width in self.normalized_widths():
                if width % self.num_groups:
                    raise ConfigError(f"GroupNorm: width {width} is not divisible by num_groups={self.num_groups}")

    def widths(self) -> list[int]:
        """Output channels of each conv before the final 1-channel one."""
        return [self.base_channels * min(2**n, 8) for n in range(self.num_layers + 1)]

    def normalized_widths(self) -> list[int]:
        return self.widths()[1:]


DISCRIMINATOR_PRESETS: dict[str, DiscriminatorConfig] = {
    "patchgan": DiscriminatorConfig(),
    "tiny": DiscriminatorConfig(base_channels=16, num_layers=2, num_groups=4),
}


class PatchGANDiscriminator(nn.Module):
    """(B, C, H, W) images in [-1, 1] -> (B, 1, H', W') real/fake logits, one per receptive-field patch."""

    def __init__(self, config: DiscriminatorConfig = DiscriminatorConfig()) -> None:
        super().__init__()
        self.config = config
        widths = config.widths()
        layers: list[nn.Module] = [
            nn.Conv2d(config.in_channels, widths[0], kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2),
        ]
        for n in range(1, config.num_layers + 1):
            stride = 2 if n < config.num_layers else 1
            # No conv bias before a norm with its own shift (taming's use_bias=False for BatchNorm).
            layers += [
                nn.Conv2d(widths[n - 1], widths[n], kernel_size=4, stride=stride, padding=1, bias=False),
                self._norm(widths[n]),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(widths[-1], 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init_weights)

    def _norm(self, channels: int) -> nn.Module:
        if self.config.norm == "batch":
            return nn.BatchNorm2d(channels)
        return nn.GroupNorm(self.config.num_groups, channels)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # DCGAN/pix2pix init, as taming: N(0, 0.02) convs, N(1, 0.02) norm scales.
        if isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, 0.0, 0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(module.weight, 1.0, 0.02)
            nn.init.zeros_(module.bias)

    def output_size(self, size: int) -> int:
        """Logit-map side length for an input side length (k=4, p=1 convs)."""
        for n in range(self.config.num_layers + 1):
            size = (size - 2) // 2 + 1 if n < self.config.num_layers else size - 1
        return size - 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(f"discriminator expects (B, {self.config.in_channels}, H, W), got {tuple(images.shape)}")
        if min(self.output_size(s) for s in images.shape[-2:]) < 1:
            raise ValueError(
                f"images of size {tuple(images.shape[-2:])} are too small for a {self.config.num_layers}-layer PatchGAN"
            )
        return self.main(images)


def generator_loss(logits_fake: torch.Tensor, kind: GanLossKind = "non_saturating") -> torch.Tensor:
    """Adversarial term for the generator from D's logits on generated images -> scalar.

    non_saturating: mean softplus(-D(fake)) = -log sigmoid(D(fake)); hinge: -mean D(fake).
    """
    logits_fake = logits_fake.float()
    if kind == "non_saturating":
        return F.softplus(-logits_fake).mean()
    if kind == "hinge":
        return -logits_fake.mean()
    raise ValueError(f"unknown GAN loss {kind!r}; expected 'non_saturating' or 'hinge'")


def discriminator_loss(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, kind: GanLossKind = "non_saturating"
) -> torch.Tensor:
    """Discriminator objective -> scalar (taming halves both kinds; Adam makes that factor immaterial).

    non_saturating: mean softplus(-D(real)) + mean softplus(D(fake)) (binary cross-entropy);
    hinge: mean relu(1 - D(real)) + mean relu(1 + D(fake)).
    """
    logits_real, logits_fake = logits_real.float(), logits_fake.float()
    if kind == "non_saturating":
        return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()
    if kind == "hinge":
        return F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; expected 'non_saturating' or 'hinge'")


def gan_active(step: int, disc_start_step: int) -> bool:
    """Whether the adversarial terms (generator and discriminator updates) are on at ``step`` (0-based)."""
    return step >= disc_start_step


def adaptive_gan_weight(
    reconstruction_loss: torch.Tensor,
    gan_loss: torch.Tensor,
    last_layer: torch.Tensor,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """VQGAN's balance (Esser et al. 2021, eq. 7): ||grad rec|| / (||grad gan|| + eps) at the last layer.

    ``last_layer`` is the generator's final weight (e.g. the pixel decoder's output projection); both
    losses must depend on it. Returns a detached scalar clamped to [0, max_weight], to be multiplied
    with the configured GAN weight. Off by default in the recipe. Under DDP the norms are those of the
    local rank's losses (as in taming/LlamaGen). Keeps both graphs alive for the following backward.
    """
    rec_grad, = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)
    weight = rec_grad.float().norm() / (gan_grad.float().norm() + eps)
    return weight.clamp(0.0, max_weight).detach()
