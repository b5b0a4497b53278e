"""torchvision video ResNets (``r3d_18``, ``r2plus1d_18``, ``mc3_18``) behind the backbone interface.

Always built with ``weights=None``: nothing is downloaded at run time. Pretrained weights can be
loaded from a local file with ``build_backbone(name, weights_path=...)`` — a torchvision state
dict (its ``fc.*`` classifier is dropped) or one saved from this backbone.

Temporal stride: ``r3d_18`` and ``r2plus1d_18`` halve T in layers 2-4 (T' = ceil(T / 8));
``mc3_18`` keeps T (T' = T). Spatial stride is 16 (stem 2, layers 2-4).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from vidssl.models.base import VideoBackbone
from vidssl.models.registry import register_backbone

__all__ = ["VideoResNetBackbone"]


class VideoResNetBackbone(VideoBackbone):
    """A torchvision ``VideoResNet`` without its pooling and classifier; D = 512."""

    def __init__(self, arch: str) -> None:
        super().__init__()
        from torchvision.models import video as tvv  # noqa: PLC0415

        net = getattr(tvv, arch)(weights=None)
        self.arch = arch
        self.stem = net.stem
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.embed_dim = 512
        # mc3 uses 2D (no temporal) convs after layer1, so no temporal downsampling.
        self._time_stride = 1 if arch == "mc3_18" else 8

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.stem(x)  # (B, 64, T, H/2, W/2)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 512, T', H/16, W/16)
        return x.flatten(3).permute(0, 2, 3, 1)  # (B, T', N, 512)

    def out_steps(self, frames: int) -> int:
        t = frames
        if self._time_stride > 1:
            for _ in range(3):  # three stride-2 temporal convs (kernel 3 or 1, padding keeps ceil)
                t = (t + 1) // 2
        return t

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # torchvision checkpoints carry the Kinetics classifier; it is not part of the backbone.
        return {k: v for k, v in state_dict.items() if not k.startswith("fc.")}


@register_backbone("r3d_18")
def r3d_18() -> VideoResNetBackbone:
    """18-layer 3D ResNet (Tran et al. 2018), 33M parameters."""
    return VideoResNetBackbone("r3d_18")


@register_backbone("r2plus1d_18")
def r2plus1d_18() -> VideoResNetBackbone:
    """18-layer R(2+1)D: each 3D conv factorised into spatial then temporal, 31M parameters."""
    return VideoResNetBackbone("r2plus1d_18")


@register_backbone("mc3_18")
def mc3_18() -> VideoResNetBackbone:
    """18-layer mixed-convolution ResNet: 3D convs in layer1, 2D after, 12M parameters."""
    return VideoResNetBackbone("mc3_18")
