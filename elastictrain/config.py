"""Typed configs from YAML: dataclasses built from plain dicts, with errors that name the field.

Every config in the project (compression specs here; pipelines and clusters later) is a tree of
``@dataclass`` classes. :func:`build` walks a parsed YAML value against the annotations, refuses
unknown keys and wrong types, and runs each class's ``__post_init__`` checks; any failure becomes a
one-line :class:`ConfigError` carrying the full path, e.g. ``rules[2].quantize.bits: must be 1..8``.
A class may define ``_coerce(value)`` (a classmethod) to accept a shorthand form of itself.
:func:`load_yaml` turns every way a file can fail to parse into a ConfigError naming the file, and
:func:`refuse_secrets` refuses keys that look like credentials (those come from the environment).
"""
from __future__ import annotations

import dataclasses
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A user error in a config file: one line naming where and why (a line break that a key, a
    value or a path brings in is escaped, so the message stays one line)."""

    def __init__(self, message: str = "") -> None:
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


def fail(field: str, reason: str) -> typing.NoReturn:
    """Raise from ``__post_init__``; :func:`build` prefixes the path of the enclosing object."""
    raise ConfigError(f"{field}: {reason}")


def _join(path: str, field: str) -> str:
    if not path:
        return field
    return f"{path}{field}" if field.startswith("[") else f"{path}.{field}"


def _key(k: Any) -> str:
    """A mapping key in a field path: as written when it reads as a name, else quoted."""
    return k if isinstance(k, str) and k.isprintable() and k.strip() == k and k else repr(k)


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
    return {float: "a number", int: "an integer", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def _show(value: Any) -> str:
    """A value for an error message: short, whatever its size or depth."""
    try:
        return _REPR.repr(value)
    except ValueError:  # an int too long to print
        return f"an integer of {value.bit_length()} bits"


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 2, 6, 4


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
        raise ConfigError(f"{path or 'value'}: expected {_tname(tp)}, got {_show(value)}")
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise ConfigError(f"{path or 'value'}: must be one of {', '.join(map(repr, typing.get_args(tp)))} "
                          f"(got {_show(value)})")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path or 'value'}: expected {_tname(tp)}, got {_show(value)}")
        (arg,) = typing.get_args(tp)
        return [build(arg, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path or 'value'}: expected a mapping, got {_show(value)}")
        _, varg = typing.get_args(tp)
        return {str(k): build(varg, v, _join(path, _key(k))) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:  # (not NaN)
            try:
                return float(value)
            except OverflowError:  # an integer beyond any float
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (str, bool):
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"config type {tp!r} is not supported")
    raise ConfigError(f"{path or 'value'}: expected {_tname(tp)}, got {_show(value)}")


def _build_dataclass(cls: Any, value: Any, path: str) -> Any:
    coerce = getattr(cls, "_coerce", None)
    if coerce is not None:
        try:
            value = coerce(value)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{path or 'value'}: {e}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path or 'value'}: expected a mapping, got {_show(value)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in value if k not in fields]
    if unknown:
        raise ConfigError(f"{_join(path, _key(unknown[0]))}: unknown key (expected one of {', '.join(fields)})")
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


def is_file(path: str | Path) -> bool:
    """``Path.is_file`` that is False, not an OSError, for a name the OS refuses (too long, …)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def load_yaml(path: str | Path) -> Any:
    p = Path(path)
    if not is_file(p):
        raise ConfigError(f"{p}: no such file")
    try:
        text = p.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror or type(e).__name__})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}:" if mark else ""
        why = getattr(e, "problem", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{p}:{where} not valid YAML ({why})") from None
    except Exception as e:  # a constructor's own failure (a 5000-digit int, a bad !!timestamp) or deep nesting
        raise ConfigError(f"{p}: not valid YAML "
                          f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]})") from None
    if data is None:
        raise ConfigError(f"{p}: empty file (expected a mapping)")
    return data


_SECRET = re.compile(r"api[_-]?key|token|passw(or)?d|secret|credential", re.IGNORECASE)


def refuse_secrets(tree: Any) -> Any:
    """``tree`` as it is, or a ConfigError naming the first key that looks like a credential: those
    come from the environment (``WANDB_API_KEY`` …), never from a config file, which is copied
    into run directories, job scripts and tracking records."""
    todo, seen = [(tree, "")], set()
    while todo:  # iterative, and each mapping once: YAML aliases may share or nest them
        node, path = todo.pop()
        if id(node) in seen or not isinstance(node, (dict, list)):
            continue
        seen.add(id(node))
        items = node.items() if isinstance(node, dict) else ((f"[{i}]", v) for i, v in enumerate(node))
        for k, v in items:
            where = _join(path, k if isinstance(node, list) else _key(k))
            if isinstance(node, dict) and isinstance(k, str) and _SECRET.search(k):
                raise ConfigError(f"{where}: looks like a secret; keys and tokens come from the environment "
                                  "(e.g. WANDB_API_KEY), never from a config file")
            todo.append((v, where))
    return tree


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
        except Exception:  # YAMLError, or a constructor's own (a 5000-digit int, a bad !!timestamp)
            raise ConfigError(f"{where} {key}: value {_show(text)} is not valid YAML") from None
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
                    raise ConfigError(f"{where}: {step!r} holds {_show(child)}, not a mapping")
                _assign([child], rest, value, where)
        else:
            raise ConfigError(f"{where}: cannot index {_show(node)} with {step!r}")
