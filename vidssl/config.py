"""Typed configuration: keyword-only dataclasses, YAML files that override them, dotted overrides.

Every component declares its own section as a subclass of :class:`Config`::

    @dataclass(kw_only=True)
    class FootageConfig(Config):
        videos: int = field(default=100, metadata=spec(ge=1, help="number of videos"))
        motion: str = field(default="all", metadata=spec(choices=("all", "left")))

Values are checked on construction (``__post_init__``) against the type hint and the ``spec``
metadata, so a bad value never survives into the program. Errors are :class:`ConfigError` and
name the key path, the value given and what is allowed. Assignments go through the same checks,
including the cross-field ones (``validate``) of the section and of every section holding it; a
refused assignment leaves the config as it was. (List values changed in place, ``cfg.weights.append``,
are not seen: assign a new list, or use :meth:`Config.replace`.)

Loading (:func:`load_config`) merges, in order: the dataclass defaults, a YAML file (which may
``extends:`` another YAML file, resolved relative to itself), and dotted ``key=value`` overrides
from the command line. Override values are parsed by the type of the field they target, so
``flag=False`` is ``False`` (not the truthy string VideoMAE's ``type=bool`` produced) and
``lr=3e-4`` is a float (not the string PyYAML's YAML 1.1 resolver gives).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from vidssl.errors import UserError

__all__ = [
    "Config",
    "ConfigError",
    "spec",
    "field",
    "dataclass",
    "load_config",
    "parse_config_args",
    "apply_overrides",
    "parse_size",
]

T = TypeVar("T", bound="Config")

_BOOL_TRUE = {"true", "yes", "on", "1"}
_BOOL_FALSE = {"false", "no", "off", "0"}
_NONE_WORDS = {"none", "null", "~"}


class ConfigError(UserError, ValueError):
    """A configuration value, key or override is invalid. The message names the key path.

    Also a :class:`ValueError`, so callers that catch the standard exception for bad values see it.
    """


def spec(
    *,
    help: str = "",
    choices: Sequence[Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> dict[str, Any]:
    """Field metadata: help text and declarative constraints checked on construction.

    ``choices`` restricts the value to a set; ``ge``/``gt``/``le``/``lt`` bound numbers, and
    for lists and tuples of numbers they bound every element.
    """
    return {"help": help, "choices": tuple(choices) if choices is not None else None,
            "ge": ge, "gt": gt, "le": le, "lt": lt}


class _Raw(str):
    """A string typed by the user on the command line: parsed by the target field's type."""


def _describe(value: Any) -> str:
    if isinstance(value, _Raw):
        value = str(value)
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, Sequence):
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {_type_name(args[0])}"
        return f"list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if isinstance(tp, type) and issubclass(tp, Config):
        return f"a mapping ({tp.__name__} section)"
    return getattr(tp, "__name__", str(tp))


