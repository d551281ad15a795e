"""LPIPS v0.1 with the VGG16 backbone (Zhang et al. 2018), frozen, as a training loss (docs/method.md §1).

The distance between two images in [-1, 1] is computed exactly as the LPIPS reference: a fixed
per-channel affine ("scaling layer") maps the inputs to ImageNet statistics, torchvision's VGG16
``features`` are tapped after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, each tap is unit-
normalised over channels at every position, the squared difference is weighted per channel by a
non-negative 1x1 "linear head", averaged over space and summed over the five taps.

Weights (all optional to the caller, resolved in this order):
- backbone: ``backbone_weights`` (a torchvision ``vgg16-397923af.pth`` state dict, or only its
  ``features.*`` entries), else the loss-network cache (``utils.hub.cache_dir``: ``$DAR_CACHE``, by
  default the torch hub's ``$TORCH_HOME/hub/checkpoints``), else a download from torchvision's URL
  into that cache, checked against its SHA-256.
- linear heads: ``head_weights`` (the LPIPS ``weights/v0.1/vgg.pth`` file, keys
  ``lin{0..4}.model.1.weight``), else the copy bundled with the ``lpips`` pip package if it is
  installed, else the same cache, else a download of the file at a pinned commit of the LPIPS
  repository, checked against its SHA-256.
Offline with nothing cached, construction fails with :class:`WeightsNotFoundError` naming the file
to provide and ``--perceptual-weight 0`` to switch the term off.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from utils.checkpoint import load_state_file
from utils.hub import WeightsNotFoundError, fetch_url

# VGG16 configuration "D" up to relu5_3: output widths of the 13 convolutions, "M" = 2x2 max-pool.
# torchvision numbers the layers of ``features`` in this order, which fixes the state-dict keys.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices in ``features`` of the ReLUs LPIPS reads: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAP_INDICES = (3, 8, 15, 22, 29)
TAP_CHANNELS = (64, 128, 256, 512, 512)
# Four 2x2 pools lie before relu5_3; smaller inputs leave it with no spatial extent.
MIN_IMAGE_SIZE = 16

# The LPIPS scaling layer: maps [-1, 1] inputs to (x_01 - ImageNet mean) / ImageNet std.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
_NORM_EPS = 1e-10  # the reference value; keeps 0/0 at all-zero feature positions finite

VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_SHA256 = "397923af8e79cdbb6a7127f12361acd7a2f83e06b05044ddf496e83de57a5bf0"
# Cached under its own name: the upstream "vgg.pth" is too generic for a shared hub folder.
LPIPS_HEAD_FILENAME = "lpips_v0.1_vgg.pth"
LPIPS_HEAD_URL = (
    "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/"
    "082bb24f84c091ea94de2867d34c4544f68e0963/lpips/weights/v0.1/vgg.pth"
)
LPIPS_HEAD_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"

_OFF_SWITCH = "or turn the LPIPS term off with `--perceptual-weight 0`"


def _vgg16_features() -> nn.Sequential:
    """torchvision's ``vgg16().features[:30]`` (through relu5_3), built without its 120M-param classifier."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in _VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        conv = nn.Conv2d(in_channels, item, kernel_size=3, padding=1)
        # torchvision's VGG init, so a random-init network keeps non-vanishing activations at depth 13.
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU(inplace=True)]
        in_channels = item
    return nn.Sequential(*layers)


def _unit_normalize(features: torch.Tensor) -> torch.Tensor:
    """Divide each position's channel vector by its l2 norm. (B, C, H, W) -> (B, C, H, W), float32."""
    features = features.float()  # the norm of 512 bf16 squares loses too much precision
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + _NORM_EPS)


def download_to_hub_cache(url: str, filename: str, sha256: str, what: str) -> Path:
    """Return ``cache_dir() / filename`` (``utils.hub``: ``$DAR_CACHE`` or the torch hub checkpoints), fetching it if absent."""
    return fetch_url(url, filename, sha256, what, _OFF_SWITCH)


def _bundled_lpips_head() -> Path | None:
    """The v0.1 VGG head shipped inside the ``lpips`` pip package, when that package is installed."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "weights" / "v0.1" / "vgg.pth"
        if candidate.is_file():
            return candidate
    return None


def _check_keys(
    state: dict[str, Any], expected: dict[str, torch.Size], source: str, ignored_prefixes: tuple[str, ...] = ()
) -> None:
    """Strict key and shape check; ``ignored_prefixes`` name known extra parts of a standard file."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.startswith(ignored_prefixes))
    if missing or unexpected:
        raise KeyError(
            f"{source}: missing key(s) {missing or 'none'}; unexpected key(s) {unexpected or 'none'}"
        )
    for key, shape in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or value.shape != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{source}: {key} has shape {got}, expected {tuple(shape)}")


