"""Strict, safe loading of official and own tokenizer checkpoints (docs/checkpoint_format.md §1.1, §5).

Official key conversion happens in exactly one function, :func:`convert_official_state_dict`.
Nothing is ever unpickled beyond tensors and the two allow-listed official config objects
(:func:`utils.checkpoint.safe_torch_load`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tokenizer.config import TOKENIZER_PRESETS, TokenizerConfig, from_official, load_tokenizer_config
from tokenizer.model import DARTokenizer
from tokenizer.pixel_decoder import build_repa_head
from utils.checkpoint import StateDictMismatchError, names_list, atomic_write, check_state_dict, load_state_file
from utils.checkpoint_kind import (GPT, TOKENIZER, WrongModelError, kind_of_folder, kind_of_keys, kind_of_object,
                                   run_folder_hint)
from utils.config import dataclass_from_dict, dataclass_to_dict, save_yaml
from utils.errors import UserError
from utils.hub import OFFICIAL_REPO_ID, resolve_file

OFFICIAL_TOKENIZER_FILENAME = "D-AR-tokenizer_v1.pt"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "tokenizer_config.yaml"

_USAGE_KEY = "quantize.codebook_used"  # training statistic; inference never reads it
_REPA_PREFIX = "diff_decoder.net.repa_out."  # training-only REPA head
_GPT_HINT = "load it with GPT.from_pretrained and pass a tokenizer checkpoint here"


def convert_official_state_dict(state_dict: dict[str, Any], model: DARTokenizer) -> tuple[dict[str, Tensor], set[str]]:
    """Official (or own) key names → this model's; returns (converted, keys the checkpoint may lack).

    Our parameter names equal the official ones, so conversion is a filter. Two entries are optional
    in both directions (docs/checkpoint_format.md §1.1): the usage statistic ``quantize.codebook_used`` (its
    size is not checked either) and the REPA head ``diff_decoder.net.repa_out.*`` (absent from the
    golden file, present in official files, dropped when this config has no REPA tap). A leading
    ``_orig_mod.`` left by ``torch.compile`` is stripped.
    """
    converted = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    usage = converted.get(_USAGE_KEY)
    if isinstance(usage, Tensor) and tuple(usage.shape) != tuple(model.quantize.codebook_used.shape):
        del converted[_USAGE_KEY]
    if not model.config.diff_decoder.has_repa_head:
        converted = {k: v for k, v in converted.items() if not k.startswith(_REPA_PREFIX)}
    optional = {k for k in model.state_dict() if k.startswith(_REPA_PREFIX)} | {_USAGE_KEY}
    return converted, optional


def build_from_state_dict(
    config: TokenizerConfig, state_dict: dict[str, Any], device: str | torch.device | None = None
) -> DARTokenizer:
    """Build ``config`` without initialising it (meta device), then load ``state_dict`` strictly.

    Skipping the random init matters for the 307M-parameter v1 model. Optional entries that the
    checkpoint lacks are initialised normally (REPA head) or zeroed (usage statistic). Tensors are
    cast to float32 and moved to ``device`` (default: where they are).
    """
    with torch.device("meta"):
        model = DARTokenizer(config)
    converted, optional = convert_official_state_dict(state_dict, model)
    check_state_dict(converted, model.state_dict(), "tokenizer checkpoint", optional=optional)
    repa_expected = {k for k in optional if k.startswith(_REPA_PREFIX)}
    repa_given = {k for k in converted if k.startswith(_REPA_PREFIX)}
    if repa_given and repa_given != repa_expected:
        absent = names_list(sorted(repa_expected - repa_given))
        raise StateDictMismatchError(f"incomplete REPA head, missing keys: {absent}")
    target = torch.device(device) if device is not None else None
    tensors = {}
    for key, value in converted.items():
        if not value.is_floating_point():
            raise StateDictMismatchError(f"{key} has dtype {value.dtype}; the tokenizer stores float tensors")
        value = value.to(dtype=torch.float32, device=target or value.device)
        tensors[key] = value
    # Strictness was enforced by check_state_dict above; strict=False here only lets the two optional
    # entries (usage statistic, REPA head) be absent, and they are filled in just below.
    model.load_state_dict(tensors, strict=False, assign=True)
    device_of_rest = model.decoder_embedding.weight.device
    if _USAGE_KEY not in converted:
        model.quantize.codebook_used = torch.zeros(model.quantize.codebook_used.shape, device=device_of_rest)
    if config.diff_decoder.has_repa_head and not any(k.startswith(_REPA_PREFIX) for k in converted):
        with torch.device(device_of_rest):
            model.pixel_decoder.repa_out = build_repa_head(config.diff_decoder)
    uninitialised = [name for name, t in model.state_dict().items() if t.is_meta]
    if uninitialised and device_of_rest.type != "meta":  # a guard against silently unloaded weights
        raise StateDictMismatchError(f"entries left uninitialised: {names_list(uninitialised)}")
    return model.eval()


def load_tokenizer_from_official(state_dict: dict, model_config: dict) -> DARTokenizer:
    """Official state dict + official ``model:`` config mapping → eval-mode :class:`DARTokenizer` (strict)."""
    return build_from_state_dict(from_official(model_config), state_dict)


def _pick_weights(obj: Any, source: str) -> tuple[dict[str, Any], TokenizerConfig | None]:
    """Container layouts → (state dict, stored config or None).

    Weights: ``ema`` over ``model`` over the file itself (official order). Config: our
    ``tokenizer_config`` entry (a :class:`TokenizerConfig` mapping, written by our trainer), else the
    official ``config`` entry's ``model`` section.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a dict, got {type(obj).__name__}")
    config = None
    if isinstance(obj.get("tokenizer_config"), dict):
        config = dataclass_from_dict(TokenizerConfig, obj["tokenizer_config"])
    elif isinstance(obj.get("config"), dict):
        if "model" not in obj["config"]:
            raise ValueError(f"{source}: embedded official config has no 'model' section")
        config = from_official(obj["config"]["model"])
    for key in ("ema", "model"):
        if isinstance(obj.get(key), dict):
            return obj[key], config
    return obj, config