def _parse_raw_scalar(text: str) -> Any:
    """Best-effort parse of a command-line string whose target type is not a plain scalar."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against type hint ``tp``; convert where the conversion is lossless.

    Raises ConfigError naming ``path`` when the value does not fit.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        # A command-line value with no declared type: read it as YAML (8 -> int, [1,2] -> list).
        return _parse_raw_scalar(value) if isinstance(value, _Raw) else value
    if isinstance(value, Mapping) and tp in (bool, int, float, str):
        raise ConfigError(f"{path}: is a single value ({_type_name(tp)}), not a section; "
                          f"got keys {', '.join(map(str, value))}")
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, _Raw) and value.lower() in _NONE_WORDS)):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{path}: got {_describe(value)}; expected {_type_name(tp)}")
    if origin is Literal:
        if isinstance(value, _Raw):
            for arg in args:
                if str(arg) == value:
                    return arg
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(f"{path}: got {_describe(value)}; allowed: {', '.join(repr(a) for a in args)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, _Raw):
            low = value.strip().lower()
            if low in _BOOL_TRUE:
                return True
            if low in _BOOL_FALSE:
                return False
        raise ConfigError(f"{path}: got {_describe(str(value) if isinstance(value, _Raw) else value)}; "
                          f"expected a boolean (true/false)")
    if tp is int:
        if isinstance(value, _Raw):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
        elif isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{path}: got {_describe(str(value) if isinstance(value, _Raw) else value)}; "
                          f"expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
        elif isinstance(value, str):  # _Raw, or YAML 1.1's "3e-4" which PyYAML leaves a string
            try:
                out = float(value.strip())
            except ValueError:
                raise ConfigError(f"{path}: got {_describe(str(value))}; expected a number") from None
        else:
            raise ConfigError(f"{path}: got {_describe(value)}; expected a number")
        if math.isnan(out):
            raise ConfigError(f"{path}: got nan; expected a number")
        return out
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise ConfigError(f"{path}: got {_describe(value)}; expected a string")
    if origin in (list, tuple, Sequence):
        if isinstance(value, _Raw):
            text = value.strip()
            if text.startswith("["):
                value = _parse_raw_scalar(text)
                if not isinstance(value, list):
                    raise ConfigError(f"{path}: cannot parse {text!r} as a list")
            elif text == "":
                value = []
            else:
                value = [p.strip() for p in text.split(",")]
            # Elements typed on the command line are raw too.
            value = [_Raw(str(v)) if not isinstance(v, (list, dict)) and v is not None else v for v in value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: got {_describe(value)}; expected {_type_name(tp)}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{path}: got {len(value)} items {list(value)!r}; expected {_type_name(tp)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        items = [_coerce(v, elem, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, _Raw):
            parsed = _parse_raw_scalar(value)
            if not isinstance(parsed, Mapping):
                raise ConfigError(f"{path}: got {str(value)!r}; expected {_type_name(tp)} "
                                  f"(for example {path}={{a: 1}} or {path}.a=1)")
            value = {k: _Raw(str(v)) if isinstance(v, (int, float, str, bool)) and not isinstance(v, _Raw)
                     else v for k, v in parsed.items()}
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: got {_describe(value)}; expected {_type_name(tp)}")
        ktp, vtp = args if args else (Any, Any)
        return {_coerce(k, ktp, f"{path}.{k}"): _coerce(v, vtp, f"{path}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return tp.from_dict(value, _path=path)
        raise ConfigError(f"{path}: got {_describe(value)}; expected a mapping of {tp.__name__} keys")
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{path}: got {_describe(value)}; expected {_type_name(tp)}")
    return value


def _check_bounds(value: Any, meta: Mapping[str, Any], path: str) -> None:
    choices = meta.get("choices")
    if choices is not None:
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v not in choices:
                raise ConfigError(f"{path}: got {v!r}; allowed: {', '.join(repr(c) for c in choices)}")
    bounds = [(k, meta.get(k)) for k in ("ge", "gt", "le", "lt") if meta.get(k) is not None]
    if not bounds:
        return
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        for name, bound in bounds:
            ok = {"ge": v >= bound, "gt": v > bound, "le": v <= bound, "lt": v < bound}[name]
            if not ok:
                allowed = ", ".join(f"{ {'ge': '>=', 'gt': '>', 'le': '<=', 'lt': '<'}[n]} {b}" for n, b in bounds)
                raise ConfigError(f"{path}: got {v!r}; allowed: {allowed}")


def _adopt(holder: Config, value: Any) -> None:
    """Make ``holder`` the section ``value`` (when it is one) re-validates after its own assignments."""
    if isinstance(value, Config):
        object.__setattr__(value, "_parent", weakref.ref(holder))


@dataclass(kw_only=True)
class Config:
    """Base of every config section. Subclasses are ``@dataclass(kw_only=True)``.

    Subclasses may override :meth:`validate` for cross-field checks; raise
    ``ConfigError(self._key("field") + ": ...")`` so the message carries the key path.
    """

    def __post_init__(self) -> None:
        path = getattr(self, "_config_path", "")
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if not f.init:
                continue
            key = f"{path}.{f.name}" if path else f.name
            value = _coerce(getattr(self, f.name), hints[f.name], key)
            _check_bounds(value, f.metadata, key)
            object.__setattr__(self, f.name, value)
            _adopt(self, value)
        self.validate()
        object.__setattr__(self, "_validated", True)  # from now on assignments re-run validate()

    def validate(self) -> None:
        """Cross-field checks; override in subclasses."""

    def _key(self, name: str) -> str:
        path = getattr(self, "_config_path", "")
        return f"{path}.{name}" if path else name

    # ---- construction from plain data -----------------------------------------------------
    @classmethod
    def from_dict(cls: type[T], data: Mapping[str, Any] | None, *, _path: str = "") -> T:
        """Build from a mapping (parsed YAML). Unknown keys are errors naming the key path."""
        data = dict(data or {})
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        unknown = [k for k in data if k not in names]
        if unknown:
            k = unknown[0]
            key = f"{_path}.{k}" if _path else str(k)
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: unknown key{hint}; allowed keys: {', '.join(names)}")
        obj = cls.__new__(cls)
        object.__setattr__(obj, "_config_path", _path)
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            key = f"{_path}.{f.name}" if _path else f.name
            if f.name in data:
                value = data[f.name]
                tp = hints[f.name]
                if isinstance(tp, type) and issubclass(tp, Config) and isinstance(value, Mapping):
                    # A section given in part overrides the field's own default (which may differ
                    # from the section class's defaults), not the class defaults.
                    default = _field_default(f)
                    if isinstance(default, Config):
                        value = _deep_merge(default.to_dict(), value)
                    value = tp.from_dict(value, _path=key)
                values[f.name] = value
        try:
            obj.__init__(**values)  # type: ignore[misc]
        except TypeError as exc:  # a required field is missing
            raise ConfigError(f"{_path or 'config'}: {exc}") from None
        return obj

    def to_dict(self) -> dict[str, Any]:
        """Plain data (dicts, lists, scalars) that :meth:`from_dict` turns back into an equal object."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.init:
                out[f.name] = _plain(getattr(self, f.name))
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml(), encoding="utf-8")

    def replace(self: T, **changes: Any) -> T:
        data = self.to_dict()
        data.update({k: _plain(v) for k, v in changes.items()})
        return type(self).from_dict(data, _path=getattr(self, "_config_path", ""))

    def __setattr__(self, name: str, value: Any) -> None:
        # Keep every section valid: assignments go through the same checks as construction.
        if name.startswith("_") or not any(f.name == name for f in dataclasses.fields(self)):
            object.__setattr__(self, name, value)
            return
        f = next(f for f in dataclasses.fields(self) if f.name == name)
        key = self._key(name)
        hints = typing.get_type_hints(type(self))
        value = _coerce(value, hints[name], key)
        _check_bounds(value, f.metadata, key)
        if not self.__dict__.get("_validated"):  # during construction: __post_init__ validates once
            object.__setattr__(self, name, value)
            return
        # The cross-field checks hold however a config is changed: an assignment that breaks one,
        # in this section or in a section holding it (``finetune.data.mode`` is checked by the
        # fine-tuning config), is refused and leaves the section as it was.
        old = self.__dict__.get(name, dataclasses.MISSING)
        object.__setattr__(self, name, value)
        try:
            self.validate()
            for section in self._ancestors():
                section.validate()
        except BaseException:
            if old is dataclasses.MISSING:
                object.__delattr__(self, name)
            else:
                object.__setattr__(self, name, old)
            raise
        _adopt(self, value)

    def _ancestors(self) -> list[Config]:
        """The sections holding this one, innermost first (each section knows only its latest holder)."""
        out: list[Config] = []
        ref = self.__dict__.get("_parent")
        while ref is not None:
            holder = ref()
            if holder is None or any(h is holder for h in out):  # identity: equal sections are not the same
                break
            out.append(holder)
            ref = holder.__dict__.get("_parent")
        return out

    # The holder link is a weak reference, which neither pickles nor needs to: it is rebuilt on load.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_parent"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        for f in dataclasses.fields(self):
            _adopt(self, self.__dict__.get(f.name))

    @classmethod
    def field_help(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, help) for each field: used by ``--help`` listings and docs."""
        hints = typing.get_type_hints(cls)
        rows = []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            default = _field_default(f)
            if default is dataclasses.MISSING:
                default = "(required)"
            rows.append((f.name, _type_name(hints[f.name]), _plain(default), f.metadata.get("help", "")))
        return rows


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# ---- YAML files and overrides ---------------------------------------------------------------

def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):  # type: ignore[override]
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base": explicit keys may override merged ones
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # unhashable key: let PyYAML report it
                continue
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"key {key!r} given twice (first on line {first.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config YAML file, following ``extends:`` (a path relative to the file)."""
    path = Path(path)
    try:
        resolved = path.resolve()
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc}") from None
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise ConfigError(f"config file {str(path)!r}: 'extends' forms a cycle: {chain}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {str(path)!r}{where}: not valid YAML "
                          f"({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config file {str(path)!r}: top level must be a mapping, got {type(data).__name__}")
    data = dict(data)
    parent = data.pop("extends", None)
    if parent is not None:
        parents = parent if isinstance(parent, list) else [parent]
        merged: dict[str, Any] = {}
        for p in parents:
            if not isinstance(p, str):
                raise ConfigError(f"config file {str(path)!r}: extends: got {_describe(p)}; expected a path")
            merged = _deep_merge(merged, load_yaml(path.parent / p, (*_seen, resolved)))
        data = _deep_merge(merged, data)
    return data


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to nested ``data``; values are typed later by the schema."""
    out = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE (for example train.lr=3e-4)")
        key, value = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not key or any(not p or not p.replace("_", "").replace("-", "").isalnum() for p in parts):
            raise ConfigError(f"override {item!r}: bad key {key!r}; expected dotted names like data.frames")
        node = out
        for i, p in enumerate(parts[:-1]):
            child = node.get(p)
            if isinstance(child, _Raw):  # an earlier "key={a: 1}" override, now refined by "key.b=2"
                parsed = _parse_raw_scalar(child)
                if isinstance(parsed, Mapping):
                    child = {k: _Raw(str(v)) if isinstance(v, (int, float, str, bool)) else v
                             for k, v in parsed.items()}
            if child is None:
                child = {}
            elif not isinstance(child, Mapping):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a section")
            child = dict(child)
            node[p] = child
            node = child
        node[parts[-1]] = _Raw(value)
    return out


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None) -> T:
    """Defaults of ``cls`` ← ``base`` ← YAML file ``path`` ← dotted ``overrides``; validated."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = _deep_merge(data, load_yaml(path))
    data = apply_overrides(data, overrides)
    return cls.from_dict(data)


def parse_config_args(cls: type[T], items: Sequence[str], base: Mapping[str, Any] | None = None) -> T:
    """Parse CLI leftovers: at most one ``*.yaml``/``*.yml`` file, then ``key=value`` overrides."""
    path = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif item.endswith((".yaml", ".yml")):
            if path is not None:
                raise ConfigError(f"more than one config file given ({path!r} and {item!r}); "
                                  f"use 'extends:' inside the YAML to combine them")
            path = item
        else:
            raise ConfigError(f"unexpected argument {item!r}: expected a config file (*.yaml) "
                              f"or an override KEY=VALUE")
    return load_config(cls, path, overrides, base=base)


_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9,
               "T": 10**12, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, key: str = "size") -> int:
    """``"512MB"`` → 512_000_000, ``"1GiB"`` → 2**30; plain integers are bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise ConfigError(f"{key}: got {text!r}; expected a positive size")
        return text
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _SIZE_UNITS or value <= 0:
        raise ConfigError(f"{key}: got {text!r}; expected a size like 512MB, 2GiB or a byte count")
    return int(value * _SIZE_UNITS[unit])
