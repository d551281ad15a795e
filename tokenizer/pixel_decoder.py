"""The flow-matching pixel decoder network (official ``diff_decoder.net``, docs/checkpoint_format.md §3.5).

It only maps (x_t, warped time, condition tokens of the current group) to a velocity; the path,
schedule and samplers live in :mod:`tokenizer.flow`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from tokenizer.config import PixelDecoderConfig
from tokenizer.modules import Attention, Mlp, RopeTable, init_linear_


class TimestepEmbedder(nn.Module):
    """Sinusoid of (scale · t) laid out [cos, sin], then Linear → SiLU → Linear."""

    def __init__(self, dim: int, scale: float, max_period: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.dim = dim
        self.scale = scale
        self.max_period = max_period
        # Not a buffer: models are built on the meta device before loading, and non-persistent
        # buffers would stay there. Frequencies are computed once per device instead.
        self._freqs: dict[torch.device, Tensor] = {}

    def frequencies(self, device: torch.device) -> Tensor:
        if device not in self._freqs:
            half = self.dim // 2
            freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, dtype=torch.float32) / half)
            self._freqs[device] = freqs.to(device)
        return self._freqs[device]

    def forward(self, t: Tensor) -> Tensor:
        """t (B,) → (B, dim)."""
        args = (t * self.scale)[:, None].float() * self.frequencies(t.device)[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.dim % 2:
            emb = F.pad(emb, (0, 1))
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class SiTBlock(nn.Module):
    """Per-token adaLN block: the cross-attention to the condition tokens only enters via the modulation."""

    def __init__(self, cfg: PixelDecoderConfig) -> None:
        super().__init__()
        dim = cfg.dim
        self.attention = Attention(dim, cfg.head_dim, cfg.norm_eps)
        self.cross_attn = Attention(dim, cfg.head_dim, cfg.norm_eps)
        self.mlp = Mlp(dim, dim * cfg.mlp_ratio)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=cfg.norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.time_embed = (
            nn.Identity() if cfg.share_time_encoding
            else TimestepEmbedder(dim, cfg.time_embed_scale, cfg.time_max_period)
        )
        self.cond_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.grad_checkpointing = cfg.grad_checkpointing
        init_linear_(self)
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def forward(self, x: Tensor, cond: Tensor, t: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """x (B, L, D) image tokens, cond (B, Q, D) normalised condition tokens, t (B,) or (B, D) → (B, L, D)."""
        t_emb = self.time_embed(t)[:, None]  # (B, 1, D)
        c = self.norm(self.cond_embed(cond))
        h = self.norm(x)
        sc = self.cross_attn(h, context=c, rope=rope, rope_keys=False)  # (B, L, D): per-token
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(t_emb + sc).chunk(6, dim=-1)
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        attn_in = modulate(h, shift_a, scale_a)
        if ckpt:
            attn = checkpoint(self.attention, attn_in, None, rope, use_reentrant=False)
        else:
            attn = self.attention(attn_in, rope=rope)
        x = x + gate_a * attn
        mlp_in = modulate(self.norm(x), shift_m, scale_m)
        mlp = checkpoint(self.mlp, mlp_in, use_reentrant=False) if ckpt else self.mlp(mlp_in)
        return x + gate_m * mlp


class FinalLayer(nn.Module):
    """DiT-style final adaLN layer (only with ``mlp_head`` + shared time encoding)."""

    def __init__(self, dim: int, out: int, eps: float) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.linear = nn.Linear(dim, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        for layer in (self.linear, self.adaLN_modulation[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t_emb: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(t_emb[:, None]).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def build_repa_head(cfg: PixelDecoderConfig) -> nn.Sequential:
    """Training-only MLP dim → hidden → hidden → repa_out_dim from decoder tokens to DINOv2 features."""
    return nn.Sequential(
        nn.Linear(cfg.dim, cfg.repa_hidden_dim),
        nn.SiLU(),
        nn.Linear(cfg.repa_hidden_dim, cfg.repa_hidden_dim),
        nn.SiLU(),
        nn.Linear(cfg.repa_hidden_dim, cfg.repa_out_dim),
    )


class PixelDecoder(nn.Module):
    """Velocity network v(x_t, sigma, cond) of the sequential diffusion decoder."""

    def __init__(self, cfg: PixelDecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim, p = cfg.dim, cfg.patch_size
        patch_channels = cfg.channels * p * p
        self.cond_mlp = nn.Linear(cfg.cond_dim, dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=cfg.norm_eps)
        if cfg.share_time_encoding:
            self.time_embed = TimestepEmbedder(dim, cfg.time_embed_scale, cfg.time_max_period)
        else:
            self.time_embed = nn.Identity()
        self.conv_in = nn.Conv2d(patch_channels, dim, 1)
        if cfg.mlp_head:
            self.linear_out = FinalLayer(dim, patch_channels, cfg.norm_eps)
        else:
            self.conv_out = nn.Conv2d(dim, patch_channels, 1)
            # Zero output projection: the untrained decoder predicts zero velocity (docs/method.md §1 "Pixel decoder").
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)
        self.blocks = nn.ModuleList(SiTBlock(cfg) for _ in range(cfg.depth))
        if cfg.has_repa_head:
            self.repa_out = build_repa_head(cfg)
        self.rope = RopeTable(cfg.rope_base_len, cfg.rope_axes_dim)

    def embed_cond(self, cond: Tensor) -> Tensor:
        """cond (B, Q, cond_dim) → (B, Q, dim), shared by all blocks of one call."""
        return self.norm(self.cond_mlp(cond))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, return_repa: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """x (B, C, H, W) in data_std space, t (B,) warped time, cond (B, Q, cond_dim) → velocity (B, C, H, W).

        With ``return_repa`` also returns the REPA head output (B, repa_pool_grid², repa_out_dim).
        """
        p = self.cfg.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
        if return_repa and not self.cfg.has_repa_head:
            raise ValueError(f"REPA needs depth ({self.cfg.depth}) > repa_layer ({self.cfg.repa_layer})")
        cond = self.embed_cond(cond)
        if self.cfg.share_time_encoding:
            t = self.time_embed(t)
        patches = rearrange(x, "b c (h p1) (w p2) -> b (c p1 p2) h w", p1=p, p2=p)
        height, width = patches.shape[-2:]
        rope = self.rope(height, width, x.device)
        tokens = rearrange(self.conv_in(patches), "b d h w -> b (h w) d")
        repa = None
        for i, block in enumerate(self.blocks):
            if return_repa and i == self.cfg.repa_layer:
                repa = self._repa(tokens, height, width)
            tokens = block(tokens, cond, t, rope)
        tokens = self.norm(tokens)
        if self.cfg.mlp_head:
            out = rearrange(self.linear_out(tokens, t), "b (h w) c -> b c h w", h=height, w=width)
        else:
            out = self.conv_out(rearrange(tokens, "b (h w) d -> b d h w", h=height, w=width))
        v = rearrange(out, "b (c p1 p2) h w -> b c (h p1) (w p2)", p1=p, p2=p)
        return (v, repa) if return_repa else v

    def _repa(self, tokens: Tensor, height: int, width: int) -> Tensor:
        """Average-pool the tokens entering block ``repa_layer`` to the REPA grid, then the REPA MLP."""
        stride = height // self.cfg.repa_pool_grid
        if stride < 1:
            raise ValueError(f"pixel grid {height}x{width} is smaller than the REPA grid {self.cfg.repa_pool_grid}")
        grid = rearrange(tokens, "b (h w) d -> b d h w", h=height, w=width)
        pooled = rearrange(F.avg_pool2d(grid, stride, stride), "b d h w -> b (h w) d")
        return self.repa_out(pooled)