def load_tokenizer(
    path_or_repo_id: str | os.PathLike = OFFICIAL_REPO_ID,
    filename: str | None = None,
    config: TokenizerConfig | str | os.PathLike | None = None,
    device: str | torch.device | None = None,
) -> DARTokenizer:
    """Implementation of :meth:`DARTokenizer.from_pretrained` (see there)."""
    folder = Path(path_or_repo_id).expanduser()
    if folder.is_dir() and filename is None:
        _check_tokenizer_folder(folder)
    if folder.is_dir() and filename is None and (folder / CONFIG_NAME).is_file():
        path = folder / WEIGHTS_NAME
    else:
        path = resolve_file(path_or_repo_id, filename, default_filename=OFFICIAL_TOKENIZER_FILENAME)
    obj = load_state_file(path)
    kind = kind_of_keys(obj) if path.suffix == ".safetensors" else kind_of_object(obj)
    if kind == GPT:
        raise WrongModelError(path_or_repo_id, GPT, TOKENIZER, _GPT_HINT)
    if path.suffix == ".safetensors":
        state_dict, embedded = obj, None
        sibling = path.parent / CONFIG_NAME
        if config is None and sibling.is_file():
            config = load_tokenizer_config(sibling)
    else:
        state_dict, embedded = _pick_weights(obj, str(path))
    if isinstance(config, (str, os.PathLike)):
        config = load_tokenizer_config(config)
    resolved = config or embedded or TOKENIZER_PRESETS["v1"]
    return build_from_state_dict(resolved, state_dict, device=device)


def _check_tokenizer_folder(folder: Path) -> None:
    """Name what a folder is when it cannot be a tokenizer checkpoint folder (a GPT's, a run's)."""
    if kind_of_folder(folder) == GPT:
        raise WrongModelError(folder, GPT, TOKENIZER, _GPT_HINT)
    if (folder / CONFIG_NAME).is_file() or (folder / OFFICIAL_TOKENIZER_FILENAME).is_file():
        return
    hint = run_folder_hint(folder)
    if hint is not None:
        raise UserError(hint)


def save_tokenizer(model: DARTokenizer, directory: str | os.PathLike) -> Path:
    """``directory/model.safetensors`` + ``directory/tokenizer_config.yaml``; returns the folder."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp))
    save_yaml(dataclass_to_dict(model.config), directory / CONFIG_NAME)
    return directory
