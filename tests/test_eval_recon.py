"""PSNR / SSIM on known cases and against a direct per-window SSIM."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evaluations.recon import SSIM_SIGMA, SSIM_WINDOW, psnr, ssim


def test_identical_images() -> None:
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    assert torch.isinf(psnr(images, images)).all()
    torch.testing.assert_close(ssim(images, images), torch.ones(3), rtol=0, atol=1e-6)


def test_known_mse_gives_known_psnr() -> None:
    a = torch.zeros(2, 3, 12, 12, dtype=torch.uint8)
    b = torch.full_like(a, 10)  # MSE 100
    expected = 10 * math.log10(255**2 / 100)  # 28.1308 dB
    torch.testing.assert_close(psnr(a, b), torch.full((2,), expected), rtol=0, atol=1e-4)
    # Same pixels as floats in [0, 1] with data_range 1: the same number.
    torch.testing.assert_close(psnr(a.float() / 255, b.float() / 255, data_range=1.0), psnr(a, b))


def test_constant_images_ssim_closed_form() -> None:
    # No variance anywhere: SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1).
    a = torch.full((1, 1, 11, 11), 100, dtype=torch.uint8)
    b = torch.full((1, 1, 11, 11), 150, dtype=torch.uint8)
    x, y, c1 = 100 / 255, 150 / 255, 0.01**2
    expected = (2 * x * y + c1) / (x * x + y * y + c1)
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-6)


def _direct_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """One window at a time, Gaussian-weighted population statistics (Wang et al. 2004)."""
    coords = np.arange(SSIM_WINDOW) - (SSIM_WINDOW - 1) / 2
    g = np.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - SSIM_WINDOW + 1):
            for j in range(x.shape[2] - SSIM_WINDOW + 1):
                px = x[c, i : i + SSIM_WINDOW, j : j + SSIM_WINDOW]
                py = y[c, i : i + SSIM_WINDOW, j : j + SSIM_WINDOW]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cov = (w * (px - mx) * (py - my)).sum()
                values.append(((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_direct_windows_and_is_per_image() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (2, 3, 14, 15), generator=gen, dtype=torch.uint8)
    noise = torch.randint(-40, 41, a.shape, generator=gen)
    b = (a.int() + noise).clamp(0, 255).to(torch.uint8)
    got = ssim(a, b)
    for i in range(2):
        expected = _direct_ssim(a[i].double().numpy(), b[i].double().numpy(), 255.0)
        assert got[i].item() == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(ssim(a[1:], b[1:]), got[1:])
    torch.testing.assert_close(ssim(a.float() / 255, b.float() / 255, data_range=1.0), got)
    assert 0.0 < got.min() and got.max() < 1.0


def test_input_errors() -> None:
    a = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="explicit data_range"):
        psnr(a, a)
    with pytest.raises(ValueError, match="channels-last"):
        ssim(torch.zeros(1, 16, 16, 3, dtype=torch.uint8), torch.zeros(1, 16, 16, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, torch.zeros(1, 3, 16, 17), data_range=1.0)
