"""Frame-index plans from a sample's metadata (frame count), never by scanning the video.

Windows are lists of source frame numbers (0-based, presentation order):

- ``ssl``: ``context`` = T frames at stride s from t0; ``future`` = the F frames that follow at the
  same stride; ``other`` = T frames at stride s starting ``gap`` frames before or after t0, with
  gap_min <= gap <= gap_max.
- ``clip``: ``video`` = one random window of T frames.
- ``views``: ``video`` = K windows of T frames with evenly spaced starts (flattened, window-major).

Videos too short for a plan follow ``short``: ``loop`` wraps indices modulo the frame count,
``pad`` repeats the last frame, ``skip`` raises :class:`ShortVideo` (the sample is counted).
"""

from __future__ import annotations

import random

__all__ = ["ShortVideo", "plan_clip", "sample_rng"]


class ShortVideo(Exception):
    """The video has fewer frames than the plan needs and the policy is ``skip``."""


def sample_rng(seed: int, epoch: int, dataset: int, key: str, purpose: str) -> random.Random:
    """Randomness of one sample: a function of (seed, epoch, dataset, key) only, so it does not
    depend on which worker or rank reads the sample, nor on a resume."""
    return random.Random(f"vidssl:{purpose}:{seed}:{epoch}:{dataset}:{key}")


def _fit(idx: list[int], n: int, policy: str) -> list[int]:
    if all(0 <= i < n for i in idx):
        return idx
    if policy == "loop":
        return [i % n for i in idx]
    if policy == "pad":
        return [min(max(i, 0), n - 1) for i in idx]
    raise ShortVideo(f"{n} frames; the plan needs {max(idx) + 1}")


def plan_clip(n: int, *, mode: str, frames: int, stride: int, future: int = 0, gap_min: int = 0,
              gap_max: int = 0, views: int = 1, short: str = "loop",
              rng: random.Random | None = None) -> tuple[dict[str, list[int]], bool]:
    """Return ({window name: source frame numbers}, short) for a video of ``n`` frames.

    ``short`` is True when the video was too short and the policy changed the indices.
    """
    if n < 1:
        raise ShortVideo("the video has no frames")
    rng = rng or random.Random(0)
    s = stride
    span = (frames - 1) * s + 1                        # one window of T frames
    if mode == "clip":
        if n >= span:
            t0 = rng.randint(0, n - span)
            return {"video": [t0 + i * s for i in range(frames)]}, False
        return {"video": _fit([i * s for i in range(frames)], n, short)}, True
    if mode == "views":
        starts = ([round(v * (n - span) / (views - 1)) for v in range(views)] if views > 1 else [(n - span) // 2]) \
            if n >= span else [0] * views
        idx = [t + i * s for t in starts for i in range(frames)]
        return {"video": _fit(idx, n, short)}, n < span
    if mode != "ssl":
        raise ValueError(f"mode {mode!r}")
    span_cf = (frames + future - 1) * s + 1            # context followed by future
    # Feasible when the context+future block fits and the other window fits gap_min later.
    if n >= span_cf and gap_min <= n - span:
        gap = rng.randint(gap_min, min(gap_max, n - span))
        # After t0 always fits (gap <= n - span); before t0 only when gap <= n - span_cf.
        sign = rng.choice((1, -1)) if gap <= n - span_cf else 1
        if sign > 0:
            t0 = rng.randint(0, min(n - span_cf, n - gap - span))
        else:
            t0 = rng.randint(gap, n - span_cf)
        t1 = t0 + sign * gap
        short_video = False
    else:
        t0, t1, short_video = 0, gap_min, True
    ctx = [t0 + i * s for i in range(frames)]
    fut = [t0 + (frames + i) * s for i in range(future)]
    oth = [t1 + i * s for i in range(frames)]
    return {"context": _fit(ctx, n, short), "future": _fit(fut, n, short), "other": _fit(oth, n, short)}, short_video
