"""Class-conditional Llama GPT over tokenizer codes (docs/method.md §2, docs/checkpoint_format.md §4).

Module and parameter names equal the official ``Transformer`` keys, so official weights load with no
renaming beyond :func:`autoregressive.loading.convert_official_state_dict`. The same blocks serve training
(full causal attention, no cache) and generation (static KV cache written at ``input_pos``). Reading and
writing checkpoint files is :mod:`autoregressive.loading`'s job; this module builds the network.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from autoregressive.config import GPT_PRESETS, GPTConfig, find_multiple  # noqa: F401  (GPT_PRESETS: re-export)
from autoregressive.generate import GuidanceSchedule, SamplingOptions, draw_uniforms, generate_codes
# Re-exported: the reading and conversion of checkpoint files live in autoregressive.loading, and
# callers (and tests) have always imported these names from here.
from autoregressive.loading import (GPTLoadError, convert_official_state_dict,  # noqa: F401
                                    gpt_config_from_official, gpt_config_from_yaml, read_gpt_checkpoint,
                                    write_gpt_files)
from utils.checkpoint import check_state_dict
from utils.errors import UserError


class LabelRangeError(UserError, ValueError):
    """Class labels outside the range the model (or sampling) accepts."""


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics even under bf16, then back to the input dtype (docs/checkpoint_format.md §4.3).
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def precompute_rope(num_positions: int, head_dim: int, base: float) -> torch.Tensor:
    """(cos, sin) table of shape (P, head_dim/2, 2) in fp32; pair k rotates by p·base^(−2k/head_dim)."""
    # Explicitly on the CPU: the model may be built under a meta-device context.
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device="cpu")[: head_dim // 2].float() / head_dim))
    angles = torch.outer(torch.arange(num_positions, device="cpu"), inv_freq)  # (P, head_dim/2)
    # polar() rather than cos()/sin(): it reproduces the official table bit for bit.
    rotation = torch.polar(torch.ones_like(angles), angles)
    return torch.stack([rotation.real, rotation.imag], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x₂ₖ, x₂ₖ₊₁) of x (B, S, H, hd) by rope (S, hd/2, 2), in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, S, H, hd/2, 2)
    cos, sin = rope[None, :, None, :, 0], rope[None, :, None, :, 1]  # (1, S, 1, hd/2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    return rotated.flatten(-2).type_as(x)


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.ffn_hidden
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


# The cache length is a multiple of this, and the eager decode step attends to a multiple of it too:
# the CPU attention kernels sum the softmax in 8-wide vector lanes, so attending to the filled part
# rounded up to 8 (the rest masked) adds the same numbers in the same order as attending to the whole
# masked cache, and the logits stay bit-identical; an unrounded length would regroup the last lanes.
CACHE_ALIGN = 8


class KVCache(nn.Module):
    """Preallocated keys/values (batch, kv_heads, max_len, head_dim); rows beyond the batch are unused."""

    def __init__(self, max_batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None) -> None:
        super().__init__()
        shape = (max_batch, kv_heads, max_len, head_dim)
        # Non-persistent: a cache is generation state, never part of a checkpoint.
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               start: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, kv_heads, S, hd) at positions input_pos (S,); return the (B, kv_heads, L, hd) caches.

        With ``start`` (input_pos is then start..start+S-1) the rows are written by a slice copy and only
        the filled part is returned: L = start + S rounded up to CACHE_ALIGN (the caller masks the rest).
        """
        batch = k.shape[0]
        if batch > self.k_cache.shape[0]:
            raise ValueError(
                f"batch {batch} exceeds the KV cache batch {self.k_cache.shape[0]}; call setup_caches again"
            )
        k_all, v_all = self.k_cache[:batch], self.v_cache[:batch]
        if start is not None:
            end = start + k.shape[2]
            k_all[:, :, start:end].copy_(k)
            v_all[:, :, start:end].copy_(v)
            filled = find_multiple(end, CACHE_ALIGN)
            return k_all[:, :, :filled], v_all[:, :, :filled]
        k_all[:, :, input_pos] = k.to(k_all.dtype)
        v_all[:, :, input_pos] = v.to(v_all.dtype)
        return k_all, v_all


