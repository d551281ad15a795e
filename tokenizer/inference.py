"""Inference-only fast paths of the tokenizer: the numbers of the module forwards, with fewer memory passes.

The module forwards (:mod:`tokenizer.modules`, :mod:`tokenizer.pixel_decoder`) stay the reference and
the training path; ``DARTokenizer.encode`` / ``decode`` / ``previews`` use the functions here unless
called with ``reference=True``. On CPU about half of a reference call is not matrix products but
element-wise passes over (B, L, D) activations, and that is what is cut here (docs/performance.md):

- RoPE is one complex multiplication of (x0 + i·x1) by (cos + i·sin) instead of eight strided
  half-width passes and a stack. ATen multiplies complex numbers as (ac − bd, ad + bc) without fused
  multiply-adds, so the result equals the reference bit for bit (the tests check it).
- The per-head q/k LayerNorms run on the (B, L, heads, head_dim) output of the projection, which is
  contiguous, instead of on a transposed copy; attention reads the transposed views directly.
- The encoder's boolean mask is turned into the additive mask SDPA would build from it once per call,
  and only for the query rows: patch rows attend to the patch keys alone, unmasked, so the masked
  quarter of the score matrix (patches × queries) is not computed.
- The encoder's last layer computes the rows that are read afterwards only (the query tokens; the
  patch tokens contribute their keys and values); the patch rows of that layer were thrown away.
- Residual updates, gates, SiLU and the adaLN modulation work in place on tensors owned by the call.
- The widest projections (fused q/k/v, the MLP's hidden layer, the pixel decoder's adaLN modulation)
  are written into buffers kept for the whole call (:class:`Workspace`) instead of fresh allocations
  that fault in new pages every time.
- The pixel decoder's condition-side work (cond_embed + LayerNorm, cross-attention keys and values per
  block) depends on the condition window only, so it is computed once per window and call and reused
  by every step that reads the same window (clipped windows; ``steps`` > groups). The time embedding
  and condition side are small (a few rows against H·W/p² image tokens); they are kept at the
  reference's shapes so the rounding does not change.

Every operation is the reference's operation on the same operands in the same order (IEEE addition and
multiplication commute), so fp32 results are bit-identical on this CPU build; the tests compare both
paths. Under autocast (bf16/fp16) in-place updates fall back to out-of-place ones when the dtypes of the
operands differ, so the type promotion is the reference's too.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tokenizer.modules import Attention, GatedBlock
from tokenizer.pixel_decoder import PixelDecoder, SiTBlock


# ---------------------------------------------------------------------------------------------- helpers
def rotary(cos: Tensor, sin: Tensor) -> Tensor:
    """(L, D/2) cos/sin tables of :class:`tokenizer.modules.RopeTable` → (L, 1, D/2) complex rotations."""
    return torch.complex(cos, sin)[:, None]


def rotate(x: Tensor, rotation: Tensor) -> Tensor:
    """RoPE of x (B, L, heads, D) by ``rotation`` (L, 1, D/2) complex: equals ``apply_rope`` on x.transpose(1, 2)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    out = torch.view_as_real(pairs * rotation).flatten(-2)
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _owned(a: Tensor, b: Tensor) -> bool:
    """Whether ``a op= b`` gives the dtype and shape ``a op b`` would (a is a temporary of this call)."""
    return torch.result_type(a, b) == a.dtype and torch.broadcast_shapes(a.shape, b.shape) == a.shape


def _add_(a: Tensor, b: Tensor) -> Tensor:
    return a.add_(b) if _owned(a, b) else a + b


def _mul_(a: Tensor, b: Tensor) -> Tensor:
    return a.mul_(b) if _owned(a, b) else a * b


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    return F.linear(x, layer.weight, layer.bias)


