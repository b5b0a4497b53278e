"""The interface every backbone implements, and the loader-batch → model-input conversion.

Shapes (the whole model code uses these letters):

- loader clips: uint8 ``(B, T, C, H, W)`` (what ``vidssl.data`` yields);
- model input: float ``(B, C, T, H, W)``, normalised by :func:`clips_to_input` on the training
  device (never in loader workers: uint8 is 4x less to copy and the GPU normalises for free);
- ``forward_tokens(x)`` → ``(B, T', N, D)``: N spatial tokens per time step;
- ``forward_features(x)`` → ``(B, T', D)``: the tokens averaged over space;
- ``forward_pooled(x)`` / ``forward(x)`` → ``(B, D)``: averaged over time too (classification).

``T'`` depends on the backbone (its temporal stride) and is computed by :meth:`VideoBackbone.out_steps`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from vidssl.errors import UserError

__all__ = ["VideoBackbone", "InputShapeError", "clips_to_input", "KINETICS_MEAN", "KINETICS_STD"]

# torchvision's video models were trained on Kinetics with these (RGB, 0..1 scale).
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


class InputShapeError(UserError, ValueError):
    """A clip shape a backbone cannot take (wrong rank, channels, or sizes not divisible by its patches)."""


def clips_to_input(clips: torch.Tensor, mean: Sequence[float] = KINETICS_MEAN,
                   std: Sequence[float] = KINETICS_STD, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Loader clips uint8 ``(B, T, C, H, W)`` → normalised float ``(B, C, T, H, W)`` on the clips' device.

    Move the uint8 batch to the training device first (``clips.to(device, non_blocking=True)``),
    then call this: ``(x / 255 - mean) / std`` per channel. ``mean``/``std`` have one value per
    channel (or one value for all). The result is contiguous in the model layout.
    """
    if clips.dim() != 5:
        raise InputShapeError(f"clips: expected 5 dims (B, T, C, H, W), got shape {tuple(clips.shape)}")
    if clips.dtype != torch.uint8:
        raise InputShapeError(f"clips: expected dtype uint8 from the loader, got {clips.dtype}")
    c = clips.shape[2]
    m = torch.as_tensor(mean, dtype=dtype, device=clips.device).flatten()
    s = torch.as_tensor(std, dtype=dtype, device=clips.device).flatten()
    if m.numel() not in (1, c) or s.numel() not in (1, c):
        raise InputShapeError(f"mean/std: need 1 or {c} values (one per channel), got {m.numel()} and {s.numel()}")
    # Fold /255 into the affine map: x * (1 / (255 s)) - m / s, one fused pass. (C,) → (1, C, 1, 1, 1)
    scale = (1.0 / (255.0 * s)).expand(c).view(1, c, 1, 1, 1)
    shift = (-m / s).expand(c).view(1, c, 1, 1, 1)
    x = clips.permute(0, 2, 1, 3, 4).to(dtype)  # (B, C, T, H, W)
    return (x * scale + shift).contiguous()


class VideoBackbone(nn.Module):
    """Base class of every registered backbone. Subclasses set ``embed_dim`` and implement ``forward_tokens``.

    Attributes:
        embed_dim: D, the width of the features.
        in_channels: C expected in the input.
    """

    embed_dim: int
    in_channels: int = 3

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Float ``(B, C, T, H, W)`` → spatial tokens ``(B, T', N, D)``."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Float ``(B, C, T, H, W)`` → per-time-step features ``(B, T', D)`` (spatially pooled)."""
        return self.forward_tokens(x).mean(dim=2)

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Float ``(B, C, T, H, W)`` → one feature vector per clip ``(B, D)`` (space and time pooled)."""
        return self.forward_features(x).mean(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pooled(x)

    def out_steps(self, frames: int) -> int:
        """T' produced for a clip of ``frames`` frames."""
        raise NotImplementedError

    #: Whether :meth:`set_activation_checkpointing` can switch recomputation on (see ``model.activation_checkpointing``).
    supports_activation_checkpointing: bool = False

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute activations in the backward pass instead of storing them (less memory, more compute).

        Backbones that support it set ``supports_activation_checkpointing`` and override this; the
        others refuse ``enabled=True`` (e.g. BatchNorm would update its running statistics twice)."""
        if enabled:
            raise UserError(f"{type(self).__name__} does not support activation checkpointing")

    def adapt_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map a foreign state dict (e.g. torchvision's) onto this module's keys before a strict load."""
        return dict(state_dict)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != self.in_channels:
            raise InputShapeError(f"{type(self).__name__}: expected float (B, {self.in_channels}, T, H, W), "
                                  f"got shape {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            raise InputShapeError(f"{type(self).__name__}: expected a float input, got {x.dtype} "
                                  f"(convert loader clips with vidssl.models.clips_to_input)")