class Attention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.kv_heads, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.dim = config.dim
        # Fused projection split as [q (dim), k (kv_dim), v (kv_dim)], the official order.
        self.wqkv = nn.Linear(config.dim, (self.n_head + 2 * self.kv_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, start: int | None = None) -> torch.Tensor:
        """x (B, S, D); with input_pos/mask the KV cache is written and attended over (mask: (S, L) bool).

        ``start`` (eager decoding): input_pos is start..start+S-1 and only the filled cache positions
        are attended (0..start+S-1, rounded up to CACHE_ALIGN); ``mask`` is then (S, that length), or
        None when the queries see all of it.
        """
        batch, seq, _ = x.shape
        kv_dim = self.kv_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv_dim, kv_dim], dim=-1)
        q = apply_rope(q.view(batch, seq, self.n_head, self.head_dim), rope)
        k = apply_rope(k.view(batch, seq, self.kv_heads, self.head_dim), rope)
        v = v.view(batch, seq, self.kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, S, hd)

        if input_pos is not None:
            if self.kv_cache is None:
                raise RuntimeError("cached attention needs setup_caches() first")
            k, v = self.kv_cache.update(input_pos, k, v, start)  # (B, kv_heads, L, hd)
        if self.kv_heads != self.n_head:
            # The cache stores only the KV heads (that is what GQA saves); share them per query group here.
            k = k.repeat_interleave(self.n_head // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.n_head // self.kv_heads, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=None if mask is None else mask[None, None],
            # Only training (no cache) is plainly causal; a cached call without a mask is one query
            # over the filled cache, which it sees whole.
            is_causal=mask is None and input_pos is None,
            dropout_p=self.attn_dropout_p if self.training else 0.0,
        )  # (B, H, S, hd)
        out = out.transpose(1, 2).reshape(batch, seq, self.dim)
        return self.resid_dropout(self.wo(out))


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a residual branch for a random subset of the samples (each with
    probability ``p``) and scale the kept ones by 1 / (1 − p); the identity in eval mode.

    Same draws and arithmetic as timm's ``DropPath`` (one Bernoulli per sample, divided by the keep
    probability), written here so that importing the model does not import timm and torchvision.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep).div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class TransformerBlock(nn.Module):
    def __init__(self, config: GPTConfig, drop_path: float) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: torch.Tensor, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, start: int | None = None) -> torch.Tensor:
        h = x + self.drop_path(self.attention(self.attention_norm(x), rope, input_pos, mask, start))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


class LabelEmbedder(nn.Module):
    """Class table with an extra null row (index num_classes) for label dropout and guidance."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,) → (B, 1, D); in training each label becomes the null class with dropout_prob."""
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)


