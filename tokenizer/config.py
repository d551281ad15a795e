"""Configuration of the sequential diffusion tokenizer (docs/method.md §1, docs/checkpoint_format.md §2).

Field names follow the official ``model:`` section of ``configs/tokenizer_v1.yaml`` where one exists,
so a reader can map one onto the other; every size the official code hard-codes (head dim, RoPE axis
split, table sizes, REPA widths, eps, β, ...) is a field here whose default reproduces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from utils.config import ConfigError, dataclass_from_dict, load_yaml


def _check_rope_axes(axes_dim: tuple[int, ...], head_dim: int) -> None:
    """2-D RoPE rotates (row, column) channel groups of each head in adjacent pairs."""
    if len(axes_dim) != 2 or sum(axes_dim) != head_dim or any(a % 2 for a in axes_dim):
        raise ConfigError(f"rope_axes_dim {axes_dim} must be two even sizes summing to head_dim {head_dim}")


@dataclass(frozen=True)
class PixelDecoderConfig:
    """The flow-matching pixel decoder (``diff_decoder`` in the official YAML, docs/checkpoint_format.md §3.5)."""

    channels: int = 3  # official in_dim == out_dim
    dim: int = 768
    cond_dim: int = 768  # width of incoming condition tokens; must equal TokenizerConfig.decoder_dim
    patch_size: int = 8
    depth: int = 12
    data_std: float = 0.6
    time_shift: float = 2.0  # s in sigma(t) = t / (t + s (1 - t))
    mlp_head: bool = False  # DiT-style final adaLN layer instead of the 1x1 conv_out
    share_time_encoding: bool = False  # one time embedder for all blocks instead of one per block
    rope_base_len: int = 10000
    rope_axes_dim: tuple[int, ...] = (32, 32)  # channels per head rotated by (row, column); sums to head_dim
    head_dim: int = 64
    mlp_ratio: int = 4
    norm_eps: float = 1e-6
    time_embed_scale: float = 1000.0  # the sinusoid sees 1000 * sigma
    time_max_period: float = 10000.0
    repa_layer: int = 8  # REPA features are the tokens entering this block (training only)
    repa_pool_grid: int = 16  # tokens are average-pooled with stride grid // repa_pool_grid
    repa_hidden_dim: int = 2048
    repa_out_dim: int = 768  # DINOv2 ViT-B/14 feature width
    grad_checkpointing: bool = True

    def __post_init__(self) -> None:
        if self.dim % self.head_dim:
            raise ConfigError(f"diff_decoder dim {self.dim} is not a multiple of head_dim {self.head_dim}")
        _check_rope_axes(self.rope_axes_dim, self.head_dim)
        if self.mlp_head and not self.share_time_encoding:
            # The official final adaLN layer consumes an embedded time vector, which only exists when
            # the time embedding is shared (docs/checkpoint_format.md §2).
            raise ConfigError("diff_decoder.mlp_head=true requires share_time_encoding=true")
        if self.data_std <= 0 or self.time_shift <= 0:
            raise ConfigError("diff_decoder.data_std and time_shift must be positive")

    @property
    def has_repa_head(self) -> bool:
        return self.depth > self.repa_layer


@dataclass(frozen=True)
class TokenizerConfig:
    """Whole tokenizer: encoder, quantizer, code decoder, pixel decoder and sampler schedule."""

    encoder_patch_size: int = 16
    num_encoder_layers: int = 8
    num_decoder_layers: int = 8
    encoder_dim: int = 768
    decoder_dim: int = 768
    head_dim: int = 64
    mlp_ratio: int = 4
    norm_eps: float = 1e-6
    rope_base_len: int = 10000
    rope_axes_dim: tuple[int, ...] = (32, 32)
    query_low_rank: bool = True
    query_rank: int = 8  # width of the low-rank query table
    max_queries: int = 1024  # rows of the query and decoder embedding tables
    vq_dim: int = 8
    vq_codebook_size: int = 16384
    commitment_beta: float = 0.25
    codebook_used_size: int = 65536  # training-statistics buffer kept for checkpoint compatibility
    num_denoising_steps: int = 8  # S
    num_query_groups: int = 8  # G
    num_all_queries: int = 256  # N: tokens per image
    queries_per_step: int = 32  # Q: condition tokens seen by one denoising step
    sampling_resolution: int = 256  # decode size when no noise is given
    output_resolution: int = 0  # non-zero: bicubic resize of larger decodes to this square size
    grad_checkpointing: bool = True  # encoder / code-decoder blocks, training only
    diff_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)

    def __post_init__(self) -> None:
        for name in ("encoder_dim", "decoder_dim"):
            if getattr(self, name) % self.head_dim:
                raise ConfigError(f"{name} {getattr(self, name)} is not a multiple of head_dim {self.head_dim}")
        _check_rope_axes(self.rope_axes_dim, self.head_dim)
        if not 0 < self.num_all_queries <= self.max_queries:
            raise ConfigError(f"num_all_queries {self.num_all_queries} must be in 1..max_queries ({self.max_queries})")
        if not 0 < self.queries_per_step <= self.num_all_queries:
            raise ConfigError(f"queries_per_step {self.queries_per_step} must be in 1..num_all_queries")
        if self.num_denoising_steps < 1 or self.num_query_groups < 1:
            raise ConfigError("num_denoising_steps and num_query_groups must be positive")
        if self.diff_decoder.cond_dim != self.decoder_dim:
            raise ConfigError(
                f"diff_decoder.cond_dim ({self.diff_decoder.cond_dim}) must equal decoder_dim ({self.decoder_dim})"
            )
        if self.sampling_resolution % self.diff_decoder.patch_size:
            raise ConfigError("sampling_resolution must be a multiple of diff_decoder.patch_size")


TOKENIZER_PRESETS: dict[str, TokenizerConfig] = {
    "v1": TokenizerConfig(),
    # Small enough for CPU unit tests in milliseconds: 32x32 images, 2x2 encoder grid, 4x4 pixel grid,
    # G = S = 4 groups of 4 tokens, REPA tap at block 1 pooled to a 2x2 grid.
    "tiny": TokenizerConfig(
        encoder_patch_size=16,
        num_encoder_layers=2,
        num_decoder_layers=2,
        encoder_dim=64,
        decoder_dim=64,
        vq_dim=8,
        vq_codebook_size=64,
        num_denoising_steps=4,
        num_query_groups=4,
        num_all_queries=16,
        queries_per_step=4,
        sampling_resolution=32,
        grad_checkpointing=False,
        codebook_used_size=512,
        diff_decoder=PixelDecoderConfig(
            dim=64,
            cond_dim=64,
            patch_size=8,
            depth=2,
            repa_layer=1,
            repa_pool_grid=2,
            repa_hidden_dim=32,
            repa_out_dim=16,
            grad_checkpointing=False,
        ),
    ),
}

# Official ``model:`` keys and ``model.diff_decoder:`` keys (docs/checkpoint_format.md §2) → our field names.
_OFFICIAL_TOP_KEYS = {
    "encoder_patch_size": "encoder_patch_size",
    "num_encoder_layers": "num_encoder_layers",
    "num_decoder_layers": "num_decoder_layers",
    "query_low_rank": "query_low_rank",
    "encoder_dim": "encoder_dim",
    "decoder_dim": "decoder_dim",
    "vq_dim": "vq_dim",
    "vq_codebook_size": "vq_codebook_size",
    "num_denoising_steps": "num_denoising_steps",
    "num_query_groups": "num_query_groups",
    "num_all_queries": "num_all_queries",
    "queries_per_step": "queries_per_step",
    "sampling_resolution": "sampling_resolution",
    "output_resolution": "output_resolution",
    "rope_base_len": "rope_base_len",
}
_OFFICIAL_DIFF_KEYS = {
    "dim": "dim",
    "cond_dim": "cond_dim",
    "patch_size": "patch_size",
    "depth": "depth",
    "data_std": "data_std",
    "time_shift": "time_shift",
    "mlp_head": "mlp_head",
    "share_time_encoding": "share_time_encoding",
    "rope_base_len": "rope_base_len",
    "repa_layer": "repa_layer",
    "grad_checkpointing": "grad_checkpointing",
}


def from_official(model_config: dict[str, Any]) -> TokenizerConfig:
    """Convert the official ``model:`` mapping to a :class:`TokenizerConfig`; unknown keys are errors.

    Keys the official YAML may omit take the official code defaults (``sampling_resolution`` 256,
    ``queries_per_step`` N // G, ``data_std`` 1.0, ``time_shift`` 1.0, ...), not our v1 preset values.
    """
    if not isinstance(model_config, dict):
        raise ConfigError(f"official model config must be a mapping, got {type(model_config).__name__}")
    known = set(_OFFICIAL_TOP_KEYS) | {"vq_enable", "diff_decoder"}
    unknown = sorted(set(model_config) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in official tokenizer config: {', '.join(unknown)}")
    required = [k for k in _OFFICIAL_TOP_KEYS if k not in {"query_low_rank", "queries_per_step", "sampling_resolution",
                                                           "output_resolution", "rope_base_len"}]
    missing = [k for k in required + ["diff_decoder"] if k not in model_config]
    if missing:
        raise ConfigError(f"official tokenizer config lacks key(s): {', '.join(missing)}")
    if not model_config.get("vq_enable", True):
        raise ConfigError("vq_enable=false (continuous bottleneck, no codes) is not supported by this implementation")

    top = {ours: model_config[theirs] for theirs, ours in _OFFICIAL_TOP_KEYS.items() if theirs in model_config}
    # Official code defaults for keys the YAML may leave out (they differ from our v1 preset in places).
    top.setdefault("query_low_rank", True)
    top.setdefault("queries_per_step", model_config["num_all_queries"] // model_config["num_query_groups"])
    top.setdefault("sampling_resolution", 256)
    top.setdefault("output_resolution", 0)
    top.setdefault("rope_base_len", 10000)

    diff = model_config["diff_decoder"]
    if not isinstance(diff, dict):
        raise ConfigError("official diff_decoder config must be a mapping")
    diff_known = set(_OFFICIAL_DIFF_KEYS) | {"in_dim", "out_dim", "cfg"}
    diff_unknown = sorted(set(diff) - diff_known)
    if diff_unknown:
        raise ConfigError(f"unknown key(s) in official diff_decoder config: {', '.join(diff_unknown)}")
    diff_missing = [k for k in ("in_dim", "out_dim", "dim", "cond_dim", "patch_size", "depth") if k not in diff]
    if diff_missing:
        raise ConfigError(f"official diff_decoder config lacks key(s): {', '.join(diff_missing)}")
    if diff["in_dim"] != diff["out_dim"]:
        raise ConfigError(f"diff_decoder in_dim ({diff['in_dim']}) must equal out_dim ({diff['out_dim']})")
    # `cfg` is stored by the official code but never read, so it is accepted and dropped.
    pixel = {ours: diff[theirs] for theirs, ours in _OFFICIAL_DIFF_KEYS.items() if theirs in diff}
    pixel["channels"] = diff["in_dim"]
    pixel.setdefault("data_std", 1.0)
    pixel.setdefault("time_shift", 1.0)
    top["diff_decoder"] = dataclass_from_dict(PixelDecoderConfig, pixel, _where="diff_decoder")
    return dataclass_from_dict(TokenizerConfig, top)


def load_tokenizer_config(path_or_preset: str | Path) -> TokenizerConfig:
    """A preset name (``"v1"``, ``"tiny"``) or a YAML file in our schema, loaded strictly."""
    if isinstance(path_or_preset, str) and path_or_preset in TOKENIZER_PRESETS:
        return TOKENIZER_PRESETS[path_or_preset]
    path = Path(path_or_preset)
    if not path.is_file():
        presets = ", ".join(TOKENIZER_PRESETS)
        raise ConfigError(f"{path_or_preset!r} is neither a tokenizer preset ({presets}) nor a file")
    return dataclass_from_dict(TokenizerConfig, load_yaml(path))

