"""Transformer building blocks shared by the tokenizer's encoder, code decoder and pixel decoder.

Numerics follow docs/checkpoint_format.md §3.1: separate q/k/v linears with bias, per-head LayerNorm on q and
k *before* RoPE, SDPA with the default 1/sqrt(head_dim) scale, and Flux-style 2-D RoPE on adjacent
channel pairs (first half of each head rotated by the row index, second half by the column index).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class RopeTable:
    """(cos, sin) tables of 2-D RoPE, built once per (grid, extra identity rows, device).

    Angles are computed in float64 and rounded to float32 only when a table is built, as the official
    code does; the rotation itself then runs in float32. ``extra`` identity rows are appended after
    the grid tokens (encoder query tokens carry no position).
    """

    def __init__(self, theta: float, axes_dim: tuple[int, ...]) -> None:
        self.theta = theta
        self.axes_dim = tuple(axes_dim)
        self._cache: dict[tuple[int, int, int, torch.device], tuple[Tensor, Tensor]] = {}

    def __call__(self, height: int, width: int, device: torch.device, extra: int = 0) -> tuple[Tensor, Tensor]:
        """Return (cos, sin), each (height·width + extra, head_dim / 2) float32, row-major grid order."""
        key = (height, width, extra, torch.device(device))
        if key not in self._cache:
            self._cache[key] = self._build(height, width, extra, torch.device(device))
        return self._cache[key]

    def _build(self, height: int, width: int, extra: int, device: torch.device) -> tuple[Tensor, Tensor]:
        rows = torch.arange(height, dtype=torch.float64).repeat_interleave(width)  # (H·W,)
        cols = torch.arange(width, dtype=torch.float64).repeat(height)
        angles = []
        for pos, axis_dim in zip((rows, cols), self.axes_dim):
            omega = 1.0 / (self.theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim))
            angles.append(pos[:, None] * omega[None])
        angle = torch.cat(angles, dim=-1)  # (H·W, head_dim / 2)
        cos, sin = angle.cos().float(), angle.sin().float()
        if extra:
            pairs = cos.shape[1]
            cos = torch.cat([cos, torch.ones(extra, pairs)], dim=0)
            sin = torch.cat([sin, torch.zeros(extra, pairs)], dim=0)
        return cos.to(device), sin.to(device)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of x (B, heads, L, head_dim) by the per-token angles (L, head_dim/2)."""
    x_ = x.float().unflatten(-1, (-1, 2))  # (B, h, L, D/2, 2)
    x0, x1 = x_[..., 0], x_[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head attention with qk-LayerNorm (before RoPE); self- or cross-attention."""

    def __init__(self, dim: int, head_dim: int, eps: float) -> None:
        super().__init__()
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(head_dim, eps=eps)
        self.k_norm = nn.LayerNorm(head_dim, eps=eps)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        rope: tuple[Tensor, Tensor] | None = None,
        rope_keys: bool = True,
        attn_mask: Tensor | None = None,
        causal: bool = False,
    ) -> Tensor:
        """x (B, L, C) attends to ``context`` (B, M, C) or to itself; ``rope`` rotates q (and k if ``rope_keys``)."""
        context = x if context is None else context
        q = rearrange(self.q(x), "b l (h d) -> b h l d", d=self.head_dim)
        k = rearrange(self.k(context), "b m (h d) -> b h m d", d=self.head_dim)
        v = rearrange(self.v(context), "b m (h d) -> b h m d", d=self.head_dim)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q = apply_rope(q, *rope)
            if rope_keys:
                k = apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


class Mlp(nn.Module):
    """fc1 → SiLU → fc2 (key names match timm's Mlp used by the official code)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class GatedBlock(nn.Module):
    """Pre-LN transformer block with per-channel residual gates (encoder and code decoder)."""

    def __init__(self, dim: int, head_dim: int, mlp_ratio: int, eps: float, grad_checkpointing: bool) -> None:
        super().__init__()
        self.attention = Attention(dim, head_dim, eps)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        # Zero gates make every block start as the identity (docs/method.md §1 "Encoder").
        self.gate1 = nn.Parameter(torch.zeros(dim))
        self.gate2 = nn.Parameter(torch.zeros(dim))
        self.grad_checkpointing = grad_checkpointing
        init_linear_(self)  # the official block init (PyTorch's default is wider at small widths)

    def _attn(self, x: Tensor, rope: tuple[Tensor, Tensor] | None, attn_mask: Tensor | None, causal: bool) -> Tensor:
        return self.attention(self.norm1(x), rope=rope, attn_mask=attn_mask, causal=causal)

    def _mlp(self, x: Tensor) -> Tensor:
        return self.mlp(self.norm2(x))

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        attn_mask: Tensor | None = None,
        causal: bool = False,
    ) -> Tensor:
        """x (B, L, C) → (B, L, C)."""
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            x = x + checkpoint(self._attn, x, rope, attn_mask, causal, use_reentrant=False) * self.gate1
            return x + checkpoint(self._mlp, x, use_reentrant=False) * self.gate2
        x = x + self._attn(x, rope, attn_mask, causal) * self.gate1
        return x + self._mlp(x) * self.gate2


def init_linear_(module: nn.Module, std: float = 0.02) -> None:
    """Truncated-normal weights, zero biases for every Linear below ``module`` (official init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
