"""Which model a checkpoint holds, so that a tokenizer passed as the GPT (or the reverse) is named as such.

The GPT and the tokenizer share file formats (``model.safetensors``, ``.pt`` containers, training
checkpoints behind ``checkpoints/latest``), so a swapped pair of paths otherwise surfaces as a
missing config or a wall of missing keys. The loaders ask :func:`kind_of_folder`,
:func:`kind_of_object` or :func:`kind_of_keys` and raise :class:`WrongModelError`, which names the
kind found and the kind expected.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from utils.errors import UserError

GPT = "GPT"
TOKENIZER = "D-AR tokenizer"

# Parameter names only one of the two models has (official and ours are the same names).
_GPT_KEYS = frozenset({"tok_embeddings.weight", "cls_embedding.embedding_table.weight"})
_TOKENIZER_PREFIXES = ("quantize.", "encoder_layers.", "decoder_layers.", "diff_decoder.", "decoder_embedding.",
                       "query_embedding")
# Files save_pretrained writes: the GPT's config.yaml, the tokenizer's tokenizer_config.yaml.
_GPT_FOLDER_CONFIG = "config.yaml"
_TOKENIZER_FOLDER_CONFIG = "tokenizer_config.yaml"
_WEIGHTS = "model.safetensors"
# What a training run folder holds besides checkpoints/: both trainers export final/ (the EMA when kept, see
# utils.trainer.final_exports); GPT runs written before that rule hold their EMA in final_ema/.
_RUN_ENTRIES = ("final_ema", "final", "checkpoints/latest")


class WrongModelError(UserError, ValueError):
    """A checkpoint of one model was given where the other is expected."""

    def __init__(self, path: Any, found: str, expected: str, hint: str = "") -> None:
        self.path, self.found, self.expected = path, found, expected
        message = f"{path} is a {found} checkpoint, not a {expected} checkpoint"
        super().__init__(message + (f"; {hint}" if hint else ""))

    def for_flag(self, flag: str, accepts: str) -> UserError:
        """The same mistake worded for a command line: ``flag`` needs a checkpoint as in ``accepts``."""
        return UserError(f"{self.path} is a {self.found} checkpoint; {flag} needs a {self.expected} checkpoint "
                         f"({accepts})")


def kind_of_keys(keys: Iterable[Any]) -> str | None:
    """GPT, TOKENIZER or None (unknown) from the parameter names of a state dict."""
    names = {str(k).removeprefix("_orig_mod.") for k in keys}
    if names & _GPT_KEYS:
        return GPT
    if any(name.startswith(_TOKENIZER_PREFIXES) for name in names):
        return TOKENIZER
    return None


def kind_of_object(obj: Any) -> str | None:
    """The kind of a loaded ``.pt`` object: our config entries first, then the weights in the usual places."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("gpt_config"), dict):
        return GPT
    if isinstance(obj.get("tokenizer_config"), dict):
        return TOKENIZER
    for key in ("ema", "model", "module", "state_dict"):
        if isinstance(obj.get(key), dict):
            kind = kind_of_keys(obj[key])
            if kind is not None:
                return kind
    return kind_of_keys(obj)


def kind_of_folder(folder: str | Path) -> str | None:
    """The kind of a save_pretrained folder, from the config file next to its weights; None otherwise."""
    folder = Path(folder)
    if (folder / _TOKENIZER_FOLDER_CONFIG).is_file():
        return TOKENIZER
    if (folder / _WEIGHTS).is_file() and (folder / _GPT_FOLDER_CONFIG).is_file():
        return GPT
    return None


def run_folder_hint(folder: str | Path) -> str | None:
    """For a training run folder passed as a checkpoint: which of its entries to pass instead."""
    folder = Path(folder)
    found = [str(folder / name) for name in _RUN_ENTRIES if (folder / name).exists()]
    if not found:
        return None
    return f"{folder} is a training run folder; pass one of its checkpoints: {', '.join(found)}"
