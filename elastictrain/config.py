"""Typed configs from YAML: dataclasses built from plain dicts, with errors that name the field.

Every config in the project (compression specs here; pipelines and clusters later) is a tree of
``@dataclass`` classes. :func:`build` walks a parsed YAML value against the annotations, refuses
unknown keys and wrong types, and runs each class's ``__post_init__`` checks; any failure becomes a
one-line :class:`ConfigError` carrying the full path, e.g. ``rules[2].quantize.bits: must be 1..8``.
A class may define ``_coerce(value)`` (a classmethod) to accept a shorthand form of itself.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A user error in a config file: one line naming where and why."""


def fail(field: str, reason: str) -> typing.NoReturn:
    """Raise from ``__post_init__``; :func:`build` prefixes the path of the enclosing object."""
    raise ConfigError(f"{field}: {reason}")


def _join(path: str, field: str) -> str:
    if not path:
        return field
    return f"{path}{field}" if field.startswith("[") else f"{path}.{field}"


def _tname(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_tname(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"a list of {_tname(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {float: "a number", int: "an integer", str: "a string", bool: "true or false"}.get(tp, getattr(tp, "__name__", str(tp)))


def build(tp: Any, value: Any, path: str = "") -> Any:
    """Convert ``value`` (parsed YAML) to type ``tp``; raise ConfigError naming ``path``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return build(arg, value, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        # a mapping that matched a dataclass shape reports that dataclass's (deeper) error
        deep = [e for e in errors if not str(e).startswith(f"{path or 'value'}: expected")]
        if deep:
            raise deep[0]
        raise ConfigError(f"{path or 'value'}: expected {_tname(tp)}, got {value!r}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise ConfigError(f"{path or 'value'}: must be one of {', '.join(map(repr, typing.get_args(tp)))} (got {value!r})")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path or 'value'}: expected {_tname(tp)}, got {value!r}")
        (arg,) = typing.get_args(tp)
        return [build(arg, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path or 'value'}: expected a mapping, got {value!r}")
        _, varg = typing.get_args(tp)
        return {str(k): build(varg, v, _join(path, str(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool):
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"config type {tp!r} is not supported")
    raise ConfigError(f"{path or 'value'}: expected {_tname(tp)}, got {value!r}")


def _build_dataclass(cls: Any, value: Any, path: str) -> Any:
    coerce = getattr(cls, "_coerce", None)
    if coerce is not None:
        try:
            value = coerce(value)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{path or 'value'}: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path or 'value'}: expected a mapping, got {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in value if k not in fields]
    if unknown:
        raise ConfigError(f"{_join(path, str(unknown[0]))}: unknown key (expected one of {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = build(hints[name], value[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, name)}: required")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(_join(path, str(e)) if path else str(e)) from None
    except ValueError as e:
        raise ConfigError(f"{path or 'value'}: {e}") from None


def load_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}:{where}: not valid YAML ({getattr(e, 'problem', e)})") from None


def to_plain(obj: Any) -> Any:
    """A config back to plain dicts/lists (for checkpoints and reports)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    return obj


def apply_overrides(raw: Any, overrides: typing.Sequence[str], where: str = "--set") -> Any:
    """``KEY=VALUE`` overrides on a parsed YAML tree (a copy is returned; ``raw`` is untouched).

    KEY is dotted. In a list, a step is an index, ``*`` (every item) or the ``name`` of an item —
    so ``stages.quantize.epochs=2`` and ``stages.*.epochs=1`` both work. VALUE is read as YAML
    (``3``, ``0.5``, ``true``, ``[1, 2]``, ``{kind: pgd}``). Missing dict keys are created — the
    typed config then names any key that does not exist."""
    import copy

    tree = copy.deepcopy(raw) if raw is not None else {}
    for item in overrides:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{where} {item!r}: expected KEY=VALUE, e.g. data.limit_train=1000")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"{where} {key}: value {text!r} is not valid YAML") from None
        _assign([tree], key.strip().split("."), value, f"{where} {key.strip()}")
    return tree


def _assign(nodes: list, steps: list[str], value: Any, where: str) -> None:
    step, rest = steps[0], steps[1:]
    for node in nodes:
        if isinstance(node, list):
            if step == "*":
                idx = range(len(node))
            elif step.lstrip("-").isdigit() and -len(node) <= int(step) < len(node):
                idx = [int(step)]
            else:
                idx = [i for i, v in enumerate(node) if isinstance(v, dict) and v.get("name") == step]
                if not idx:
                    names = [v.get("name") for v in node if isinstance(v, dict) and "name" in v]
                    raise ConfigError(f"{where}: no item {step!r} in the list"
                                      + (f" (names: {', '.join(map(str, names))})" if names else ""))
            if not rest:
                for i in idx:
                    node[i] = value
            else:
                _assign([node[i] for i in idx], rest, value, where)
        elif isinstance(node, dict):
            if not rest:
                node[step] = value
            else:
                child = node.setdefault(step, {})
                if child is None:
                    child = node[step] = {}
                if not isinstance(child, (dict, list)):
                    raise ConfigError(f"{where}: {step!r} holds {child!r}, not a mapping")
                _assign([child], rest, value, where)
        else:
            raise ConfigError(f"{where}: cannot index {node!r} with {step!r}")
