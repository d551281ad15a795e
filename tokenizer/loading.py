"""Reading and writing tokenizer checkpoint files, official and own (docs/checkpoint_format.md §1.1, §5).

State dicts and configs in, state dicts and configs out: this module builds no model (the model
module imports it for ``from_pretrained`` / ``save_pretrained``). Official key conversion happens in
exactly one function, :func:`convert_official_state_dict`.
Nothing is ever unpickled beyond tensors and the two allow-listed official config objects
(:func:`utils.checkpoint.safe_torch_load`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from tokenizer.config import TOKENIZER_PRESETS, TokenizerConfig, from_official, load_tokenizer_config
from utils.checkpoint import StateDictMismatchError, atomic_write, load_state_file
from utils.checkpoint_kind import (GPT, TOKENIZER, WrongModelError, kind_of_folder, kind_of_keys, kind_of_object,
                                   run_folder_hint)
from utils.config import dataclass_from_dict, dataclass_to_dict, save_yaml
from utils.errors import UserError
from utils.hub import OFFICIAL_REPO_ID, resolve_file

OFFICIAL_TOKENIZER_FILENAME = "D-AR-tokenizer_v1.pt"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "tokenizer_config.yaml"

USAGE_KEY = "quantize.codebook_used"  # training statistic; inference never reads it
REPA_PREFIX = "diff_decoder.net.repa_out."  # training-only REPA head
_GPT_HINT = "load it with GPT.from_pretrained and pass a tokenizer checkpoint here"


def convert_official_state_dict(state_dict: dict[str, Any], model: nn.Module) -> tuple[dict[str, Tensor], set[str]]:
    """Official (or own) key names → this model's; returns (converted, keys the checkpoint may lack).

    ``model`` is the :class:`tokenizer.model.DARTokenizer` the weights are for (its config, key names and
    buffer shapes are read; nothing is loaded into it).

    Our parameter names equal the official ones, so conversion is a filter. Two entries are optional
    in both directions (docs/checkpoint_format.md §1.1): the usage statistic ``quantize.codebook_used`` (its
    size is not checked either) and the REPA head ``diff_decoder.net.repa_out.*`` (absent from the
    golden file, present in official files, dropped when this config has no REPA tap). A leading
    ``_orig_mod.`` left by ``torch.compile`` is stripped.
    """
    converted = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    usage = converted.get(USAGE_KEY)
    if isinstance(usage, Tensor) and tuple(usage.shape) != tuple(model.quantize.codebook_used.shape):
        del converted[USAGE_KEY]
    if not model.config.diff_decoder.has_repa_head:
        converted = {k: v for k, v in converted.items() if not k.startswith(REPA_PREFIX)}
    optional = {k for k in model.state_dict() if k.startswith(REPA_PREFIX)} | {USAGE_KEY}
    return converted, optional


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


def read_tokenizer_checkpoint(
    path_or_repo_id: str | os.PathLike = OFFICIAL_REPO_ID,
    filename: str | None = None,
    config: TokenizerConfig | str | os.PathLike | None = None,
) -> tuple[dict[str, Any], TokenizerConfig]:
    """The file reading of :meth:`DARTokenizer.from_pretrained` (see there): (state dict, config)."""
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
    return state_dict, config or embedded or TOKENIZER_PRESETS["v1"]


def _check_tokenizer_folder(folder: Path) -> None:
    """Name what a folder is when it cannot be a tokenizer checkpoint folder (a GPT's, a run's)."""
    if kind_of_folder(folder) == GPT:
        raise WrongModelError(folder, GPT, TOKENIZER, _GPT_HINT)
    if (folder / CONFIG_NAME).is_file() or (folder / OFFICIAL_TOKENIZER_FILENAME).is_file():
        return
    hint = run_folder_hint(folder)
    if hint is not None:
        raise UserError(hint)


def write_tokenizer_files(state_dict: dict[str, Tensor], config: TokenizerConfig, directory: str | os.PathLike) -> Path:
    """``directory/model.safetensors`` + ``directory/tokenizer_config.yaml``; returns the folder."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(directory / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp))
    save_yaml(dataclass_to_dict(config), directory / CONFIG_NAME)
    return directory
