"""Reconstruction metrics for the tokenizer: per-image PSNR and SSIM, batched torch on any device.

SSIM is the standard one of Wang et al. (2004): 11 x 11 Gaussian window with sigma 1.5,
K1 = 0.01, K2 = 0.03, population (biased) local statistics, 'valid' filtering (no padding), the
SSIM map averaged over pixels and channels. Both metrics take (B, C, H, W) images; uint8 images
have data range 255, float images need ``data_range`` stated (1.0 for [0, 1], 255.0 for
[0, 255]) because guessing it silently changes the numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _as_float_pair(
    a: torch.Tensor, b: torch.Tensor, data_range: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate two (B, C, H, W) batches and return them in float64 scaled to [0, 1]."""
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim != 4:
        raise ValueError(f"expected (B, C, H, W) images, got shape {tuple(a.shape)}")
    if a.shape[1] not in (1, 3) and a.shape[-1] in (1, 3):
        raise ValueError(f"images look channels-last {tuple(a.shape)}; pass (B, C, H, W)")
    if data_range is None:
        if a.dtype != torch.uint8 or b.dtype != torch.uint8:
            raise ValueError("float images need an explicit data_range (1.0 for [0, 1], 255.0 for [0, 255])")
        data_range = 255.0
    if data_range <= 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    # float64: SSIM's E[x^2] - E[x]^2 cancels badly in float32 on smooth regions.
    return a.double() / data_range, b.double() / data_range


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """(B, C, H, W) x 2 -> (B,) PSNR in dB, 10 log10(range^2 / MSE); +inf for identical images."""
    x, y = _as_float_pair(a, b, data_range)
    mse = (x - y).square().flatten(1).mean(dim=1)  # (B,)
    return (10.0 * torch.log10(1.0 / mse)).float()


def _gaussian_window(device: torch.device) -> torch.Tensor:
    coords = torch.arange(SSIM_WINDOW, dtype=torch.float64, device=device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-coords.square() / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    return torch.outer(g, g)  # (11, 11), sums to 1


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float | None = None) -> torch.Tensor:
    """(B, C, H, W) x 2 -> (B,) mean SSIM; H and W must be at least 11."""
    x, y = _as_float_pair(a, b, data_range)
    channels, height, width = x.shape[1:]
    if min(height, width) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {height}x{width}")
    window = _gaussian_window(x.device).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)

    def blur(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C, H-10, W-10), per channel
        return F.conv2d(t, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = SSIM_K1**2, SSIM_K2**2  # (K L)^2 with L = 1 after scaling to [0, 1]
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / (
        (mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2)
    )
    return ssim_map.flatten(1).mean(dim=1).float()

