"""Typed configs from YAML: unknown fields and wrong types are refused at load time.

``load_dataclass(cls, mapping)`` builds a (nested) dataclass from a plain mapping, checking
every field against its annotation; ``apply_overrides`` applies "a.b=value" strings (YAML
syntax for the value) before that check.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import yaml

from hypersd.errors import UserError


def _check(value, tp, where: str):
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check(value, option, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: must not be empty")
    if dataclasses.is_dataclass(tp):
        return load_dataclass(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise UserError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_check(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else typing.Any
        checked = [_check(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(checked) if origin is tuple else checked
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, bool):
        raise UserError(f"{where}: expected a string, got {value!r} (YAML reads unquoted no/yes/"
                        f"off/on as booleans: quote it, e.g. \"no\")")
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
            raise UserError(f"{where}: expected {tp.__name__}, got {value!r}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a mapping, got {value!r}")
        return value
    return value


def load_dataclass(cls, data, where: str | None = None):
    """Build ``cls`` from a mapping; missing fields take their defaults."""
    where = where or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    kwargs = {name: _check(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from e


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set "a.b=value" (value parsed as YAML; list items by index, e.g. stages.0.lr=1e-4)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like key=value")
        node = data
        parts = key.split(".")
        try:
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            last = parts[-1]
            value = yaml.safe_load(raw)
            if isinstance(node, list):
                node[int(last)] = value
            else:
                node[last] = value
        except (IndexError, ValueError, AttributeError, TypeError):
            raise UserError(f"override {item!r}: {key} names no field of this config "
                            f"(list items by index, e.g. stages.0.lr=1e-4)") from None
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise UserError(f"config file {path} does not exist")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
