"""Schedules as pure functions of the optimizer step (nanoGPT's ``get_lr(it)``).

Nothing here holds state, so a resumed run computes exactly the values the uninterrupted run
would have: the loop writes ``lr_at(step)`` and ``weight_decay_at(step)`` into the optimizer's
parameter groups before every step, and the task reads ``ema_momentum_at(step)`` after it.
``step`` counts finished optimizer steps: the first update uses ``step = 0``.
"""

from __future__ import annotations

import math

__all__ = ["lr_at", "weight_decay_at", "ema_momentum_at", "cosine"]


def cosine(start: float, end: float, progress: float) -> float:
    """Half-cosine from ``start`` (progress 0) to ``end`` (progress 1); progress is clamped to [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * p))


def lr_at(step: int, cfg) -> float:
    """Learning rate of update ``step`` for a :class:`~vidssl.train.config.TrainConfig`-like ``cfg``.

    Linear warmup ``lr * (step + 1) / warmup_steps`` (never 0, so the first step moves), then
    cosine from ``lr`` to ``min_lr`` at ``max_steps`` (or constant ``lr``).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    return cosine(cfg.lr, cfg.min_lr, (step - cfg.warmup_steps) / span)


def weight_decay_at(step: int, cfg) -> float:
    """Weight decay of update ``step``: constant, or cosine to ``weight_decay_end`` at ``max_steps``."""
    if cfg.weight_decay_end is None:
        return cfg.weight_decay
    return cosine(cfg.weight_decay, cfg.weight_decay_end, step / max(1, cfg.max_steps))


def ema_momentum_at(step: int, start: float, end: float | None, max_steps: int) -> float:
    """EMA momentum after update ``step``: constant ``start``, or cosine-increasing to ``end`` (BYOL/DINO)."""
    if end is None:
        return start
    return end - (end - start) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, max_steps))))