class Workspace:
    """Output buffers of the widest projections, reused by every block (and step) of one call.

    A fresh (L, 4·D) or (L, 6·D) result is a new multi-megabyte allocation that the C allocator hands
    back to the kernel on free, so every call touched fresh pages (about 55 MB of page faults per
    pixel-decoder block, ~10% of its time on CPU). Writing the same ``addmm`` into a kept buffer gives
    the same numbers. A buffer is only reused after every view of its previous contents is consumed
    (each key is used once per block). Falls back to a fresh result under autocast or autograd.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, Tensor] = {}

    def linear(self, key: str, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """``F.linear(x, weight, bias)`` for x (..., K), weight (N, K), written into buffer ``key``."""
        if (torch.is_autocast_enabled(x.device.type) or x.dtype != weight.dtype or not x.is_contiguous()
                or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
            return F.linear(x, weight, bias)
        rows, columns = x.numel() // x.shape[-1], weight.shape[0]
        buffer = self._buffers.get(key)
        if (buffer is None or buffer.shape[0] < rows or buffer.shape[1] != columns or buffer.dtype != x.dtype
                or buffer.device != x.device):
            buffer = self._buffers[key] = torch.empty(rows, columns, dtype=x.dtype, device=x.device)
        out = buffer[:rows]  # fewer rows (the encoder's last layer): a contiguous prefix
        torch.addmm(bias, x.view(rows, -1), weight.t(), out=out)
        return out.view(*x.shape[:-1], columns)


def _linear_into(workspace: Workspace | None, key: str, layer: nn.Linear, x: Tensor) -> Tensor:
    if workspace is None:
        return _linear(layer, x)
    return workspace.linear(key, x, layer.weight, layer.bias)


def _layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _heads(attention: Attention, linear: nn.Linear, norm: nn.LayerNorm | None, x: Tensor) -> Tensor:
    """x (B, L, C) → projected (B, L, heads, head_dim), optionally per-head LayerNorm'd (contiguous)."""
    y = _linear(linear, x).unflatten(-1, (attention.num_heads, attention.head_dim))
    return y if norm is None else _layer_norm(norm, y)


@dataclass
class _FusedEntry:
    sources: tuple[Tensor, ...]  # held so that an identity check cannot match a recycled object
    versions: tuple[int, ...]
    fused: tuple[Tensor, Tensor]


_FUSED: weakref.WeakKeyDictionary[Attention, _FusedEntry] = weakref.WeakKeyDictionary()


def fused_qkv(attention: Attention) -> tuple[Tensor, Tensor]:
    """The q, k and v projections stacked into one (3C, C) weight and (3C,) bias.

    One GEMM with three times the columns instead of three: each output element is the same dot
    product (MKL's result per element does not depend on the number of columns; the tests check it)
    and the input is read once. The stack is cached per module (3·C² floats per block, about 7 MB at
    C = 768) and rebuilt when a parameter is replaced or changed in place (its version counter moves).
    """
    sources = (attention.q.weight, attention.k.weight, attention.v.weight,
               attention.q.bias, attention.k.bias, attention.v.bias)
    try:
        versions = tuple(t._version for t in sources)
    except RuntimeError:  # inference-mode tensors have no version counter: build per call
        versions = None
    entry = _FUSED.get(attention)
    if (versions is not None and entry is not None and entry.versions == versions
            and all(a is b for a, b in zip(entry.sources, sources))):
        return entry.fused
    with torch.no_grad(), torch.inference_mode(False):  # a cached inference tensor would be unusable later
        fused = (torch.cat(sources[:3]), torch.cat(sources[3:]))
    if versions is not None:
        _FUSED[attention] = _FusedEntry(sources, versions, fused)
    return fused


