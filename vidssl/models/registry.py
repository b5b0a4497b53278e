"""Backbone registry: one name → one builder, one interface (:class:`vidssl.models.base.VideoBackbone`).

The names of the built-in backbones are known without importing torch (so configs can be
validated cheaply); their modules are imported on first use. Third-party code may add more with
:func:`register_backbone`; a name is registered once (built-in names included) unless the caller
passes ``replace=True``.

Usage::

    from vidssl.models import build_backbone
    net = build_backbone("r3d_18")                    # random init, never downloads
    net = build_backbone("vit_tiny", pos_embed="sincos")
    net = build_backbone("r3d_18", weights_path="r3d.pth")   # a local state dict file
    feats = net.forward_features(x)                   # x (B, C, T, H, W) float → (B, T', D)
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from vidssl.config import ConfigError
from vidssl.errors import UserError

__all__ = ["register_backbone", "build_backbone", "available_backbones", "builtin_backbones", "backbone_options",
           "OptionError", "RegistryError", "load_weights", "load_state"]

# Built-in backbones: name → module that registers it on import. Kept as plain strings so that
# listing names (config validation, --help) does not import torch. The one list of built-in names:
# help texts derive from it through ``builtin_backbones``.
_BUILTIN: dict[str, str] = {
    "cnn3d_small": "vidssl.models.cnn3d",
    "r3d_18": "vidssl.models.resnet3d",
    "r2plus1d_18": "vidssl.models.resnet3d",
    "mc3_18": "vidssl.models.resnet3d",
    "vit_tiny": "vidssl.models.vit",
    "vit_small": "vidssl.models.vit",
    "vit_base": "vidssl.models.vit",
}

_BUILDERS: dict[str, Callable[..., Any]] = {}
# name → (where its builder comes from, registered with replace=True); for error messages and so that
# a built-in module imported after an explicit replacement keeps the replacement.
_ORIGINS: dict[str, tuple[str, bool]] = {}

# Names go into config keys and values (``model.backbone=NAME``, YAML, comma-separated CLI lists).
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


class OptionError(ValueError):
    """A backbone option has a bad value. ``option`` is the keyword name; the message says what is allowed.

    :func:`build_backbone` turns it into a :class:`ConfigError` naming the config key path.
    """

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"{option}: {message}")
        self.option = option
        self.message = message


class RegistryError(UserError, ValueError):
    """A backbone name that cannot be registered: invalid, or already taken (the message says by what)."""


def _check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise RegistryError(f"register_backbone: name {name!r} is a {type(name).__name__}; expected a str")
    if not _NAME_RE.fullmatch(name):
        raise RegistryError(f"register_backbone: invalid backbone name {name!r}; expected a letter followed by "
                            f"letters, digits, '_' or '-' (no whitespace, dots or other punctuation: the name is "
                            f"used in config values such as model.backbone={name or 'NAME'})")
    if yaml.safe_load(name) != name:
        raise RegistryError(f"register_backbone: invalid backbone name {name!r}; YAML reads it as "
                            f"{yaml.safe_load(name)!r}, so 'backbone: {name}' in a config file would not name it")
    return name


def _where(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', None) or '?'}.{getattr(fn, '__qualname__', None) or repr(fn)}"


def register_backbone(name: str, *, replace: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register ``builder(**options) -> VideoBackbone`` under ``name``.

    ``name``: a letter, then letters, digits, ``_`` or ``-``. A name already registered, or a built-in
    name (see :func:`builtin_backbones`, even before its module is imported), raises
    :class:`RegistryError` naming where the existing backbone comes from, unless ``replace=True``.
    An explicit replacement of a built-in name survives a later import of the built-in module.
    """
    _check_name(name)

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        own_builtin = _BUILTIN.get(name) is not None and getattr(fn, "__module__", None) == _BUILTIN[name]
        if name in _BUILDERS:
            origin, replaced = _ORIGINS.get(name, (_where(_BUILDERS[name]), False))
            if own_builtin and replaced and not replace:
                return fn  # the built-in module imported after a user's explicit replacement: keep that
            if not replace:
                raise RegistryError(f"register_backbone: backbone {name!r} is already registered by {origin}; "
                                    f"{_where(fn)} cannot register it again. Choose another name, or pass "
                                    f"register_backbone({name!r}, replace=True) to replace it")
        elif name in _BUILTIN and not own_builtin and not replace:
            raise RegistryError(f"register_backbone: {name!r} is a built-in backbone (from {_BUILTIN[name]}); "
                                f"{_where(fn)} cannot register it. Choose another name, or pass "
                                f"register_backbone({name!r}, replace=True) to replace the built-in")
        _BUILDERS[name] = fn
        _ORIGINS[name] = (_where(fn), replace and not own_builtin)
        return fn

    return deco


