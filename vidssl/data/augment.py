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

__all__ = ["train_params", "apply_train", "apply_train_many", "eval_views", "TrainParams"]


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
    return apply_train_many([x], [p], size)[0]


def apply_train_many(clips: list[torch.Tensor], params: list[TrainParams], size: int) -> list[torch.Tensor]:
    """Clips ``(T_i, C, H_i, W_i)`` uint8, each with its own parameters → ``(T_i, C, size, size)`` uint8.

    The one implementation of the train augmentation, on whatever device the clips are (CPU in the
    loader's workers, the GPU after NVDEC decoding). Crop + resize run per clip (each has its own box);
    flip, channel order, colour jitter and grayscale run batched over every clip of the same length
    with per-clip factors, in per-clip op order (clips are grouped by it), so a batch costs a few
    kernel launches per op instead of a few per clip. Per clip, the result equals applying the ops to
    that clip alone.
    """
    import torchvision.transforms.v2.functional as F  # noqa: PLC0415

    out: list[torch.Tensor | None] = [None] * len(clips)
    cropped = []
    for x, p in zip(clips, params):
        top, left, h, w = p.box
        x = F.resized_crop(x, top, left, h, w, [size, size], antialias=True)
        if p.flip:
            x = x.flip(-1)
        if p.perm is not None and x.shape[-3] == 3:
            x = x[..., list(p.perm), :, :]
        cropped.append(x)
    # Group by what the colour chain does (op order, grayscale) and by clip shape, so each group is
    # one stacked tensor (N, T, C, size, size).
    groups: dict[tuple, list[int]] = {}
    for i, (x, p) in enumerate(zip(cropped, params)):
        groups.setdefault((tuple(n for n, _ in p.jitter), p.gray, tuple(x.shape)), []).append(i)
    for (names, gray, _shape), idx in groups.items():
        if not names and not gray:
            for i in idx:
                out[i] = cropped[i].contiguous()
            continue
        xs = cropped[idx[0]].unsqueeze(0) if len(idx) == 1 else torch.stack([cropped[i] for i in idx])
        factors = [[params[i].jitter[k][1] for i in idx] for k in range(len(names))]
        res = _colour_batch(xs, names, factors, gray)
        for j, i in enumerate(idx):
            out[i] = res[j]
    return out  # type: ignore[return-value]


# torchvision's luma weights (rgb_to_grayscale), so the result matches its colour jitter.
_LUMA = (0.2989, 0.587, 0.114)


def _luma(y: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) float → (..., 1, H, W) float, not rounded."""
    r, g, b = y.unbind(-3)
    return (r * _LUMA[0]).add_(g, alpha=_LUMA[1]).add_(b, alpha=_LUMA[2]).unsqueeze(-3)


def _colour(x: torch.Tensor, jitter: list, gray: bool) -> torch.Tensor:
    """:func:`_colour_batch` of one clip (T, C, h, w) with its ``jitter`` list of (name, factor)."""
    if not jitter and not gray:
        return x.contiguous()
    return _colour_batch(x.unsqueeze(0), tuple(n for n, _ in jitter), [[f] for _, f in jitter], gray)[0]


def _colour_batch(x: torch.Tensor, names: tuple, factors: list[list[float]], gray: bool) -> torch.Tensor:
    """Colour jitter (ops ``names`` in this order, ``factors[k][n]`` for clip n) then grayscale on
    cropped uint8 clips (N, T, C, h, w).

    Same formulas as torchvision's adjust_brightness/contrast/saturation and rgb_to_grayscale
    (blend with black, the per-frame mean luma, the per-pixel luma; clamp to [0, 255] after each
    op), but fused: one conversion to float32 and one rounding back to uint8 for the whole chain,
    instead of a float round trip and several temporaries per op (this chain was ~3/4 of the
    train-augmented loader's time). Results differ from torchvision's by at most a few levels
    (torchvision truncates to uint8 after every op)."""
    y = x.float()  # (N, T, C, h, w) in [0, 255]
    shape = (-1,) + (1,) * (y.dim() - 1)
    for name, fs in zip(names, factors):
        if name == "hue":  # rotation in HSV space, rare (hue=0 by default): torchvision on uint8, per clip
            import torchvision.transforms.v2.functional as F  # noqa: PLC0415

            y = torch.stack([F.adjust_hue(c.round().to(torch.uint8), f).float() for c, f in zip(y, fs)])
            continue
        f = torch.tensor(fs, dtype=y.dtype, device=y.device).view(shape)  # (N, 1, 1, 1, 1)
        if name == "brightness":
            y.mul_(f)
        elif name == "contrast":
            mean = _luma(y).mean(dim=(-3, -2, -1), keepdim=True)  # (N, T, 1, 1, 1): per-frame mean luma
            y.mul_(f).add_(mean * (1.0 - f))
        else:  # saturation
            luma = _luma(y)  # (N, T, 1, h, w), taken before y is scaled in place
            y.mul_(f).add_(luma * (1.0 - f))
        y.clamp_(0.0, 255.0)
    if gray:  # the same luma in every channel: (N, T, 1, h, w) → (N, T, 3, h, w)
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