def _qkv(
    attention: Attention, fused: tuple[Tensor, Tensor], x: Tensor, rotation: Tensor, workspace: Workspace | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """x (B, L, C) → rotated, normalised q, k and v, each (B, L, heads, head_dim)."""
    y = F.linear(x, *fused) if workspace is None else workspace.linear("qkv", x, *fused)
    y = y.unflatten(-1, (3, attention.num_heads, attention.head_dim))
    q = rotate(_layer_norm(attention.q_norm, y[:, :, 0]), rotation)
    k = rotate(_layer_norm(attention.k_norm, y[:, :, 1]), rotation)
    return q, k, y[:, :, 2]


def _attend(attention: Attention, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """q (B, L, h, d), k/v (B, M, h, d) → projected attention output (B, L, C)."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return _linear(attention.proj, out.transpose(1, 2).flatten(2))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x · (1 + scale) + shift, as :func:`tokenizer.pixel_decoder.modulate`, in one temporary."""
    return _add_(_mul_(1 + scale, x), shift)


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean keep-mask → the additive 0 / −inf mask SDPA builds from it on every call."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask.logical_not(), float("-inf"))


# ---------------------------------------------------------------------------------------------- encoder
def _encoder_attend(
    attention: Attention, q: Tensor, k: Tensor, v: Tensor, query_mask: Tensor, patches: int
) -> Tensor:
    """Encoder attention of the last ``q.shape[1]`` rows of a (patches, queries) sequence → (B, rows, C).

    Patch rows see patch keys only: they attend to the first ``patches`` keys with no mask instead of
    to every key through a mask whose query columns are −inf (a quarter of the score matrix was masked
    work). Query rows attend to all keys with their rows of the additive mask (``query_mask``, (N, P+N)).
    A masked key adds exactly zero to the softmax sums and the weighted values, and SDPA computes each
    row on its own, so the rows equal the one-call result (the tests compare them).
    """
    first = k.shape[1] - q.shape[1]  # position of q's first row in the sequence
    split = max(patches - first, 0)  # how many of q's rows are patch rows
    parts = []
    if split:
        patch_out = F.scaled_dot_product_attention(
            q[:, :split].transpose(1, 2), k[:, :patches].transpose(1, 2), v[:, :patches].transpose(1, 2))
        parts.append(patch_out.transpose(1, 2))
    if split < q.shape[1]:
        query_out = F.scaled_dot_product_attention(
            q[:, split:].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=query_mask[query_mask.shape[0] - (q.shape[1] - split):])
        parts.append(query_out.transpose(1, 2))
    out = parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, rows, h, d)
    return _linear(attention.proj, out.flatten(2))


def gated_block(
    block: GatedBlock, x: Tensor, rotation: Tensor, query_mask: Tensor, patches: int, fused: tuple[Tensor, Tensor],
    rows: int | None = None, workspace: Workspace | None = None,
) -> Tensor:
    """:class:`GatedBlock` forward of the encoder (self-attention with RoPE, patches seeing patches, query j
    seeing the patches and queries ≤ j) with :func:`fused_qkv` weights; x (B, P+N, C) is updated in place.

    ``query_mask`` (N, P+N): the additive mask rows of the query tokens. ``rows``: compute the outputs of
    the last ``rows`` tokens only (the others still serve as keys/values).
    """
    attention = block.attention
    h = _layer_norm(block.norm1, x)
    if rows is None:
        q, k, v = _qkv(attention, fused, h, rotation, workspace)
    else:
        width = h.shape[-1]
        kv = F.linear(h, fused[0][width:], fused[1][width:]).unflatten(-1, (2, attention.num_heads, attention.head_dim))
        k, v = rotate(_layer_norm(attention.k_norm, kv[:, :, 0]), rotation), kv[:, :, 1]
        x, h = x[:, -rows:].contiguous(), h[:, -rows:].contiguous()
        q = rotate(_heads(attention, attention.q, attention.q_norm, h), rotation[-rows:])
    x = _add_(x, _mul_(_encoder_attend(attention, q, k, v, query_mask, patches), block.gate1))
    hidden = F.silu(_linear_into(workspace, "hidden", block.mlp.fc1, _layer_norm(block.norm2, x)), inplace=True)
    return _add_(x, _mul_(_linear(block.mlp.fc2, hidden), block.gate2))


def encode_latents(model: nn.Module, images: Tensor) -> Tensor:
    """Fast ``DARTokenizer.encode_latents`` (same checks, same result): images → (B, N, vq_dim)."""
    c = model.config
    model.check_images(images)
    grid = model.patchify(images)
    height, width = grid.shape[-2:]
    patches = F.layer_norm(rearrange(grid, "b d h w -> b (h w) d"), (c.encoder_dim,), eps=c.norm_eps)
    queries = model.query_linear(model.query_embedding.weight[: c.num_all_queries])
    tokens = torch.cat([patches, queries.expand(images.shape[0], -1, -1)], dim=1)
    rotation = rotary(*model.rope(height, width, images.device, extra=c.num_all_queries))
    num_patches = patches.shape[1]
    query_mask = additive_mask(model._encoder_mask(num_patches, images.device)[num_patches:], tokens.dtype)
    last = len(model.encoder_layers) - 1
    workspace = Workspace()
    for i, layer in enumerate(model.encoder_layers):
        # Only the query tokens of the last layer are read (the final LayerNorm takes tokens[:, -N:]).
        rows = c.num_all_queries if i == last else None
        tokens = gated_block(layer, tokens, rotation, query_mask, num_patches, fused_qkv(layer.attention), rows=rows,
                             workspace=workspace)
    tokens = F.layer_norm(tokens[:, -c.num_all_queries :], (c.encoder_dim,), eps=c.norm_eps)
    return F.linear(tokens, model.quant_in_conv.weight.flatten(1))


def quantize_codes(codebook: Tensor, latents: Tensor, rows: int = 128) -> Tensor:
    """``Quantizer.forward(latents)[0]``: latents (..., d) → codes (...), nearest unit-norm codebook row.

    The same distance formula row by row, ``rows`` latents at a time, so that the (rows, K) distance
    block stays in cache instead of four passes over a (M, K) matrix (M·K·4 bytes, 32 MB at v1 size).
    """
    z = F.normalize(latents, dim=-1)
    flat = z.reshape(-1, z.shape[-1])
    codebook_sq = codebook.pow(2).sum(1)
    codes = []
    for part in flat.split(rows):
        distances = part.pow(2).sum(1, keepdim=True) + codebook_sq
        products = 2 * part @ codebook.t()
        distances = distances.sub_(products) if _owned(distances, products) else distances - products
        codes.append(distances.argmin(dim=1))
    return torch.cat(codes).view(z.shape[:-1])


# ---------------------------------------------------------------------------------------------- pixel decoder
@dataclass
class BlockCondition:
    """What one :class:`SiTBlock` derives from the condition window: cross-attention keys and values."""

    keys: Tensor  # (B, Q, heads, head_dim), LayerNorm'd, not rotated
    values: Tensor  # (B, Q, heads, head_dim)


def block_condition(block: SiTBlock, cond: Tensor) -> BlockCondition:
    """cond (B, Q, dim) = ``PixelDecoder.embed_cond`` output → the block's cross-attention keys/values."""
    context = F.layer_norm(block.cond_embed(cond), block.norm.normalized_shape, eps=block.norm.eps)
    attention = block.cross_attn
    return BlockCondition(_heads(attention, attention.k, attention.k_norm, context),
                          _heads(attention, attention.v, None, context))


def sit_block(
    block: SiTBlock, x: Tensor, t: Tensor, condition: BlockCondition, rotation: Tensor, fused: tuple[Tensor, Tensor],
    workspace: Workspace | None = None,
) -> Tensor:
    """:class:`SiTBlock` forward on precomputed condition keys/values and :func:`fused_qkv` weights of its
    self-attention; x (B, L, D) is updated in place."""
    t_emb = block.time_embed(t)[:, None]  # (B, 1, D); a 1-row MLP per block, negligible next to L rows
    h = F.layer_norm(x, block.norm.normalized_shape, eps=block.norm.eps)
    cross = block.cross_attn
    q = rotate(_heads(cross, cross.q, cross.q_norm, h), rotation)
    per_token = _add_(_attend(cross, q, condition.keys, condition.values, None), t_emb)
    modulation = _linear_into(workspace, "modulation", block.adaLN_modulation[1], F.silu(per_token, inplace=True))
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation.chunk(6, dim=-1)
    attention = block.attention
    q, k, v = _qkv(attention, fused, _modulate(h, shift_a, scale_a), rotation, workspace)
    x = _add_(x, _mul_(_attend(attention, q, k, v, None), gate_a))
    mlp_in = _modulate(F.layer_norm(x, block.norm.normalized_shape, eps=block.norm.eps), shift_m, scale_m)
    hidden = F.silu(_linear_into(workspace, "hidden", block.mlp.fc1, mlp_in), inplace=True)
    return _add_(x, _mul_(_linear(block.mlp.fc2, hidden), gate_m))


class PixelDecoderSession:
    """Fast :meth:`PixelDecoder.forward` evaluations against one condition sequence (one decode call).

    Condition windows are embedded once and their per-block keys/values cached by (begin, end), so
    steps that read the same window (clipped windows, or more steps than groups) share them.
    """

    def __init__(self, decoder: PixelDecoder, cond: Tensor) -> None:
        self.decoder = decoder
        self.cond = cond
        self._windows: dict[tuple[int, int], list[BlockCondition]] = {}
        self._fused = [fused_qkv(block.attention) for block in decoder.blocks]
        self._workspace = Workspace()

    def window(self, begin: int, end: int) -> list[BlockCondition]:
        if (begin, end) not in self._windows:
            embedded = self.decoder.embed_cond(self.cond[:, begin:end])
            self._windows[begin, end] = [block_condition(block, embedded) for block in self.decoder.blocks]
        return self._windows[begin, end]

    def velocity(self, x: Tensor, t: Tensor, begin: int, end: int) -> Tensor:
        """x (B, C, H, W) data_std space, t (B,) warped, condition tokens [begin, end) → velocity (B, C, H, W)."""
        decoder, cfg = self.decoder, self.decoder.cfg
        p = cfg.patch_size
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not a multiple of the patch size {p}")
        conditions = self.window(begin, end)
        if cfg.share_time_encoding:
            t = decoder.time_embed(t)
        patches = rearrange(x, "b c (h p1) (w p2) -> b (c p1 p2) h w", p1=p, p2=p)
        height, width = patches.shape[-2:]
        rotation = rotary(*decoder.rope(height, width, x.device))
        tokens = rearrange(decoder.conv_in(patches), "b d h w -> b (h w) d").contiguous()
        for block, condition, fused in zip(decoder.blocks, conditions, self._fused):
            tokens = sit_block(block, tokens, t, condition, rotation, fused, self._workspace)
        tokens = decoder.norm(tokens)
        if cfg.mlp_head:
            out = rearrange(decoder.linear_out(tokens, t), "b (h w) c -> b c h w", h=height, w=width)
        else:
            out = decoder.conv_out(rearrange(tokens, "b (h w) d -> b d h w", h=height, w=width))
        return rearrange(out, "b (c p1 p2) h w -> b c (h p1) (w p2)", p1=p, p2=p)
