"""Helpers shared by the GPT and generation tests: golden data and small random models."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from autoregressive import GPT, GPT_PRESETS, GPTConfig

DATA = Path(__file__).parent / "data"


def load_golden() -> dict:
    return torch.load(DATA / "golden_tiny.pt", weights_only=True)


def assert_max_close(ours: torch.Tensor, golden: torch.Tensor) -> None:
    """Golden acceptance, also used for fast-vs-reference paths: max|Δ| ≤ 1e-6 + 2e-5·max|golden|.

    The tolerance for tests/data/golden_tiny.pt (docs/checkpoint_format.md, "Companion data").
    """
    bound = 1e-6 + 2e-5 * golden.abs().max().item()
    err = (ours - golden).abs().max().item()
    assert err <= bound, f"max deviation {err:.3g} exceeds {bound:.3g}"


def random_gpt(seed: int = 0, **overrides) -> GPT:
    """Tiny GPT in eval mode with every weight random (the real init zeroes the head)."""
    config = replace(GPT_PRESETS["tiny"], **overrides)
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 1.0) + (1.0 if p.ndim == 1 else 0.0))
    return model.eval()


def tiny_config(**overrides) -> GPTConfig:
    return replace(GPT_PRESETS["tiny"], **overrides)
