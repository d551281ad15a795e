"""Architecture of the class-conditional Llama GPT (docs/method.md §2, docs/checkpoint_format.md §4).

Field names are the official ``ModelArgs`` names so that official configs map onto this dataclass
one to one; only fields that change the c2i architecture or its training-time behaviour are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


def find_multiple(n: int, k: int) -> int:
    """Smallest multiple of ``k`` that is ``>= n``."""
    return n if n % k == 0 else n + k - n % k


@dataclass(frozen=True)
class GPTConfig:
    dim: int = 1024
    n_layer: int = 24
    n_head: int = 16
    # None means plain multi-head attention; fewer KV heads than query heads is grouped-query attention.
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    # > 0 adds the null-class row (index num_classes) used for label dropout and guidance.
    class_dropout_prob: float = 0.1
    vocab_size: int = 16384
    # The official c2i model feeds exactly one class token; kept as a field for config parity.
    cls_token_num: int = 1
    block_size: int = 256

    def __post_init__(self) -> None:
        if self.dim % self.n_head != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings")
        if self.kv_heads < 1 or self.n_head % self.kv_heads != 0:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.cls_token_num != 1:
            raise ValueError(
                f"class-conditional GPT uses exactly one class token, got cls_token_num={self.cls_token_num}"
            )
        for name in ("token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p",
                     "drop_path_rate", "class_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        for name in ("n_layer", "vocab_size", "num_classes", "block_size", "multiple_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def has_null_class(self) -> bool:
        return self.class_dropout_prob > 0

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def max_positions(self) -> int:
        """Rotary-table length: the class token plus block_size codes."""
        return self.block_size + self.cls_token_num


_IMAGENET = GPTConfig(vocab_size=16384, block_size=256, num_classes=1000)

# Sizes of docs/checkpoint_format.md §4.1; "tiny" matches golden_tiny.pt's gpt.config.
GPT_PRESETS: dict[str, GPTConfig] = {
    "GPT-B": replace(_IMAGENET, dim=768, n_layer=12, n_head=12),
    "GPT-L": replace(_IMAGENET, dim=1024, n_layer=24, n_head=16),
    "GPT-XL": replace(_IMAGENET, dim=1280, n_layer=36, n_head=20),
    "GPT-XXL": replace(_IMAGENET, dim=1536, n_layer=48, n_head=24),
    "tiny": GPTConfig(dim=64, n_layer=2, n_head=4, vocab_size=64, block_size=16, num_classes=10),
}
