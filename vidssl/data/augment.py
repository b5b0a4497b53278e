"""Clip-consistent augmentation on uint8 tensors ``(T, C, H, W)``.

One parameter draw per clip, applied to every frame of it (a crop that moved between frames
would be fake motion). The ssl mode draws once for context+future together (the future must
stay aligned with the context) and independently for the other window, except the flip, which
both windows share (a mirrored window moves the other way). Normalisation to float happens on the
training device, not here.
"""

from __future__ import annotations

import math
import random

import torch

__all__ = ["train_params", "apply_train", "eval_views", "TrainParams"]


class TrainParams:
    """One draw: crop box (top, left, height, width), flip, jitter factors in application order, gray,
    channel order (None: unchanged)."""

    def __init__(self, box, flip, jitter, gray, perm=None):
        self.box = box
        self.flip = flip
        self.jitter = jitter  # list of (name, factor)
        self.gray = gray
        self.perm = perm  # tuple of channel indices, or None

    def __repr__(self) -> str:
        return (f"TrainParams(box={self.box}, flip={self.flip}, jitter={self.jitter}, gray={self.gray}, "
                f"perm={self.perm})")


def _crop_box(h: int, w: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    # torchvision RandomResizedCrop.get_params, drawn from our seeded rng.
    area = h * w
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        ar = math.exp(rng.uniform(*log_r))
        cw = int(round(math.sqrt(target * ar)))
        ch = int(round(math.sqrt(target / ar)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    # Fallback: central crop at the nearest allowed ratio.
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, int(round(w / ratio[0]))
    elif in_ratio > ratio[1]:
        ch, cw = h, int(round(h * ratio[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def train_params(h: int, w: int, cfg, rng: random.Random) -> TrainParams:
    """Draw one set of parameters for a clip of frame size (h, w) from ``cfg`` (a DataConfig)."""
    box = _crop_box(h, w, cfg.scale, cfg.ratio, rng)
    flip = cfg.flip and rng.random() < 0.5
    jitter = []
    if cfg.jitter_p > 0 and rng.random() < cfg.jitter_p and (cfg.jitter > 0 or cfg.hue > 0):
        ops = []
        if cfg.jitter > 0:
            for name in ("brightness", "contrast", "saturation"):
                ops.append((name, rng.uniform(max(0.0, 1 - cfg.jitter), 1 + cfg.jitter)))
        if cfg.hue > 0:
            ops.append(("hue", rng.uniform(-cfg.hue, cfg.hue)))
        rng.shuffle(ops)
        jitter = ops
    gray = cfg.grayscale_p > 0 and rng.random() < cfg.grayscale_p
    perm = None
    # Drawn only when enabled, so configs without it keep their exact random stream.
    if getattr(cfg, "channel_shuffle_p", 0.0) > 0 and rng.random() < cfg.channel_shuffle_p:
        order = [0, 1, 2]
        rng.shuffle(order)
        perm = tuple(order) if order != [0, 1, 2] else None
    return TrainParams(box, flip, jitter, gray, perm)


def apply_train(x: torch.Tensor, p: TrainParams, size: int) -> torch.Tensor:
    """(T, C, H, W) uint8 → (T, C, size, size) uint8 with parameters ``p`` on every frame."""
    import torchvision.transforms.v2.functional as F  # noqa: PLC0415

    top, left, h, w = p.box
    x = F.resized_crop(x, top, left, h, w, [size, size], antialias=True)
    if p.flip:
        x = x.flip(-1)
    if p.perm is not None and x.shape[-3] == 3:
        x = x[..., list(p.perm), :, :]
    return _colour(x, p.jitter, p.gray)


# torchvision's luma weights (rgb_to_grayscale), so the result matches its colour jitter.
_LUMA = (0.2989, 0.587, 0.114)


def _luma(y: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) float → (..., 1, H, W) float, not rounded."""
    r, g, b = y.unbind(-3)
    return (r * _LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(-3)


def _colour(x: torch.Tensor, jitter: list, gray: bool) -> torch.Tensor:
    """Colour jitter (in the drawn order) then grayscale on a cropped uint8 clip (T, C, h, w).

    Same formulas as torchvision's adjust_brightness/contrast/saturation and rgb_to_grayscale
    (blend with black, the per-frame mean luma, the per-pixel luma; clamp to [0, 255] after each
    op), but fused: one conversion to float32 and one rounding back to uint8 for the whole chain,
    instead of a float round trip and several temporaries per op (this chain was ~3/4 of the
    train-augmented loader's time). Results differ from torchvision's by at most a few levels
    (torchvision truncates to uint8 after every op)."""
    if not jitter and not gray:
        return x.contiguous()
    y = x.float()  # (T, C, h, w) in [0, 255]
    for name, f in jitter:
        if name == "brightness":
            y.mul_(f)
        elif name == "contrast":
            mean = _luma(y).mean(dim=(-3, -2, -1), keepdim=True)  # (T, 1, 1, 1): per-frame mean luma
            y.mul_(f).add_(mean, alpha=1.0 - f)
        elif name == "saturation":
            luma = _luma(y)  # (T, 1, h, w), taken before y is scaled in place
            y.mul_(f).add_(luma, alpha=1.0 - f)
        else:  # hue: rotation in HSV space, rare (hue=0 by default): torchvision on uint8
            import torchvision.transforms.v2.functional as F  # noqa: PLC0415

            y = F.adjust_hue(y.round_().to(torch.uint8), f).float()
        y.clamp_(0.0, 255.0)
    if gray:  # the same luma in every channel: (T, 1, h, w) → (T, 3, h, w)
        return _luma(y).round_().to(torch.uint8).expand_as(x).contiguous()
    return y.round_().to(torch.uint8)


def eval_views(x: torch.Tensor, resize: int, size: int, crops: int) -> list[torch.Tensor]:
    """(T, C, H, W) uint8 → ``crops`` tensors (T, C, size, size): short side resized to ``resize``,
    then the centre crop (crops=1) or left/centre/right (top/centre/bottom for portrait) crops."""
    import torchvision.transforms.v2.functional as F  # noqa: PLC0415

    x = F.resize(x, [max(resize, size)], antialias=True)
    h, w = x.shape[-2:]
    if crops == 1:
        return [F.center_crop(x, [size, size]).contiguous()]
    top, left = (h - size) // 2, (w - size) // 2
    if w >= h:
        boxes = [(top, 0), (top, left), (top, w - size)]
    else:
        boxes = [(0, left), (top, left), (h - size, left)]
    return [x[..., t:t + size, l:l + size].contiguous() for t, l in boxes]