class LPIPS(nn.Module):
    """Frozen LPIPS-VGG16 v0.1 distance; gradients flow to the input images only.

    ``forward(x, y)``: two image batches (B, 3, H, W) in [-1, 1] (H, W >= 16) -> (B,) distances,
    >= 0, exactly 0 for identical images. The caller reduces (the tokenizer trainer takes the mean).
    ``pretrained=False`` builds the same architecture with random weights and touches no file or
    network (unit tests); the heads are then random non-negative so the distance stays a distance.
    """

    def __init__(
        self,
        pretrained: bool = True,
        backbone_weights: str | os.PathLike | None = None,
        head_weights: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = _vgg16_features()
        self.heads = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in TAP_CHANNELS)
        for head in self.heads:
            nn.init.uniform_(head.weight, 0.0, 1.0 / head.in_channels)
        if pretrained:
            self.load_backbone_weights(backbone_weights or self._default_backbone_file())
            self.load_head_weights(head_weights or self._default_head_file())
        elif backbone_weights is not None or head_weights is not None:
            raise ValueError("LPIPS(pretrained=False) builds random weights; do not also pass weight files")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        # Frozen network: a parent's .train() must not switch it out of eval mode.
        return super().train(False)

    @staticmethod
    def _default_backbone_file() -> Path:
        return download_to_hub_cache(VGG16_URL, VGG16_FILENAME, VGG16_SHA256, "LPIPS VGG16 backbone weights")

    @staticmethod
    def _default_head_file() -> Path:
        bundled = _bundled_lpips_head()
        if bundled is not None:
            return bundled
        what = "LPIPS v0.1 linear-head weights (vgg.pth)"
        return download_to_hub_cache(LPIPS_HEAD_URL, LPIPS_HEAD_FILENAME, LPIPS_HEAD_SHA256, what)

    def load_backbone_weights(self, source: str | os.PathLike | dict[str, torch.Tensor]) -> None:
        """Load torchvision VGG16 weights (``features.N.weight/bias``; its ``classifier.*`` is ignored)."""
        state = _read_state(source, "LPIPS VGG16 backbone weights (vgg16-397923af.pth)")
        expected = {f"features.{k}": v.shape for k, v in self.features.state_dict().items()}
        _check_keys(state, expected, f"LPIPS backbone weights {_describe(source)}", ignored_prefixes=("classifier.",))
        self.features.load_state_dict({k.removeprefix("features."): state[k] for k in expected}, strict=True)

    def load_head_weights(self, source: str | os.PathLike | dict[str, torch.Tensor]) -> None:
        """Load the LPIPS v0.1 linear heads from the standard ``lin{k}.model.1.weight`` keys."""
        state = _read_state(source, "LPIPS v0.1 linear-head weights (vgg.pth)")
        expected = {f"lin{k}.model.1.weight": head.weight.shape for k, head in enumerate(self.heads)}
        _check_keys(state, expected, f"LPIPS head weights {_describe(source)}")
        for k, head in enumerate(self.heads):
            weight = state[f"lin{k}.model.1.weight"]
            if (weight < 0).any():
                # LPIPS clamps its heads to >= 0 while fitting them; a negative one is not an LPIPS head
                # and would let the "distance" go negative.
                raise ValueError(f"LPIPS head weights {_describe(source)}: lin{k} has negative entries")
            with torch.no_grad():
                head.weight.copy_(weight)

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The heads under the standard LPIPS keys, i.e. the layout of ``vgg.pth``."""
        return {f"lin{k}.model.1.weight": head.weight.detach().clone() for k, head in enumerate(self.heads)}

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """The backbone under torchvision's ``features.N.*`` keys."""
        return {f"features.{k}": v.detach().clone() for k, v in self.features.state_dict().items()}

    def _taps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) in [-1, 1] -> five unit-normalised (B, C_k, H_k, W_k) feature maps."""
        h = (images - self.shift) / self.scale
        taps = []
        for index, layer in enumerate(self.features):
            h = layer(h)
            if index in TAP_INDICES:
                taps.append(_unit_normalize(h))
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(
                f"LPIPS expects two (B, 3, H, W) batches of equal shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if min(x.shape[-2:]) < MIN_IMAGE_SIZE:
            raise ValueError(
                f"LPIPS-VGG16 needs images of at least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE}, got {tuple(x.shape[-2:])}"
            )
        batch, y = x.shape[0], y.to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad != y.requires_grad:
            # Training (a reconstruction against fixed targets): the target's pass runs without autograd,
            # so its activations are not kept and the backward does not carry it through the backbone.
            fixed, graded = (y, x) if x.requires_grad else (x, y)
            with torch.no_grad():
                fixed_taps = self._taps(fixed)
            pairs = list(zip(fixed_taps, self._taps(graded)))
        else:
            # One backbone pass over both batches: half the kernel launches, same result per image.
            taps = self._taps(torch.cat([x, y]))
            pairs = [(tap[:batch], tap[batch:]) for tap in taps]
        distance = x.new_zeros(batch, dtype=torch.float32)
        for head, (a, b) in zip(self.heads, pairs):
            diff = (a - b).pow(2)  # (B, C, H, W); symmetric, so the order of the pair does not matter
            # The 1x1 head and the spatial mean are both linear, so averaging first is the same sum;
            # elementwise ops keep it in float32 under autocast, where a conv/matmul would drop to bf16.
            weight = head.weight.view(1, -1).float()  # (1, C)
            distance = distance + (diff.mean(dim=(2, 3)) * weight).sum(dim=1)
        return distance


def _read_state(source: str | os.PathLike | dict[str, torch.Tensor], what: str) -> dict[str, Any]:
    if isinstance(source, dict):
        return source
    path = Path(source).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"{what}: {path} does not exist; provide that file, {_OFF_SWITCH}")
    state = load_state_file(path)
    if not isinstance(state, dict):
        raise ValueError(f"{what}: {path} holds a {type(state).__name__}, not a state dict")
    return state


def _describe(source: str | os.PathLike | dict[str, torch.Tensor]) -> str:
    return "(state dict)" if isinstance(source, dict) else f"({source})"
