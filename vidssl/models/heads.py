"""Heads on backbone features: classification (action recognition) and projection MLPs (objectives).

:class:`VideoClassifier` is the fine-tuning model: backbone + :class:`ClassificationHead`. A head
swap is all fine-tuning needs because every backbone has the same feature interface.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from vidssl.models.base import KINETICS_MEAN, KINETICS_STD, VideoBackbone, clips_to_input

__all__ = ["ClassificationHead", "ProjectionMLP", "VideoClassifier", "build_classifier"]


class ClassificationHead(nn.Module):
    """Pooled features ``(B, D)`` → logits ``(B, num_classes)``.

    ``kind="linear"``: dropout → Linear. ``kind="mlp"``: Linear → GELU → dropout → Linear.
    """

    def __init__(self, in_dim: int, num_classes: int, *, kind: str = "linear", hidden_dim: int = 512,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes: got {num_classes}; expected >= 1")
        if kind == "linear":
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, num_classes))
        elif kind == "mlp":
            self.net = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(hidden_dim, num_classes))
        else:
            raise ValueError(f"kind: got {kind!r}; allowed: 'linear', 'mlp'")
        self.num_classes = num_classes

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats)


class ProjectionMLP(nn.Sequential):
    """``(..., in_dim)`` → ``(..., out_dim)``: Linear → LayerNorm → GELU → Linear (SimCLR-style projector).

    LayerNorm rather than BatchNorm: no batch statistics, so results do not depend on how the
    global batch is split over ranks.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(),
                         nn.Linear(hidden_dim, out_dim))


class VideoClassifier(nn.Module):
    """Backbone + classification head. ``forward`` takes loader clips uint8 ``(B, T, C, H, W)`` → logits.

    With ``freeze_backbone=True`` (linear probe) the backbone gets no gradients and stays in eval
    mode (frozen normalisation statistics) even when the classifier is in train mode.
    """

    def __init__(self, backbone: VideoBackbone, head: ClassificationHead, *,
                 mean: Sequence[float] = KINETICS_MEAN, std: Sequence[float] = KINETICS_STD,
                 freeze_backbone: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.mean, self.std = tuple(mean), tuple(std)
        self.frozen = freeze_backbone
        if freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "VideoClassifier":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward_input(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float ``(B, C, T, H, W)`` → logits ``(B, num_classes)``."""
        if self.frozen:
            with torch.no_grad():
                feats = self.backbone.forward_pooled(x)
        else:
            feats = self.backbone.forward_pooled(x)  # (B, D)
        return self.head(feats)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """Loader clips uint8 ``(B, T, C, H, W)`` (on the model's device) → logits ``(B, num_classes)``."""
        return self.forward_input(clips_to_input(clips, self.mean, self.std))


def build_classifier(cfg, num_classes: int, *, backbone: VideoBackbone | None = None,
                     freeze_backbone: bool = False) -> VideoClassifier:
    """A :class:`VideoClassifier` from a :class:`~vidssl.models.config.ModelConfig` section.

    Pass ``backbone`` to reuse a pretrained one (e.g. ``ssl_model.backbone``); otherwise it is
    built from ``cfg`` (including ``cfg.weights_path``).
    """
    from vidssl.models import build_backbone_from_config  # noqa: PLC0415

    net = backbone if backbone is not None else build_backbone_from_config(cfg)
    head = ClassificationHead(net.embed_dim, num_classes, kind=cfg.head.kind, hidden_dim=cfg.head.hidden_dim,
                              dropout=cfg.head.dropout)
    return VideoClassifier(net, head, mean=cfg.mean, std=cfg.std, freeze_backbone=freeze_backbone)
