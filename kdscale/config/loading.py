"""Typed experiment configs: dataclasses (`kdscale.config.schema`) loaded from YAML, dotted
command-line overrides, validated (`kdscale.config.checks`) before any work starts.

A config file mirrors `Config`; every key is optional. Overrides on the command line use the
same dotted keys: `--loss.temperature 4 --student.layers [0,2]`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from kdscale.config.checks import check_config
from kdscale.config.schema import (
    Config,
    ConfigError,
)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """An experiment: defaults, then the YAML file, then dotted overrides, checked.

    Args:
        path: a YAML experiment (see configs/); None for the defaults alone.
        overrides: command-line pairs such as ["--loss.temperature", "4"]; a value is read
            as YAML ("[0,2]" is a list, "null" is None).

    Returns:
        The `Config`.

    Raises:
        ConfigError: an unknown key, a value of the wrong type or out of range, naming the
            key and what was expected.
    """
    raw: dict = {}
    if path is not None:
        raw = read_yaml(path)
    for key, value in parse_overrides(overrides or []):
        set_dotted(raw, key, value)
    return config_from_dict(raw)


def read_yaml(path: str | Path) -> dict:
    """The raw sections of a YAML experiment, before any key is checked.

    Args:
        path: the YAML file; an empty file is an empty mapping.

    Returns:
        The file's mapping of sections.

    Raises:
        ConfigError: the file is missing, a folder, unreadable, not UTF-8, not YAML, or does
            not hold a mapping.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; expected a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError(f"config file {path} cannot be read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start} is "
                          f"{err.object[err.start]:#04x}); expected a YAML file") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, "
                          f"got {type(raw).__name__}")
    return raw


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """Command-line overrides as (dotted key, value) pairs, each value read as YAML.

    Args:
        args: `--key value` or `--key=value` items, e.g.
            `["--loss.temperature", "4", "--student.layers=[0,2]"]`.

    Returns:
        The pairs in order, e.g. `[("loss.temperature", 4), ("student.layers", [0, 2])]`.

    Raises:
        ConfigError: an item that is not `--key`, a key without a value, or a value that is
            not valid YAML.
    """
    pairs, i = [], 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected an override like --section.key value, got {arg!r}")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, text = arg[2:], args[i + 1]
            i += 2
        else:
            raise ConfigError(f"override {arg} has no value")
        pairs.append((key, _parse_value(key, text)))
    return pairs


def _parse_value(key: str, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"override --{key}: {text!r} is not a valid value "
                          f"(numbers, strings, [lists] and null are)") from None


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set `raw["a"]["b"] = value` for the key "a.b", creating missing sections.

    Args:
        raw: the nested mapping of a config, changed in place.
        key: a dotted key such as "loss.temperature".
        value: the value to store.

    Raises:
        ConfigError: a part of the key names a value, not a section.
    """
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a section")
    node[leaf] = value


def config_from_dict(raw: dict) -> Config:
    """A checked `Config` from nested mappings (the shape of the YAML file).

    Args:
        raw: sections and keys to set; a missing key keeps its default.

    Returns:
        The `Config`.

    Raises:
        ConfigError: an unknown key, or a value of the wrong type or out of range.
    """
    config = _build(Config, raw, prefix="")
    check_config(config)
    return config


def _build(cls: type, raw: Any, prefix: str, base: Any = None) -> Any:
    """`base` (default: `cls()`) with the keys of `raw` replaced; a nested section starts
    from its parent's default, so `distill:` keeps distill's own defaults."""
    base = cls() if base is None else base
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            hint = difflib.get_close_matches(str(key), names, n=1)
            suggestion = f" (did you mean {prefix}{hint[0]}?)" if hint else ""
            raise ConfigError(f"unknown key {prefix}{key}{suggestion}; expected one of {names}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = _build(kind, value, f"{prefix}{key}.", getattr(base, key))
        else:
            values[key] = _coerce(value, kind, f"{prefix}{key}")
    return dataclasses.replace(base, **values)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """Return `value` as type `kind`, or raise naming the key and the expected type."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false
            return "no"
        if value in args:
            return value
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    elif kind is type(None):
        if value is None:
            return None
    elif kind is float:
        number = _float(value)
        if number is not None and not math.isfinite(number):
            # .inf passes every "> 0" check, and .nan every comparison's negation.
            raise ConfigError(f"{key}: expected a finite number, got {number}")
        if number is not None:
            return number
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind in (str, bool, dict):
        if isinstance(value, kind):
            return value
    raise ConfigError(f"{key}: expected {_describe(kind)}, got {value!r}")


def _float(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0])}"
    if kind is type(None):
        return "null"
    return {float: "a number", int: "an integer", str: "a string", bool: "true or false",
            dict: "a mapping"}.get(kind, str(kind))


def to_dict(config: Config) -> dict:
    """`config` as nested plain mappings, the inverse of `config_from_dict`."""
    return dataclasses.asdict(config)
