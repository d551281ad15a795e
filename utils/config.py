"""Strict conversion between YAML mappings and frozen config dataclasses.

Every component is described by one frozen dataclass; recipes in ``configs/`` load into them here.
Unknown keys are errors (a typo in a YAML must never be silently ignored), nested dataclasses are
built recursively and YAML lists become tuples so configs stay hashable and immutable.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from utils.errors import PathNotFoundError, UserError
from utils.fileio import atomic_write_text

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config mapping does not match its dataclass (a user error: the message names the key)."""


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {type(value).__name__}")
        return dataclass_from_dict(tp, value, _where=where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except (ConfigError, TypeError, ValueError):
                continue
        raise ConfigError(f"{where}: value {value!r} does not match {tp}")
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value))) if args else tuple(value)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    return value


def dataclass_from_dict(cls: type[T], data: dict, _where: str = "") -> T:
    """Build ``cls`` from ``data``; unknown keys and wrongly typed values raise :class:`ConfigError`."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    if data is None:
        data = {}
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    prefix = f"{_where}." if _where else ""
    if unknown:
        guesses = [f"{k} -> {close[0]}?" for k in unknown if (close := difflib.get_close_matches(k, fields, n=1))]
        hint = f" (did you mean {', '.join(guesses)})" if guesses else ""
        raise ConfigError(
            f"unknown key(s) for {cls.__name__}: {', '.join(prefix + k for k in unknown)}{hint}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def dataclass_to_dict(obj: Any) -> Any:
    """Plain, YAML-safe representation of a (nested) dataclass; tuples become lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: dataclass_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [dataclass_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: dataclass_to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def keys_fit(cls: type, data: Any) -> bool:
    """True when ``data`` is a non-empty mapping whose keys are all fields of the dataclass ``cls``.

    Lets a loader recognise the wrong kind of YAML (a model config where a training recipe belongs)
    and say so in one line instead of listing every key it does not know.
    """
    if not isinstance(data, dict) or not data:
        return False
    return set(data) <= {f.name for f in dataclasses.fields(cls) if f.init}


def load_yaml(path: str | os.PathLike) -> dict:
    """The top-level mapping of a YAML file; a missing file or broken YAML is a :class:`UserError`."""
    if not Path(path).expanduser().exists():
        raise PathNotFoundError(path, "pass an existing YAML file")
    if Path(path).expanduser().is_dir():
        raise ConfigError(f"{path} is a folder; pass a YAML file")
    try:
        with open(Path(path).expanduser(), "r", encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or type(error).__name__
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a text (YAML) file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping")
    return data


def save_yaml(data: Any, path: str | os.PathLike) -> None:
    """Write YAML atomically (temp file in the same folder, then rename)."""
    atomic_write_text(path, yaml.safe_dump(dataclass_to_dict(data), sort_keys=False))


def config_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``"a.b: old -> new"`` for every leaf that differs between two nested config mappings."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            diffs.extend(config_differences(old, new, f"{prefix}{key}."))
        elif old != new:
            diffs.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return diffs


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """``"train.optim.lr=1e-4"`` → (``["train", "optim", "lr"]``, ``1e-4``); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or not all(path):
        raise ConfigError(f"--set {text!r}: write KEY=VALUE with a dotted key, e.g. --set train.optim.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: {raw!r} is not a valid YAML value") from None
    if isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string; a number is what anyone typing it means.
        try:
            value = float(value) if value.lower() not in ("nan", "inf", "-inf", "infinity", "-infinity") else value
        except ValueError:
            pass
    return path, value


def apply_assignments(config: T, assignments: list[str] | tuple[str, ...]) -> T:
    """Return ``config`` with every ``KEY=VALUE`` applied, type-checked against its dataclasses.

    Any leaf of the (nested) config can be set (``--set train.optim.lr=1e-4``,
    ``--set model.n_layer=2``, ``--set train.sample.labels=[1,2]``); an unknown key or a value of the
    wrong type is a :class:`ConfigError` naming the key. Later assignments win.
    """
    if not assignments:
        return config
    data = dataclass_to_dict(config)
    for text in assignments:
        path, value = parse_assignment(text)
        node: Any = data
        for depth, part in enumerate(path):
            where = ".".join(path[: depth + 1])
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(path[:depth])} is a value, not a section")
            if part not in node:
                raise ConfigError(
                    f"--set {text!r}: unknown key {where}; valid keys here: {', '.join(sorted(node))}"
                )
            if depth == len(path) - 1:
                if isinstance(node[part], dict) and not isinstance(value, dict):
                    raise ConfigError(f"--set {text!r}: {where} is a section; set one of its keys")
                node[part] = value
            else:
                node = node[part]
    return dataclass_from_dict(type(config), data)


def config_to_yaml(config: Any) -> str:
    """The resolved config as YAML text (what ``--print-config`` shows and ``config.yaml`` stores)."""
    return yaml.safe_dump(dataclass_to_dict(config), sort_keys=False)