# ------------------------------------------------------------------------------------------------
# GPT
# ------------------------------------------------------------------------------------------------
class GPT(nn.Module):
    """Decoder-only Llama: [class token, codes] → next-code logits. Shapes: B batch, N codes, V vocab."""

    def __init__(self, config: GPTConfig, activation_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        # Not a GPTConfig field: it trades compute for memory without changing the network, so saved
        # configs (and checkpoints) must not depend on it.
        self.activation_checkpointing = activation_checkpointing
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        # Stochastic depth rising linearly from 0 at the first block to drop_path_rate at the last.
        rates = [config.drop_path_rate * i / max(config.n_layer - 1, 1) for i in range(config.n_layer)]
        self.layers = nn.ModuleList(TransformerBlock(config, rate) for rate in rates)
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # A plain attribute, not a buffer: it must stay fp32 when the model is cast to bf16, and it
        # is not part of official checkpoints.
        self.rope = precompute_rope(config.max_positions, config.head_dim, config.rope_base)
        self.causal_mask: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        # A zero head starts training from uniform predictions (official initialisation).
        nn.init.zeros_(self.output.weight)

    # -- properties ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def set_activation_checkpointing(self, enabled: bool) -> "GPT":
        """Recompute each transformer block in backward instead of keeping its activations (training only)."""
        self.activation_checkpointing = bool(enabled)
        return self

    # -- input checks ----------------------------------------------------------------------------
    # The value-range checks read the device (a host synchronisation per call); the trainer validates its
    # data once up front and switches them off for its steps.
    check_input_values = True

    def check_labels(self, labels: torch.Tensor, allow_null: bool = True) -> None:
        """Integer (B,) labels in [0, num_classes), plus the null class when ``allow_null`` (training, guidance)."""
        if labels.ndim != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be an integer tensor of shape (B,), got {tuple(labels.shape)} {labels.dtype}"
            )
        if torch.compiler.is_compiling() or labels.numel() == 0 or not self.check_input_values:
            return
        upper = self.config.num_classes + int(allow_null and self.config.has_null_class)
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= upper:
            null = ""
            if not allow_null and self.config.has_null_class and high == self.config.num_classes:
                null = f"; {high} is the null class, which guidance adds itself (use cfg_scale for its strength)"
            raise LabelRangeError(f"labels must be in [0, {upper}) (the model has {self.config.num_classes} "
                                  f"classes), got values in [{low}, {high}]{null}")

    def check_codes(self, codes: torch.Tensor, name: str = "codes") -> None:
        if codes.ndim != 2 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(
                f"{name} must be an integer tensor of shape (B, N), got {tuple(codes.shape)} {codes.dtype}"
            )
        if codes.shape[1] > self.config.block_size:
            raise ValueError(f"{name} has {codes.shape[1]} positions; block_size is {self.config.block_size}")
        if torch.compiler.is_compiling() or codes.numel() == 0 or not self.check_input_values:
            return
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"{name} must be in [0, {self.config.vocab_size}), got values in [{low}, {high}]")

    # -- forward paths ---------------------------------------------------------------------------
    def _rope_on(self, device: torch.device) -> torch.Tensor:
        if self.rope.device != device:
            self.rope = self.rope.to(device)
        return self.rope

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(h)).float()

    def forward(self, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher forcing: codes (B, N), labels (B,) → logits (B, N, V); row i predicts codes[:, i].

        The input is [class, codes[:, :N-1]] at positions 0..N-1, so N may be anything up to block_size.
        """
        self.check_codes(codes)
        self.check_labels(labels)
        if codes.shape[0] != labels.shape[0]:
            raise ValueError(f"codes batch {codes.shape[0]} != labels batch {labels.shape[0]}")
        n = codes.shape[1]
        if n == 0:
            raise ValueError("codes must hold at least one position")
        h = torch.cat([self.cls_embedding(labels), self.tok_embeddings(codes[:, : n - 1])], dim=1)  # (B, N, D)
        h = self.tok_dropout(h)
        rope = self._rope_on(h.device)[:n]
        # Only when a backward will follow: in eval or under no_grad there is nothing to save.
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            # checkpoint() restores the RNG state for the recomputation, so dropout draws the same masks.
            h = checkpoint(layer, h, rope, use_reentrant=False) if recompute else layer(h, rope)
        return self._head(h)

    def forward_cached(self, input_pos: torch.Tensor, codes: torch.Tensor | None = None,
                       labels: torch.Tensor | None = None, *, start: int | None = None) -> torch.Tensor:
        """Incremental forward through the KV cache → logits (B, S, V) for positions input_pos (S,).

        With ``labels`` the class token comes first (input_pos must then start at 0), followed by
        ``codes`` (B, S-1) if given; without labels ``codes`` (B, S) are fed at input_pos. No input
        checks here: this is the hot decode step, its callers validate once.

        ``start``: input_pos[0] as a Python int, with input_pos = start..start+S-1 (the decode loop
        knows it without reading the device). In an eager one-position step the cache is then written
        by a slice and attention runs over its filled part only, so a step's attention grows with the
        position instead of costing the whole cache every time; on the CPU the logits are bit-identical
        to those of the full masked cache (tests check it; CUDA may pick another attention kernel for the
        unmasked call, equal up to rounding). Ignored under torch.compile, where the whole cache under the mask
        keeps the shapes static (CUDA graphs replay one shape), and for several positions.
        """
        if torch.compiler.is_compiling():
            start = None
        if self.causal_mask is None:
            raise RuntimeError("call setup_caches() before cached decoding")
        parts = []
        if labels is not None:
            parts.append(self.cls_embedding(labels))
        if codes is not None:
            parts.append(self.tok_embeddings(codes))
        h = self.tok_dropout(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])  # (B, S, D)
        seq = h.shape[1]
        if seq != 1:
            # Several queries (the prefill, once per generation) take the masked whole cache: the CPU
            # kernel's blocking of a short multi-query attention depends on the key length.
            start = None
        if start is None:
            rope = self._rope_on(h.device)[input_pos]
            mask = self.causal_mask[input_pos]  # (S, L)
        else:
            end = start + 1
            filled = find_multiple(end, CACHE_ALIGN)
            rope = self._rope_on(h.device)[start:end]
            mask = None if filled == end else self.causal_mask[start:end, :filled]  # (1, filled)
        for layer in self.layers:
            h = layer(h, rope, input_pos, mask, start)
        return self._head(h)

    # -- KV cache --------------------------------------------------------------------------------
    def setup_caches(self, max_batch: int, max_len: int, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> None:
        """Allocate (max_batch, kv_heads, max_len↑8, head_dim) caches; max_len counts the class token."""
        if max_len > self.config.max_positions:
            raise ValueError(f"max_len {max_len} exceeds the {self.config.max_positions} rotary positions")
        dtype = dtype or self.dtype
        device = torch.device(device) if device is not None else self.device
        # Rounded up to a multiple of 8 like the official cache, for aligned attention kernels.
        length = find_multiple(max_len, CACHE_ALIGN)
        cfg = self.config
        shape = (max_batch, cfg.kv_heads, length, cfg.head_dim)
        current = self.layers[0].attention.kv_cache
        reusable = (current is not None and current.k_cache.shape == shape and current.k_cache.dtype == dtype
                    and current.k_cache.device == device and self.causal_mask is not None
                    and self.causal_mask.device == device)
        if not reusable:
            # Reusing identical caches keeps buffer addresses stable for CUDA-graph replays; stale
            # entries are harmless because the causal mask hides every position not yet written.
            for layer in self.layers:
                layer.attention.kv_cache = KVCache(max_batch, cfg.kv_heads, length, cfg.head_dim, dtype, device)
            self.causal_mask = torch.tril(torch.ones(length, length, dtype=torch.bool, device=device))
        self._rope_on(device)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None
        self.causal_mask = None

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        labels: torch.Tensor,
        cfg_scale: float | tuple[float, float] | GuidanceSchedule = 1.0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        prefix_codes: torch.Tensor | None = None,
        *,
        seeds: torch.Tensor | list[int] | None = None,
        generators: list[torch.Generator] | None = None,
        num_tokens: int | None = None,
        compile: bool = False,
        options: SamplingOptions | None = None,
    ) -> torch.Tensor:
        """Sample codes (B, N) for labels (B,); N = block_size unless num_tokens is given.

        ``cfg_scale``: a number, (start, end) for a linear schedule, or a GuidanceSchedule (a string
        such as "1.2,8.0" is a TypeError). ``options``: a :class:`SamplingOptions`
        instead of ``cfg_scale``, ``temperature``, ``top_k`` and ``top_p``.
        Randomness (pick one): ``seeds`` (B,) or ``generators`` (one per sample) make each sample depend
        only on its own seed and label; ``generator`` draws all uniforms from one generator; with none
        of them the global RNG of the labels' device is used. See :func:`autoregressive.generate.generate_codes`.
        Labels must be real classes, in [0, num_classes).
        """
        # The null class is guidance's business (it adds those rows itself); asked for here it would
        # silently give unconditional samples. generate_codes, the low-level loop, still takes it.
        self.check_labels(labels, allow_null=False)
        options = SamplingOptions.resolve(options, cfg_scale, temperature, top_k, top_p)
        n = self.config.block_size if num_tokens is None else num_tokens
        uniforms = draw_uniforms(labels.shape[0], n, seeds=seeds, generators=generators,
                                 generator=generator, device=labels.device)
        return generate_codes(self, labels, uniforms, options=options, prefix_codes=prefix_codes, compile=compile)

    # -- persistence -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` (config also in its metadata) and ``config.yaml`` into directory."""
        return write_gpt_files(self.state_dict(), self.config, directory)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | Path,
        filename: str | None = None,
        preset: str | None = None,
        ema: bool = False,
        map_location: str | torch.device = "cpu",
    ) -> "GPT":
        """Load our files (folder from save_pretrained, .safetensors, .pt with config) or official ones.

        Official ``.pt`` layouts are read in the official sampler's order: ``model``, ``module``,
        ``state_dict``, bare; ``ema=True`` reads ``ema`` instead, falling back to those with a warning
        when the checkpoint has none (a run trained with EMA off). A file without a config needs
        ``preset``; for the hub repo showlab/D-AR the preset also picks the file (GPT-L →
        D-AR-L-360K.pt, GPT-XL → D-AR-XL-360K.pt) and vice versa. ``RUN/checkpoints/latest`` (or the
        ``checkpoints`` folder) loads the newest training checkpoint. Returns an eval-mode model.
        """
        state, config = read_gpt_checkpoint(path_or_repo_id, filename=filename, preset=preset, ema=ema)
        return build_gpt(config, state).to(map_location)


def build_gpt(config: GPTConfig, state_dict: dict[str, torch.Tensor]) -> GPT:
    """GPT with weights ``state_dict`` (official or ours), loaded strictly, in eval mode, fp32.

    The model is built on the meta device first: random init of a 343M-parameter model only to
    overwrite it costs seconds. Errors list every missing, unexpected or misshapen key.
    """
    with torch.device("meta"):
        model = GPT(config)
    state = convert_official_state_dict(state_dict)
    check_state_dict(state, model.state_dict(), "GPT state dict", require_float=True)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return model.eval()


def load_gpt_from_official(state_dict: dict, gpt_config: dict) -> GPT:
    """Build a GPT from an official state dict and official ``ModelArgs`` fields; strict; eval mode."""
    return build_gpt(gpt_config_from_official(gpt_config), state_dict)

