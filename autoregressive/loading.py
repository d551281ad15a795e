"""Reading and writing GPT checkpoint files, official and own (docs/checkpoint_format.md §4).

State dicts and configs in, state dicts and configs out: this module builds no model
(:mod:`autoregressive.model` imports it for ``GPT.from_pretrained`` / ``save_pretrained`` and
builds the network with ``build_gpt``). Official key conversion happens in exactly one function,
:func:`convert_official_state_dict`. Nothing is unpickled beyond tensors
(:func:`utils.checkpoint.load_state_file`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from autoregressive.config import GPT_PRESETS, GPTConfig
from utils.checkpoint import atomic_write, load_state_file
from utils.checkpoint_kind import GPT as GPT_KIND
from utils.checkpoint_kind import TOKENIZER as TOKENIZER_KIND
from utils.checkpoint_kind import WrongModelError, kind_of_folder, kind_of_keys, kind_of_object, run_folder_hint
from utils.config import dataclass_from_dict, dataclass_to_dict, load_yaml, save_yaml
from utils.errors import UserError
from utils.hub import OFFICIAL_REPO_ID, resolve_file

CONFIG_FILENAME = "config.yaml"
WEIGHTS_FILENAME = "model.safetensors"
# Released GPT weights in the official hub repo, keyed by the preset they were trained with.
OFFICIAL_FILES = {"GPT-L": "D-AR-L-360K.pt", "GPT-XL": "D-AR-XL-360K.pt"}
# ModelArgs fields that exist only for the text-to-image variant or for LlamaGen's own cache sizing;
# they do not change a c2i network, so official configs may carry them.
_OFFICIAL_IGNORED_FIELDS = ("caption_dim", "max_batch_size", "max_seq_len")
# How GPT.from_pretrained's messages name its arguments; a CLI substitutes its flags (GPTLoadError.for_flags).
PYTHON_ARGUMENT_NAMES = {"preset": "preset=", "ema": "ema=True", "filename": "filename="}
_TOKENIZER_HINT = "load it with DARTokenizer.from_pretrained and pass a GPT checkpoint here"


class GPTLoadError(UserError, ValueError):
    """A GPT checkpoint / argument mismatch whose message names an argument of :meth:`GPT.from_pretrained`.

    The message is a template with ``{preset}``, ``{ema}`` and ``{filename}`` placeholders: ``str()``
    fills in the Python keywords, :meth:`for_flags` the flags of a command line.
    """

    def __init__(self, template: str) -> None:
        self.template = template
        super().__init__(self._fill(PYTHON_ARGUMENT_NAMES))

    def _fill(self, names: dict[str, str]) -> str:
        text = self.template
        for key, name in names.items():  # str.replace: paths may contain braces
            text = text.replace("{" + key + "}", name)
        return text

    def for_flags(self, names: dict[str, str]) -> UserError:
        return UserError(self._fill({**PYTHON_ARGUMENT_NAMES, **names}))


def convert_official_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official GPT state dict → ours: strip torch.compile's ``_orig_mod.`` and drop a stale ``freqs_cis``.

    Older LlamaGen files stored the rotary table as ``freqs_cis``; we always rebuild it from the config.
    """
    converted = {}
    for key, value in state_dict.items():
        key = key.removeprefix("_orig_mod.")
        if key == "freqs_cis":
            continue
        converted[key] = value
    return converted


def gpt_config_from_official(official: dict[str, Any]) -> GPTConfig:
    """Official ``ModelArgs`` mapping → :class:`GPTConfig`; unknown keys and non-c2i models are errors."""
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(official) - fields - set(_OFFICIAL_IGNORED_FIELDS) - {"model_type"})
    if unknown:
        raise ValueError(
            f"unknown official GPT config key(s): {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
        )
    model_type = official.get("model_type", "c2i")
    if model_type != "c2i":
        raise ValueError(f"only class-conditional (model_type='c2i') GPTs are supported, got {model_type!r}")
    return dataclass_from_dict(GPTConfig, {k: v for k, v in official.items() if k in fields})


