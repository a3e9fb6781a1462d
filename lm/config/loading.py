"""Reading a configuration: YAML files and `section.key=value` overrides over the defaults,
each value coerced to its field's type; unknown keys are refused with the nearest valid name.

Loading is pure: it reads files and validates values, and never initialises JAX, touches the
network or exits the process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lm.config.checks import validate
from lm.config.schema import Config, ConfigError


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _suggest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f"; did you mean '{close[0]}'?" if close else ""


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    """Turn a YAML or command-line value into the field's declared type, or raise ConfigError."""
    target = {"int": int, "float": float, "bool": bool, "str": str}.get(annotation, annotation)
    if isinstance(value, str) and target is not str:
        with contextlib.suppress(ValueError, yaml.YAMLError):  # YAML reads "3e-4" as a string
            value = float(value) if target is float else yaml.safe_load(value)
    if target is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, target) or (target is int and isinstance(value, bool)):
        raise ConfigError(
            f"{path} must be {target.__name__}, got {value!r} ({type(value).__name__}); "
            f"set it like {path}={_example(target)}."
        )
    return value


def _example(target: type) -> str:
    return {int: "8", float: "3e-4", bool: "true", str: "name"}[target]


def _set(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) != 2:
        sections = list(_fields(Config))
        raise ConfigError(
            f"Config key '{dotted}' must be SECTION.FIELD with SECTION one of {sections}."
        )
    section, name = parts
    sections = _fields(Config)
    if section not in sections:
        raise ConfigError(
            f"Unknown config section '{section}' in '{dotted}'{_suggest(section, list(sections))}"
        )
    sub = getattr(cfg, section)
    fields = _fields(type(sub))
    if name not in fields:
        valid = [f"{section}.{n}" for n in fields]
        raise ConfigError(f"Unknown config key '{dotted}'{_suggest(dotted, valid)}")
    hints = typing.get_type_hints(type(sub))
    annotation = hints[name]
    if isinstance(annotation, types.UnionType):
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is typing.Literal:
        options = typing.get_args(annotation)
        value = _coerce(dotted, value, str)
        if value not in options:
            raise ConfigError(f"{dotted} must be one of {list(options)}, got '{value}'.")
    else:
        value = _coerce(dotted, value, annotation)
    setattr(cfg, section, dataclasses.replace(sub, **{name: value}))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _read_yaml(path: Path) -> Any:
    """The YAML document in `path`, or ConfigError naming the file, line and column of a syntax
    error (or why the file cannot be read)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "it is not UTF-8 text"
        raise ConfigError(
            f"Config file {path} cannot be read ({reason}); pass a YAML file."
        ) from None
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(
            f"Config file {path} is not valid YAML at {where}: {problem}; fix the file."
        ) from None


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict | None = None,
) -> Config:
    """Build a validated Config from an optional YAML file and `section.key=value` overrides,
    both applied over the defaults updated by the nested dict `base` (e.g. a checkpoint's
    model section)."""
    cfg = build_config(path, overrides, base)
    validate(cfg)
    return cfg


def build_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict | None = None,
) -> Config:
    """`load_config` without the validation of values against each other (keys and types are
    still checked): for reading a setting before the rest of the config is known."""
    cfg = Config()
    for key, value in _flatten(base or {}).items():
        _set(cfg, key, value)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist; pass a YAML file from configs/.")
        tree = _read_yaml(path)
        if not isinstance(tree, dict):
            raise ConfigError(f"Config file {path} must hold a mapping of sections, not {tree!r}.")
        for key, value in _flatten(tree).items():
            _set(cfg, key, value)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override '{item}' must look like section.key=value.")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), value)
    return cfg


def to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts (for YAML, JSON and checkpoints)."""
    return dataclasses.asdict(cfg)


def from_dict(tree: dict) -> Config:
    """Rebuild a validated Config from `to_dict` output."""
    cfg = Config()
    for key, value in _flatten(tree).items():
        _set(cfg, key, value)
    validate(cfg)
    return cfg