def available_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone` (built-in and registered), sorted."""
    return sorted(set(_BUILTIN) | set(_BUILDERS))


def builtin_backbones(module: str | None = None) -> list[str]:
    """Names of the built-in backbones in their listing order (only those of ``module``, e.g.
    ``"vidssl.models.resnet3d"``, if given). Does not import torch."""
    return [n for n, m in _BUILTIN.items() if module is None or m == module]


def _builder(name: str) -> Callable[..., Any]:
    if name not in _BUILDERS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _BUILDERS:
        raise KeyError(name)
    return _BUILDERS[name]


def backbone_options(name: str) -> dict[str, Any]:
    """Keyword options of backbone ``name`` with their defaults (``weights_path`` is always accepted)."""
    sig = inspect.signature(_builder(name))
    out = {k: p.default for k, p in sig.parameters.items()
           if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    out["weights_path"] = None
    return out


def build_backbone(name: str, *, weights_path: str | Path | None = None, _key: str = "model",
                   **options: Any):
    """Build backbone ``name`` with keyword ``options``; optionally load a local state dict file.

    ``_key`` is the config path used in error messages (``model`` gives ``model.backbone``,
    ``model.backbone_kwargs.depth``). Bad names and options raise :class:`ConfigError`; a missing
    or mismatched weights file raises :class:`UserError`. Nothing is ever downloaded.

    ``weights=`` is accepted as another name for ``weights_path`` (torchvision's keyword): a local
    file path, or ``None`` for random initialisation.
    """
    try:
        builder = _builder(name)
    except KeyError:
        raise ConfigError(f"{_key}.backbone: got {name!r}; allowed: {', '.join(available_backbones())}") from None
    if "weights" in options:
        weights = options.pop("weights")
        if weights is not None and not isinstance(weights, (str, Path)):
            raise ConfigError(f"{_key}.weights_path: got weights={weights!r} ({type(weights).__name__}); expected "
                              f"a local state dict file path or None (pretrained weights are never downloaded)")
        if weights is not None and weights_path is not None:
            raise ConfigError(f"{_key}.weights_path: got both weights={str(weights)!r} and "
                              f"weights_path={str(weights_path)!r}; give one")
        weights_path = weights if weights is not None else weights_path
    allowed = backbone_options(name)
    for k in options:
        if k not in allowed:
            raise ConfigError(f"{_key}.backbone_kwargs.{k}: unknown option for backbone {name!r}; "
                              f"allowed: {', '.join(sorted(allowed))}")
    options = {k: _typed_option(v, allowed[k], f"{_key}.backbone_kwargs.{k}") for k, v in options.items()}
    try:
        net = builder(**options)
    except OptionError as exc:
        raise ConfigError(f"{_key}.backbone_kwargs.{exc.option}: {exc.message}") from None
    if weights_path is not None:
        load_weights(net, weights_path, key=f"{_key}.weights_path")
    return net


def _typed_option(value: Any, default: Any, key: str) -> Any:
    """Type a backbone option like its default: ``model.backbone_kwargs.width=16`` arrives as a string."""
    if not isinstance(value, str) or default is None or isinstance(default, str):
        return value
    text = value.strip()
    try:
        if isinstance(default, bool):
            low = text.lower()
            if low in ("true", "yes", "on", "1"):
                return True
            if low in ("false", "no", "off", "0"):
                return False
            raise ValueError(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise ConfigError(f"{key}: got {text!r}; expected {type(default).__name__} "
                          f"(default {default!r})") from None
    return value


def _unwrap_state_dict(obj: Any) -> Mapping[str, Any]:
    # Checkpoints often nest the weights: {"state_dict": ...}, {"model": ...}, {"module": ...}.
    for k in ("state_dict", "model", "module", "backbone"):
        if isinstance(obj, Mapping) and k in obj and isinstance(obj[k], Mapping):
            return _unwrap_state_dict(obj[k])
    if not isinstance(obj, Mapping):
        raise TypeError(type(obj).__name__)
    return obj


def load_weights(net, path: str | Path, *, key: str = "weights_path") -> None:
    """Load a local state dict file into backbone ``net`` (strictly, after the backbone's own key mapping).

    Accepts a plain state dict or one nested under ``state_dict``/``model``/``module``/``backbone``,
    with or without a ``module.`` prefix (DDP/DeepSpeed). Keys the backbone declares irrelevant
    (``VideoBackbone.adapt_state_dict``, e.g. torchvision's ``fc.*`` classifier) are dropped;
    any other missing or unexpected key is an error listing them.
    """
    import torch  # noqa: PLC0415

    p = Path(path)
    if p.is_dir():
        raise UserError(f"{key}: {str(p)!r} is a folder; expected a state dict file (.pt/.pth)")
    if not p.is_file():
        raise UserError(f"{key}: weights file {str(p)!r} does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
        sd = dict(_unwrap_state_dict(obj))
    except TypeError as exc:
        raise UserError(f"{key}: {str(p)!r} holds a {exc}, not a state dict") from None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad file for the user
        raise UserError(f"{key}: cannot read {str(p)!r} as a torch state dict ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    load_state(net, sd, str(p), key=key)


def load_state(net, sd: Mapping[str, Any], source: str, *, key: str = "weights_path") -> None:
    """Load state dict ``sd`` (read from ``source``, named in errors) into backbone ``net``, strictly.

    Strips a ``module.`` prefix (DDP/DeepSpeed), applies the backbone's own key mapping
    (``VideoBackbone.adapt_state_dict``), and raises :class:`UserError` listing missing, unexpected
    or mis-shaped keys.
    """
    p = source
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    sd = net.adapt_state_dict(sd)
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {', '.join(unexpected[:3])})")
        raise UserError(f"{key}: {p!r} does not match backbone {type(net).__name__}: " + "; ".join(parts))
    bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
    if bad:
        k = bad[0]
        raise UserError(f"{key}: {p!r}: {k} has shape {tuple(sd[k].shape)}, backbone expects "
                        f"{tuple(own[k].shape)} ({len(bad)} mismatched tensors)")
    net.load_state_dict(sd, strict=True)
