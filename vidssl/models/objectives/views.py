"""The windows of one SSL batch, converted and encoded on demand, each at most once per step.

Objectives ask for what they need (``views.features("context")``, ``views.input("future")``);
two objectives that both need the context features share one backbone pass.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from vidssl.data.windows import SSL_WINDOWS
from vidssl.models.base import InputShapeError, VideoBackbone, clips_to_input

__all__ = ["Views", "WINDOWS"]

# Names of the clip windows in an SSL batch (see vidssl.models.ssl.SSLModel.forward); the loader
# makes them from the same table.
WINDOWS = SSL_WINDOWS


class Views:
    """Lazy, cached access to the windows of an SSL batch.

    Args:
        batch: the loader's dict; windows are uint8 ``(B, T, C, H, W)`` tensors on the model's device.
        backbone: the online backbone.
        mean, std: input normalisation (see :func:`clips_to_input`).
    """

    def __init__(self, batch: Mapping[str, torch.Tensor], backbone: VideoBackbone,
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.batch = batch
        self.backbone = backbone
        self.mean, self.std = mean, std
        self._input: dict[str, torch.Tensor] = {}
        self._tokens: dict[str, torch.Tensor] = {}

    def clips(self, name: str) -> torch.Tensor:
        """The raw uint8 window ``(B, T, C, H, W)``; raises InputShapeError if missing or malformed."""
        if name not in self.batch:
            raise InputShapeError(f"SSL batch: missing window {name!r} (needed by an enabled objective); "
                                  f"batch has {', '.join(sorted(map(str, self.batch)))}")
        x = self.batch[name]
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.dtype != torch.uint8:
            desc = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputShapeError(f"SSL batch[{name!r}]: expected uint8 (B, T, C, H, W), got {desc}")
        ref = self.batch.get("context")
        if isinstance(ref, torch.Tensor) and ref.dim() == 5 and (x.shape[0] != ref.shape[0] or
                                                                 x.shape[2:] != ref.shape[2:]):
            raise InputShapeError(f"SSL batch[{name!r}]: shape {tuple(x.shape)} does not match context "
                                  f"{tuple(ref.shape)} in batch size, channels or frame size")
        return x

    @property
    def batch_size(self) -> int:
        return int(self.batch["context"].shape[0])

    def input(self, name: str) -> torch.Tensor:
        """Normalised float ``(B, C, T, H, W)`` of window ``name``."""
        if name not in self._input:
            # The backbone's parameter dtype: float32, or bfloat16 when an engine cast the model.
            dtype = next(self.backbone.parameters()).dtype
            self._input[name] = clips_to_input(self.clips(name), self.mean, self.std,
                                               dtype=dtype if dtype.is_floating_point else torch.float32)
        return self._input[name]

    def tokens(self, name: str) -> torch.Tensor:
        """Online-backbone tokens ``(B, T', N, D)`` of window ``name`` (with gradient)."""
        if name not in self._tokens:
            self._tokens[name] = self.backbone.forward_tokens(self.input(name))
        return self._tokens[name]

    def features(self, name: str) -> torch.Tensor:
        """Online-backbone per-step features ``(B, T', D)`` of window ``name`` (with gradient)."""
        return self.tokens(name).mean(dim=2)

    def reversed_features(self, name: str) -> torch.Tensor:
        """Per-step features ``(B, T', D)`` of window ``name`` played backwards (with gradient).

        The same frames in the opposite order: everything a single frame shows is unchanged,
        only the direction of motion flips (left becomes right, growing becomes shrinking).
        """
        key = name + "@reversed"
        if key not in self._tokens:
            self._tokens[key] = self.backbone.forward_tokens(self.input(name).flip(2))  # (B, C, T, H, W): time is dim 2
        return self._tokens[key].mean(dim=2)

    def step_positions(self, name: str, steps: int) -> torch.Tensor:
        """Centre of each of ``steps`` feature steps of window ``name``, in frames from the context start.

        The future window is taken to follow the context directly (frame ``T`` is the first
        future frame); the positions let predictors and decoders use one time axis. → ``(steps,)``.
        """
        t_ctx = self.clips("context").shape[1]
        frames = self.clips(name).shape[1]
        start = t_ctx if name == "future" else 0
        stride = frames / steps
        device = self.batch["context"].device
        return start + (torch.arange(steps, dtype=torch.float32, device=device) + 0.5) * stride - 0.5
