"""The SSL model the training loop sees: one backbone, the enabled objectives, one weighted loss."""

from __future__ import annotations

from typing import Iterator, Mapping

import torch
from torch import nn

from vidssl.config import ConfigError
from vidssl.models.base import VideoBackbone
from vidssl.models.objectives import TemporalContrast, Views, build_future

__all__ = ["SSLModel"]


class SSLModel(nn.Module):
    """Backbone + self-supervised objectives, combined with their weights.

    Args:
        model_cfg: :class:`~vidssl.models.config.ModelConfig` (backbone, normalisation).
        objectives_cfg: :class:`~vidssl.models.config.ObjectivesConfig`; disabled objectives (or
            weight 0) are not built at all (no parameters, no compute).
        backbone: optional ready backbone (else built from ``model_cfg``).

    ``forward(batch)`` takes the loader's SSL batch, a dict of tensors already on the model's device:

    - ``context``: uint8 ``(B, T, C, H, W)``, the input window;
    - ``future``: uint8 ``(B, F, C, H, W)``, the F frames right after ``context`` (future objective);
    - ``other``: uint8 ``(B, T, C, H, W)``, another window of the same video (contrast objective);
    - other keys (``label``, ``key``, ...) are ignored.

    and returns ``{"loss": weighted sum (with grad), "future/loss": ..., "future/acc": ...,
    "contrast/loss": ..., "contrast/acc": ..., ...}``: per-objective losses and metrics, detached.
    Names: ``future/loss`` and ``future/chance`` always (the loss of predicting zeros for pixels,
    ``log(#keys)`` for latent infonce, the targets' variance for latent regression), ``future/acc``
    (latent infonce), ``future/target_var`` (latent regression); ``contrast/loss``, ``contrast/acc``,
    ``contrast/chance``.
    Under data parallelism the values are this rank's (see :mod:`vidssl.models.distributed`).

    Call :meth:`on_after_step` after every optimizer step (EMA targets); it is a no-op otherwise, so
    the loop need not know which objectives are on. Give the optimizer :meth:`trainable_parameters`
    (the EMA target encoder is not trained).
    """

    def __init__(self, model_cfg, objectives_cfg, *, backbone: VideoBackbone | None = None) -> None:
        super().__init__()
        from vidssl.models import build_backbone_from_config  # noqa: PLC0415

        self.backbone = backbone if backbone is not None else build_backbone_from_config(model_cfg)
        self.mean, self.std = tuple(model_cfg.mean), tuple(model_cfg.std)
        self.weights: dict[str, float] = {}
        objectives = nn.ModuleDict()
        fc, cc = objectives_cfg.future, objectives_cfg.contrast
        if fc.enabled and fc.weight > 0:
            objectives["future"] = build_future(fc, self.backbone)
            self.weights["future"] = fc.weight
        if cc.enabled and cc.weight > 0:
            objectives["contrast"] = TemporalContrast(cc, self.backbone.embed_dim)
            self.weights["contrast"] = cc.weight
        if not objectives:
            raise ConfigError("objectives.future.enabled/objectives.contrast.enabled: every objective is off "
                              "or has weight 0; enable at least one with weight > 0")
        self.objectives = objectives

    def forward(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        views = Views(batch, self.backbone, self.mean, self.std)
        out: dict[str, torch.Tensor] = {}
        total = None
        for name, obj in self.objectives.items():
            res = obj(views)
            term = self.weights[name] * res["loss"]
            total = term if total is None else total + term
            for k, v in res.items():
                out[f"{name}/{k}"] = v.detach()
        out["loss"] = total
        return out

    @torch.no_grad()
    def on_after_step(self, ema_momentum: float | None = None) -> None:
        """Per-step hooks of the objectives (EMA target update); call after each optimizer step.

        ``ema_momentum``: this step's EMA momentum from a schedule (default: the objective's config).
        """
        for obj in self.objectives.values():
            hook = getattr(obj, "on_after_step", None)
            if hook is not None:
                hook(self.backbone, ema_momentum) if ema_momentum is not None else hook(self.backbone)

    def release_targets(self) -> dict[str, nn.Module]:
        """Take every EMA target encoder out of the module tree (see ``LatentFuture.release_target``):
        ``{objective name: encoder}``. Used by the trainer so DeepSpeed never casts, partitions or
        optimizes them; the caller places and checkpoints them."""
        out = {}
        for name, obj in self.objectives.items():
            release = getattr(obj, "release_target", None)
            enc = release() if release is not None else None
            if enc is not None:
                out[name] = enc
        return out

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters the optimizer should update (excludes the frozen EMA target encoder)."""
        return (p for p in self.parameters() if p.requires_grad)
