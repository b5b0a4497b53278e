"""Backbones, heads and self-supervised objectives (single-device code; never imports DeepSpeed).

Public API (imported lazily, so ``vidssl.models.config`` can be used without importing torch):

- :func:`build_backbone` ``(name, *, weights_path=None, **options) -> VideoBackbone`` and
  :func:`available_backbones`, :func:`builtin_backbones`; :func:`build_backbone_from_config` ``(ModelConfig)``;
  :func:`register_backbone` ``(name, *, replace=False)`` (a taken name raises :class:`RegistryError`).
- :class:`VideoBackbone`: ``forward_features(x (B,C,T,H,W)) -> (B,T',D)``, ``forward_pooled -> (B,D)``,
  ``forward_tokens -> (B,T',N,D)``, ``embed_dim``, ``out_steps(T)``.
- :func:`clips_to_input`: loader uint8 ``(B,T,C,H,W)`` → normalised float ``(B,C,T,H,W)`` on device.
- :class:`SSLModel` ``(ModelConfig, ObjectivesConfig)``: ``forward(batch) -> {"loss", "future/...", "contrast/..."}``.
- :class:`ClassificationHead`, :class:`VideoClassifier`, :func:`build_classifier` ``(ModelConfig, num_classes)``.
- Configs: :class:`ModelConfig`, :class:`HeadConfig`, :class:`ObjectivesConfig`, :class:`FutureConfig`,
  :class:`ContrastConfig`.

See docs/models.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "build_backbone": "vidssl.models.registry",
    "available_backbones": "vidssl.models.registry",
    "register_backbone": "vidssl.models.registry",
    "builtin_backbones": "vidssl.models.registry",
    "RegistryError": "vidssl.models.registry",
    "load_weights": "vidssl.models.registry",
    "VideoBackbone": "vidssl.models.base",
    "InputShapeError": "vidssl.models.base",
    "clips_to_input": "vidssl.models.base",
    "ClassificationHead": "vidssl.models.heads",
    "ProjectionMLP": "vidssl.models.heads",
    "VideoClassifier": "vidssl.models.heads",
    "build_classifier": "vidssl.models.heads",
    "SSLModel": "vidssl.models.ssl",
    "ModelConfig": "vidssl.models.config",
    "HeadConfig": "vidssl.models.config",
    "ObjectivesConfig": "vidssl.models.config",
    "FutureConfig": "vidssl.models.config",
    "ContrastConfig": "vidssl.models.config",
}

__all__ = sorted([*_EXPORTS, "build_backbone_from_config"])


def build_backbone_from_config(cfg) -> Any:
    """Build the backbone of a :class:`ModelConfig` section (name, ``backbone_kwargs``, ``weights_path``).

    Errors name the section's key path (``model.backbone_kwargs.depth: ...``).
    """
    from vidssl.models.registry import build_backbone  # noqa: PLC0415

    from vidssl.config import ConfigError  # noqa: PLC0415

    key = getattr(cfg, "_config_path", "") or "model"
    net = build_backbone(cfg.backbone, weights_path=cfg.weights_path, _key=key, **cfg.backbone_kwargs)
    if getattr(cfg, "activation_checkpointing", False):
        if not net.supports_activation_checkpointing:
            from vidssl.models.registry import builtin_backbones  # noqa: PLC0415

            ok = ", ".join(n for n in builtin_backbones() if n.startswith("vit_"))
            raise ConfigError(f"{key}.activation_checkpointing: backbone {cfg.backbone!r} does not support it "
                              f"(the built-in ones that do: {ok}; a BatchNorm network would update its running "
                              f"statistics twice); set it to false")
        net.set_activation_checkpointing(True)
    return net


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vidssl.models' has no attribute {name!r}")
