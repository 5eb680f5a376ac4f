"""Typed configs from YAML: unknown fields, wrong types and numbers out of range are refused
at load time.

``load_dataclass(cls, mapping)`` builds a (nested) dataclass from a plain mapping, checking
every field against its annotation; ``apply_overrides`` applies "a.b=value" strings (YAML
syntax for the value) before that check. Floats must be finite; a field annotated
``Annotated[float, Range(gt=0)]`` must also lie in its range, and ``check_ranges(self)`` in a
``__post_init__`` holds configs built in Python to the same ranges.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from hypersd.errors import UserError


@dataclass(frozen=True)
class Range:
    """Bounds of a number field: ``steps: Annotated[int, Range(ge=1)]``."""

    ge: float | None = None      # at least
    gt: float | None = None      # more than
    le: float | None = None      # at most

    def check(self, value, where: str) -> None:
        if ((self.ge is not None and value < self.ge) or (self.gt is not None and value <= self.gt)
                or (self.le is not None and value > self.le)):
            raise UserError(f"{where}: must be {self}, got {value!r}")

    def __str__(self):
        bounds = [(self.ge, ">="), (self.gt, ">"), (self.le, "<=")]
        return " and ".join(f"{op} {bound:g}" for bound, op in bounds if bound is not None)


def check_ranges(config, where: str | None = None) -> None:
    """Hold a config built in Python (not loaded) to its fields' ``Range`` annotations."""
    where = where or type(config).__name__
    for name, tp in typing.get_type_hints(type(config), include_extras=True).items():
        if typing.get_origin(tp) is typing.Annotated:
            _check(getattr(config, name), tp, f"{where}.{name}")


def _check(value, tp, where: str):
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return value
    if origin is typing.Annotated:
        base, *marks = typing.get_args(tp)
        value = _check(value, base, where)
        for mark in marks:
            if isinstance(mark, Range):
                mark.check(value, where)
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
            value = float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, bool):
        raise UserError(f"{where}: expected a string, got {value!r} (YAML reads unquoted no/yes/"
                        f"off/on as booleans: quote it, e.g. \"no\")")
    if tp in (int, float, str, bool):
        if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
            raise UserError(f"{where}: expected {tp.__name__}, got {value!r}")
        if tp is float and not math.isfinite(value):
            raise UserError(f"{where}: expected a finite number, got {value!r}")
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
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in set(data) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    missing = [name for name, f in fields.items() if name not in data and f.init
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
    kwargs = {name: _check(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {e}") from e


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Set "a.b=value" (value parsed as YAML; list items by index, e.g. stages.0.lr=1e-4)."""
    if overrides and not isinstance(data, dict):
        raise UserError(f"cannot apply overrides to {data!r}: the config must be a mapping")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like key=value, e.g. stages.0.steps=100")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise UserError(f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}); "
                            "quote it, e.g. key='text'") from None
        node = data
        parts = key.split(".")
        try:
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            last = parts[-1]
            if isinstance(node, list):
                node[int(last)] = value
            else:
                node[last] = value
        except (IndexError, ValueError, AttributeError, TypeError):
            raise UserError(f"override {item!r}: {key} names no field of this config "
                            f"(list items by index, e.g. stages.0.lr=1e-4)") from None
    return data


def load_yaml(path: str | Path) -> dict:
    """A YAML file's mapping (an empty file is an empty mapping)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist: check the path" if not path.exists()
                        else f"{path} is a folder: pass a YAML file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{path} is not valid YAML{at}: {problem}; fix the file") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not a text file: pass a YAML file") from e
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a {type(data).__name__}, not a mapping of fields: "
                        "write it as key: value lines")
    return data
