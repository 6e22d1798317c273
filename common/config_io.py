"""Typed-dataclass config plumbing: dict/YAML -> dataclasses, dotted `key=value` overrides.

Every config section is a plain dataclass with defaults (the one place defaults live). Loading is
strict: an unknown key, a value of the wrong type or a failed `validate()` raises `ConfigError`
naming the dotted field, so a bad config fails at start, never half-way through a run.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type or out of range; names the field."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, field: str) -> Any:
    """Convert `value` (from YAML or a CLI string) to the annotated type `tp`, or raise."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, field)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{field}: {value!r} matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{field}: {value!r} is not one of {list(args)}")
        return value
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{field}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=field)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{field}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{field}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{field}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item_tp = args[0] if args else Any
        out = [_coerce(v, item_tp, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{field}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{field}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{field}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{field}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{field}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{field}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{field}: expected a string, got {value!r}")
    return value


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass `cls` from a (possibly partial) mapping; unknown keys are errors."""
    if data is None:
        data = {}
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        where = f" in section '{prefix}'" if prefix else ""
        raise ConfigError(f"unknown config key(s){where}: {sorted(unknown)}; known: {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        dotted = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], dotted)
    obj = cls(**kwargs)
    validate(obj, prefix)
    return obj


def validate(obj: Any, prefix: str = "") -> None:
    """Run `validate()` of every section, depth first, re-raising errors with the dotted path."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, f"{prefix}.{f.name}" if prefix else f.name)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ConfigError as exc:
            raise ConfigError(f"{prefix}.{exc}" if prefix else str(exc)) from None


def _is_url_field(name: str) -> bool:
    return name == "url" or name.endswith("_url")


def _redact(value: Any) -> Any:
    """A URL string with its password replaced by *** (connection.redacted_url); others as they are."""
    if not isinstance(value, str) or ("@" not in value and "pass" not in value.lower()):
        return value
    from nablagfn.common.transport.connection import redacted_url

    return redacted_url(value)


def to_dict(obj: Any, *, secrets: bool = False) -> Any:
    """Dataclass -> plain dict of YAML-safe values (tuples become lists).

    Passwords in URL fields (`url`, `*_url`: distributed.redis.url) are replaced by *** unless
    `secrets`, so a config.yaml or report written from it never holds a credential; a run resumed
    from such a file takes its Redis URL again (--redis-url)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: (v if secrets or not _is_url_field(f.name) else _redact(v))
                for f in dataclasses.fields(obj)
                for v in (to_dict(getattr(obj, f.name), secrets=secrets),)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v, secrets=secrets) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v, secrets=secrets) for k, v in obj.items()}
    return obj


def merge_dicts(base: dict, update: dict) -> dict:
    """Recursive dict merge: `update` wins, nested mappings merge."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_dicts(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(overrides: list[str]) -> dict:
    """`["a.b=1", "c=x"]` -> nested dict; values parsed as YAML scalars (1e-3, true, [1,2])."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key}: cannot parse {raw!r}: {exc}") from None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is set twice as a value and a section")
        node[parts[-1]] = value
    return nested


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    return data


def build_config(cls: type[T], *layers: dict, overrides: list[str] | None = None) -> T:
    """Defaults <- each layer (preset, YAML file, ...) <- dotted overrides, validated once.

    The base is `cls()` itself, so a section's own default (a `default_factory` that differs from
    the section class's defaults) survives a layer that sets only some of its keys."""
    merged: dict = to_dict(cls())
    for layer in layers:
        merged = merge_dicts(merged, layer or {})
    if overrides:
        merged = merge_dicts(merged, parse_overrides(overrides))
    return from_dict(cls, merged)


def require(cond: bool, field: str, message: str) -> None:
    """Raise ConfigError('field: message') unless `cond`; used inside `validate()` methods."""
    if not cond:
        raise ConfigError(f"{field}: {message}")