def read_gpt_checkpoint(
    path_or_repo_id: str | os.PathLike,
    filename: str | None = None,
    preset: str | None = None,
    ema: bool = False,
) -> tuple[dict[str, torch.Tensor], GPTConfig]:
    """The file reading of :meth:`GPT.from_pretrained` (see there): (state dict as stored, config).

    The state dict may still carry official quirks; :func:`convert_official_state_dict` removes them.
    """
    if preset is not None and preset not in GPT_PRESETS:
        raise GPTLoadError(f"unknown preset {preset!r}; choose from {', '.join(GPT_PRESETS)}")
    path = Path(path_or_repo_id).expanduser()
    official = OFFICIAL_FILES.get(preset) if str(path_or_repo_id) == OFFICIAL_REPO_ID else None
    if path.is_dir() and filename is None and official is None:
        _check_gpt_folder(path)
    if path.is_dir() and filename is None and (path / WEIGHTS_FILENAME).is_file():
        file = path / WEIGHTS_FILENAME
    else:
        if filename is None and official is not None:
            filename = official
        if filename is not None and path.is_file():
            raise GPTLoadError(f"{path} is a file; drop {{filename}} (it picks a file inside a folder or hub repo)")
        file = resolve_file(path_or_repo_id, filename)

    state, config = _read_gpt_file(file, ema, shown_as=path_or_repo_id)
    if config is not None and preset is not None and config != GPT_PRESETS[preset]:
        raise GPTLoadError(f"{file} stores its own GPT config, which differs from preset {preset!r}; "
                           "drop {preset}")
    if preset is None:
        preset = next((p for p, f in OFFICIAL_FILES.items() if file.name == f), None)
    if config is None:
        sibling = file.parent / CONFIG_FILENAME
        if file.suffix == ".safetensors" and sibling.is_file():
            config = gpt_config_from_yaml(sibling)
        elif preset is not None:
            config = GPT_PRESETS[preset]
        else:
            raise GPTLoadError(f"{file} does not store a GPT config: pass {{preset}} "
                               f"(one of {', '.join(GPT_PRESETS)})")
    return state, config


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _check_gpt_folder(folder: Path) -> None:
    """Name what a folder is when it cannot be a GPT checkpoint folder (a tokenizer's, a run's)."""
    if kind_of_folder(folder) == TOKENIZER_KIND:
        raise WrongModelError(folder, TOKENIZER_KIND, GPT_KIND, _TOKENIZER_HINT)
    if (folder / WEIGHTS_FILENAME).is_file() or folder.name == "checkpoints":
        return  # a save_pretrained folder; a checkpoints folder resolves to its newest checkpoint
    hint = run_folder_hint(folder)
    if hint is not None:
        raise UserError(hint)
    raise GPTLoadError(f"{folder} holds no {WEIGHTS_FILENAME}; pass a GPT file (or a save_pretrained folder), "
                       "or {filename} to pick a file inside it")


def _read_gpt_file(file: Path, ema: bool, shown_as: Any = None) -> tuple[dict[str, torch.Tensor], GPTConfig | None]:
    """(state_dict, config or None) from any supported GPT file layout; ``shown_as`` names it in errors."""
    shown_as = file if shown_as is None else shown_as
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
        if "gpt_config" not in metadata and ((file.parent / "tokenizer_config.yaml").is_file()
                                             or kind_of_keys(keys) == TOKENIZER_KIND):
            raise WrongModelError(shown_as, TOKENIZER_KIND, GPT_KIND, _TOKENIZER_HINT)
        if ema:
            raise GPTLoadError(f"{file} holds one set of weights (a save_pretrained export); {{ema}} applies to "
                               "training checkpoints only: drop it (a run that keeps an EMA exports it as its "
                               "final folder)")
        config = metadata.get("gpt_config")
        config = dataclass_from_dict(GPTConfig, json.loads(config)) if config else None
        return load_state_file(file), config

    obj = load_state_file(file)
    if not isinstance(obj, dict):
        raise GPTLoadError(f"{file}: expected a dict checkpoint, got {type(obj).__name__}")
    if kind_of_object(obj) == TOKENIZER_KIND:
        raise WrongModelError(shown_as, TOKENIZER_KIND, GPT_KIND, _TOKENIZER_HINT)
    config = _config_in_checkpoint(obj)
    if ema:
        if _is_state_dict(obj.get("ema")):
            return obj["ema"], config
        # The paper recipes train without EMA, so --ema on their checkpoints is an easy slip: the raw
        # weights are what such a run has, and a warning says so.
        warnings.warn(f"{file} has no EMA weights (trained with EMA off?); loading its raw weights instead",
                      UserWarning, stacklevel=4)  # at from_pretrained's caller
    for key in ("model", "module", "state_dict"):
        if _is_state_dict(obj.get(key)):
            return obj[key], config
    if _is_state_dict(obj):
        return obj, None
    raise GPTLoadError(f"{file}: no GPT weights under 'model', 'module' or 'state_dict' and not a bare "
                       f"state dict (top-level keys: {', '.join(map(str, obj))})")


def _config_in_checkpoint(obj: dict) -> GPTConfig | None:
    """Our checkpoints store ``gpt_config`` (GPTConfig fields) or a run ``config`` with a ``model`` section."""
    if isinstance(obj.get("gpt_config"), dict):
        return dataclass_from_dict(GPTConfig, obj["gpt_config"])
    run_config = obj.get("config")
    if isinstance(run_config, dict) and isinstance(run_config.get("model"), dict) and "dim" in run_config["model"]:
        return dataclass_from_dict(GPTConfig, run_config["model"])
    return None


def gpt_config_from_yaml(path: str | Path) -> GPTConfig:
    """The ``model`` section of a GPT YAML (configs/ar/*.yaml or a save_pretrained folder), strictly."""
    data = load_yaml(path)
    if "model" not in data:
        raise ValueError(f"{path}: a GPT config needs a top-level 'model' mapping")
    section = dict(data["model"])
    preset = section.pop("preset", None)
    if preset is not None:
        if preset not in GPT_PRESETS:
            raise ValueError(f"{path}: unknown preset {preset!r}; choose from {', '.join(GPT_PRESETS)}")
        base = dataclass_to_dict(GPT_PRESETS[preset])
        section = {**base, **section}
    return dataclass_from_dict(GPTConfig, section)


def write_gpt_files(state_dict: dict[str, torch.Tensor], config: GPTConfig, directory: str | os.PathLike) -> Path:
    """``directory/model.safetensors`` (config also in its metadata) + ``directory/config.yaml``; returns the folder."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fields = dataclass_to_dict(config)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(directory / WEIGHTS_FILENAME,
                 lambda tmp: save_file(tensors, tmp, metadata={"gpt_config": json.dumps(fields)}))
    save_yaml({"model": fields}, directory / CONFIG_FILENAME)
    return directory
