"""``cnn3d_small``: a small 3D CNN sized for CPU demos on 64x64 footage.

Four stages of (3x3x3 conv, norm, ReLU) pairs with widths ``w, 2w, 4w, 8w`` (``w = width``,
default 32 → D = 256, about 3.5M parameters). Spatial stride 16 (64x64 → 4x4 tokens per step);
temporal stride 2 (stage 3), so an 8-frame clip gives T' = 4 and a 4-frame future gives 2.

``norm="batch"`` (default) uses BatchNorm3d. ``norm="group"`` uses GroupNorm, which is
batch-independent (a batch split over ranks computes exactly what one process would) but, in this
plain stack, makes the globally pooled features almost the same for every clip: GroupNorm + ReLU
before the pooling fixes each clip's per-channel mean near E[ReLU(N(0,1))] ≈ 0.4. On the demo's
Moving Digits, temporal contrast then collapsed to its chance loss (log N, zero gradient) within
10 steps with GroupNorm at lr 1e-3 and 1e-4, while with BatchNorm the features spread across
clips (std 0.43 vs 0.02) and the loss fell below chance. Under data parallelism BatchNorm uses
per-rank statistics unless converted to SyncBatchNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from vidssl.models.base import VideoBackbone
from vidssl.models.registry import OptionError, register_backbone

__all__ = ["SmallCNN3d"]


def _norm(kind: str, ch: int) -> nn.Module:
    return nn.GroupNorm(min(8, ch), ch) if kind == "group" else nn.BatchNorm3d(ch)


def _conv(cin: int, cout: int, stride: tuple[int, int, int], norm: str) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False), _norm(norm, cout),
                         nn.ReLU(inplace=True))


class SmallCNN3d(VideoBackbone):
    """Small 3D CNN; D = 8 * ``width``."""

    def __init__(self, *, width: int = 32, norm: str = "batch", in_channels: int = 3) -> None:
        super().__init__()
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise OptionError("width", f"got {width!r}; expected an integer >= 1")
        if norm not in ("group", "batch"):
            raise OptionError("norm", f"got {norm!r}; allowed: 'group', 'batch'")
        w = width
        self.in_channels = in_channels
        self.embed_dim = 8 * w
        # (stride t, h, w) per stage; time is halved once, in stage 3, after enough spatial context.
        self.stages = nn.Sequential(
            _conv(in_channels, w, (1, 2, 2), norm),                              # (B, w, T, H/2, W/2)
            nn.Sequential(_conv(w, 2 * w, (1, 2, 2), norm), _conv(2 * w, 2 * w, (1, 1, 1), norm)),  # H/4
            nn.Sequential(_conv(2 * w, 4 * w, (2, 2, 2), norm), _conv(4 * w, 4 * w, (1, 1, 1), norm)),  # T/2, H/8
            nn.Sequential(_conv(4 * w, 8 * w, (1, 2, 2), norm), _conv(8 * w, 8 * w, (1, 1, 1), norm)),  # H/16
        )

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        z = self.stages(x)  # (B, D, ceil(T/2), H/16, W/16)
        return z.flatten(3).permute(0, 2, 3, 1)  # (B, T', N, D)

    def out_steps(self, frames: int) -> int:
        return (frames + 1) // 2


@register_backbone("cnn3d_small")
def cnn3d_small(*, width: int = 32, norm: str = "batch") -> SmallCNN3d:
    """Small 3D CNN for CPU demos (64x64, 8 frames); ``width`` scales all stages (D = 8 * width)."""
    return SmallCNN3d(width=width, norm=norm)
