"""Moving Digits: real handwritten digits moving on a canvas, written as labelled H.264 videos.

Each video shows one *main* digit (appearance class: 0-9, a real 8x8 scan from scikit-learn's
``load_digits``, upscaled with a cubic spline) performing one *motion* (the action class, see
:data:`MOTIONS`). Motions are defined by dynamics, so no single frame reveals the class:

* ``left``/``right``/``up``/``down``: constant speed along one axis, wrapping at the border
  (the canvas is a torus; the digit re-enters on the opposite side);
* ``bounce``: constant speed along a diagonal, reflecting at the borders;
* ``rotate_cw``/``rotate_ccw``: spinning in place (clockwise as seen on screen, y pointing down);
* ``zoom_in``/``zoom_out``: growing from 0.5x to 1.5x its size over the video, or shrinking.

Optional *distractor* digits (smaller, dimmer, drawn behind the main digit) move with a motion
drawn independently of the class; optional background noise. Videos vary in size, frame rate,
length and GOP (each drawn from the configured choices).

Every video is a pure function of ``(seed, index)`` and the config, so the output does not
depend on the number of worker processes, and the same config writes byte-identical files
(x264 runs single-threaded; the muxer is asked for bit-exact output).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass as _plain_dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Sequence

from vidssl.config import Config, ConfigError, dataclass, field, spec
from vidssl.errors import UserError
from vidssl.footage.outdir import PART, VIDEOS, prepare_outdir, write_labels

log = logging.getLogger("vidssl.footage")

#: The motion (action) classes, in canonical order.
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "bounce",
                            "rotate_cw", "rotate_ccw", "zoom_in", "zoom_out")
TRANSLATIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # unit (dx, dy), y down

X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower",
                "veryslow")

#: Columns of labels.csv, in order.
LABEL_COLUMNS = ("path", "label", "motion", "digit", "frames", "fps", "width", "height", "gop",
                 "seconds", "distractors", "index")

_SPRITE_UP = 4          # 8x8 scan (+1 px zero border) → 40x40 sprite
_ZOOM_RANGE = (0.5, 1.5)  # zoom_in: size factor from 0.5 to 1.5 over the video
_DISTRACTOR_SCALE = 0.6   # distractors are this much smaller than the main digit ...
_DISTRACTOR_ALPHA = 0.6   # ... and this opaque, so the main digit stays identifiable
_MAX_TILT = math.radians(15)  # fixed random tilt of non-rotating digits


def _parse_size(text: str) -> tuple[int, int] | None:
    parts = text.lower().split("x")
    if len(parts) != 2:
        return None
    try:
        w, h = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return w, h


@dataclass(kw_only=True)
class DigitsConfig(Config):
    """Settings of ``vidssl footage digits`` (see ``configs/footage/digits.yaml``)."""

    videos: int = field(default=100, metadata=spec(ge=1, le=10_000_000, help="number of videos to write"))
    seed: int = field(default=0, metadata=spec(ge=0, help="random seed; video i depends only on (seed, i)"))
    workers: int = field(default=0, metadata=spec(ge=0, le=1024, help="processes (0 = all cores)"))
    sizes: list[str] = field(default_factory=lambda: ["64x64", "80x64", "64x48"],
                             metadata=spec(help="frame sizes WxH to draw from (even numbers, 16..1024)"))
    fps: list[int] = field(default_factory=lambda: [12, 20, 25, 30],
                           metadata=spec(ge=1, le=120, help="frame rates to draw from"))
    seconds: tuple[float, float] = field(default=(2.0, 4.0),
                                         metadata=spec(gt=0, le=600, help="duration range [min, max] in seconds"))
    gops: list[int] = field(default_factory=lambda: [8, 16, 32],
                            metadata=spec(ge=1, le=1000, help="keyframe intervals (fixed GOP) to draw from"))
    digit_scale: tuple[float, float] = field(default=(0.35, 0.5), metadata=spec(
        gt=0, le=0.9, help="digit box side as a fraction of the shorter frame side, range [min, max]"))
    speed: tuple[float, float] = field(default=(0.25, 0.5), metadata=spec(
        gt=0, le=5, help="travel speed range in frame widths (or heights) per second"))
    spin: tuple[float, float] = field(default=(90.0, 180.0), metadata=spec(
        gt=0, le=1440, help="rotation speed range in degrees per second"))
    distractors: int = field(default=0, metadata=spec(
        ge=0, le=8, help="distractor digits per video (smaller, dimmer, motion unrelated to the class)"))
    noise: float = field(default=0.0, metadata=spec(ge=0, le=0.5, help="background noise std (intensity 0..1)"))
    motions: list[str] = field(default_factory=lambda: list(MOTIONS),
                               metadata=spec(choices=MOTIONS, help="motion classes to use"))
    crf: int = field(default=23, metadata=spec(ge=0, le=51, help="x264 constant rate factor (quality)"))
    preset: str = field(default="veryfast", metadata=spec(choices=X264_PRESETS, help="x264 speed preset"))

    def validate(self) -> None:
        for name in ("sizes", "fps", "gops", "motions"):
            if not getattr(self, name):
                raise ConfigError(self._key(name) + ": got an empty list; give at least one value")
        for i, s in enumerate(self.sizes):
            wh = _parse_size(s)
            if wh is None or not all(16 <= v <= 1024 and v % 2 == 0 for v in wh):
                raise ConfigError(f"{self._key('sizes')}[{i}]: got {s!r}; allowed: WIDTHxHEIGHT with even "
                                  f"numbers from 16 to 1024, for example '64x64'")
        dupes = sorted({m for m in self.motions if self.motions.count(m) > 1})
        if dupes:
            raise ConfigError(self._key("motions") + f": got {dupes[0]!r} more than once; list each motion once")
        for name in ("seconds", "digit_scale", "speed", "spin"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ConfigError(self._key(name) + f": got [{lo}, {hi}]; expected [min, max] with min <= max")

    def frame_sizes(self) -> list[tuple[int, int]]:
        """``sizes`` as (width, height) pairs."""
        return [_parse_size(s) for s in self.sizes]  # type: ignore[misc]


# ---- planning: everything about video i, from (config, seed, i) only ---------------------------

@_plain_dataclass(frozen=True)
class VideoPlan:
    """What video ``index`` will be: label, geometry, timing, encoder settings."""

    index: int
    motion: str
    digit: int
    width: int
    height: int
    fps: int
    frames: int
    gop: int

    @property
    def name(self) -> str:
        return f"{self.index:06d}.mp4"

    @property
    def path(self) -> str:
        return f"{VIDEOS}/{self.name}"


def _rng(seed: int, stream: int, index: int):
    import numpy as np

    # Independent streams per (seed, purpose, index): no draw depends on another video.
    return np.random.default_rng([seed, stream, index])


def plan_video(cfg: DigitsConfig, index: int):
    """(plan, rng) for video ``index``; the rng continues into rendering (same draws every time)."""
    m = len(cfg.motions)
    # Balanced classes: each block of len(motions) consecutive videos holds every motion once,
    # in a seeded order (so any prefix of the dataset is close to balanced).
    block_perm = _rng(cfg.seed, 0, index // m).permutation(m)
    motion = cfg.motions[int(block_perm[index % m])]
    rng = _rng(cfg.seed, 1, index)
    w, h = cfg.frame_sizes()[int(rng.integers(len(cfg.sizes)))]
    fps = int(cfg.fps[int(rng.integers(len(cfg.fps)))])
    gop = int(cfg.gops[int(rng.integers(len(cfg.gops)))])
    seconds = float(rng.uniform(*cfg.seconds))
    frames = max(2, int(round(seconds * fps)))
    digit = int(rng.integers(10))
    return VideoPlan(index=index, motion=motion, digit=digit, width=w, height=h, fps=fps,
                     frames=frames, gop=gop), rng


# ---- rendering ---------------------------------------------------------------------------------

def make_sprite(image8):
    """(8, 8) scan with values 0..16 → (40, 40) float32 alpha in [0, 1], cubic-spline smoothed."""
    import numpy as np
    from scipy.ndimage import zoom

    a = np.pad(np.asarray(image8, dtype=np.float32).reshape(8, 8) / 16.0, 1)  # (10, 10), zero border
    s = zoom(a, _SPRITE_UP, order=3, mode="grid-constant", grid_mode=True)  # (40, 40)
    return np.clip(s, 0.0, 1.0).astype(np.float32)


def _trajectory(motion: str, rng, cfg: DigitsConfig, w: int, h: int, t: int, fps: int, size0: float):
    """Per-frame centre x, y, angle (radians, + = clockwise on screen) and box size, each (T,); wrap flag."""
    import numpy as np

    tau = np.arange(t, dtype=np.float64) / fps  # (T,) seconds
    size = np.full(t, size0)
    theta = np.full(t, rng.uniform(-_MAX_TILT, _MAX_TILT))
    r = size0 / 2
    if motion in TRANSLATIONS:
        ux, uy = TRANSLATIONS[motion]
        v = rng.uniform(*cfg.speed) * (w if ux else h)  # px/s along the axis
        cx = rng.uniform(0, w) + ux * v * tau
        cy = rng.uniform(0, h) + uy * v * tau
        return cx % w, cy % h, theta, size, True
    if motion == "bounce":
        v = rng.uniform(*cfg.speed) * min(w, h)
        ang = math.radians(45 + rng.uniform(-15, 15)) + (math.pi / 2) * int(rng.integers(4))  # a diagonal
        out = []
        for extent, vel in ((w, v * math.cos(ang)), (h, v * math.sin(ang))):
            span = max(extent - 2 * r, 1e-6)  # centre moves within [r, extent - r]
            x = rng.uniform(0, span) + vel * tau
            x = np.mod(x, 2 * span)
            out.append(r + np.where(x <= span, x, 2 * span - x))  # triangle wave = reflection
        return out[0], out[1], theta, size, False
    cx = np.full(t, rng.uniform(r, max(w - r, r)))
    cy = np.full(t, rng.uniform(r, max(h - r, r)))
    if motion in ("rotate_cw", "rotate_ccw"):
        omega = math.radians(rng.uniform(*cfg.spin)) * (1 if motion == "rotate_cw" else -1)
        theta = rng.uniform(0, 2 * math.pi) + omega * tau
        return cx, cy, theta, size, False
    if motion in ("zoom_in", "zoom_out"):
        a, b = _ZOOM_RANGE if motion == "zoom_in" else _ZOOM_RANGE[::-1]
        size = size0 * np.linspace(a, b, t)
        cx = np.full(t, w / 2 + rng.uniform(-w, w) / 8)
        cy = np.full(t, h / 2 + rng.uniform(-h, h) / 8)
        return cx, cy, theta, size, False
    raise ValueError(f"unknown motion {motion!r}")  # unreachable: validated by DigitsConfig


def _alpha_layer(sprite, h: int, w: int, cx, cy, theta, size, wrap: bool):
    """Coverage of ``sprite`` on an (H, W) canvas per frame: (T, H, W) float32 in [0, 1].

    Each frame samples only a window around the digit (bilinear, ``scipy.ndimage.affine_transform``)
    and pastes it into the layer: ~40x40 px per frame instead of the whole canvas.
    """
    import numpy as np
    from scipy.ndimage import affine_transform

    t = len(cx)
    s = sprite.shape[0]
    layer = np.zeros((t, h, w), dtype=np.float32)
    for i in range(t):
        k = s / size[i]  # sprite px per canvas px
        b = int(math.ceil(size[i] * math.sqrt(2))) + 2  # window side: the rotated box fits
        x0 = int(math.floor(cx[i] - b / 2))
        y0 = int(math.floor(cy[i] - b / 2))
        ox, oy = x0 + 0.5 - cx[i], y0 + 0.5 - cy[i]  # window pixel (0, 0) centre relative to the digit centre
        c, sn = math.cos(theta[i]), math.sin(theta[i])
        # Window pixel (row r, col q) is at offset d = (q + ox, r + oy) from the centre; the sprite
        # rotated by theta (clockwise on screen, y down) and scaled by 1/k shows there the sprite
        # sample at R(-theta) d * k, i.e. (row, col) = matrix @ (r, q) + offset.
        matrix = np.array([[k * c, -k * sn], [k * sn, k * c]])
        offset = (k * (-sn * ox + c * oy) + s / 2 - 0.5, k * (c * ox + sn * oy) + s / 2 - 0.5)
        win = affine_transform(sprite, matrix, offset=offset, output_shape=(b, b), order=1,
                               mode="constant", cval=0.0)  # (b, b)
        rows = np.arange(y0, y0 + b)
        cols = np.arange(x0, x0 + b)
        if wrap:  # torus: indices modulo the frame size
            rows %= h
            cols %= w
            if b > h or b > w:  # window larger than the frame: copies overlap, accumulate
                np.add.at(layer[i], (rows[:, None], cols[None, :]), win)
                continue
            layer[i][np.ix_(rows, cols)] = win
        else:
            rk = (rows >= 0) & (rows < h)
            ck = (cols >= 0) & (cols < w)
            layer[i][np.ix_(rows[rk], cols[ck])] = win[np.ix_(rk, ck)]
    return np.minimum(layer, 1.0, out=layer)


def _draw(canvas, sprite, color, alpha: float, cx, cy, theta, size, wrap: bool) -> None:
    """Alpha-composite ``sprite`` in ``color`` onto ``canvas`` (T, H, W, 3) float32 in place."""
    import numpy as np

    _, h, w, _ = canvas.shape
    a = _alpha_layer(sprite, h, w, cx, cy, theta, size, wrap)[..., None]  # (T, H, W, 1)
    if alpha != 1.0:
        a *= alpha
    canvas *= 1 - a
    canvas += a * np.asarray(color, dtype=np.float32)


def render_video(cfg: DigitsConfig, index: int, images, targets):
    """(plan, frames) for video ``index``: frames are (T, H, W, 3) float32 RGB in [0, 1]."""
    import numpy as np

    plan, rng = plan_video(cfg, index)
    w, h, t = plan.width, plan.height, plan.frames
    background = rng.uniform(0.0, 0.25, size=3).astype(np.float32)
    canvas = np.empty((t, h, w, 3), dtype=np.float32)
    canvas[:] = background
    size0 = float(rng.uniform(*cfg.digit_scale)) * min(w, h)
    by_class = [np.flatnonzero(targets == d) for d in range(10)]
    # Distractors first (behind), each with a motion drawn independently of the class.
    for _ in range(cfg.distractors):
        img = images[int(rng.choice(len(images)))]
        motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
        color = rng.uniform(0.5, 1.0, size=3)
        traj = _trajectory(motion, rng, cfg, w, h, t, plan.fps, size0 * _DISTRACTOR_SCALE)
        _draw(canvas, make_sprite(img), color, _DISTRACTOR_ALPHA, *traj)
    img = images[int(rng.choice(by_class[plan.digit]))]
    color = rng.uniform(0.6, 1.0, size=3)
    _draw(canvas, make_sprite(img), color, 1.0, *_trajectory(plan.motion, rng, cfg, w, h, t, plan.fps, size0))
    if cfg.noise > 0:
        # Luminance noise, independent per pixel and frame: (T, H, W, 1).
        canvas += rng.normal(0.0, cfg.noise, size=(t, h, w, 1)).astype(np.float32)
    np.clip(canvas, 0.0, 1.0, out=canvas)
    return plan, canvas


def rgb_to_yuv420p(rgb):
    """(T, H, W, 3) float RGB in [0, 1] → (T, H*3/2, W) uint8 planar BT.601 limited-range yuv420p.

    Layout per frame is what ``av.VideoFrame.from_ndarray(..., format="yuv420p")`` expects:
    the Y plane (H*W bytes), then U and V (H/2 * W/2 bytes each), flattened.
    """
    import numpy as np

    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    t, h, w = r.shape
    y = 16 + 219 * (0.299 * r + 0.587 * g + 0.114 * b)
    u = 128 + 224 * (-0.168736 * r - 0.331264 * g + 0.5 * b)
    v = 128 + 224 * (0.5 * r - 0.418688 * g - 0.081312 * b)

    def sub(p):  # 2x2 mean: (T, H, W) → (T, H/2 * W/2)
        return p.reshape(t, h // 2, 2, w // 2, 2).mean(axis=(2, 4)).reshape(t, -1)

    planes = np.concatenate([y.reshape(t, -1), sub(u), sub(v)], axis=1)  # (T, H*W*3/2)
    return np.clip(np.rint(planes), 0, 255).astype(np.uint8).reshape(t, h * 3 // 2, w)


def encode_mp4(path: Path, yuv, fps: int, gop: int, crf: int, preset: str) -> None:
    """Encode (T, H*3/2, W) yuv420p frames to H.264 mp4 at ``path`` (deterministic, one thread).

    ``mbtree=0``: with x264's macroblock-tree rate control on (the default) and B-frames, the
    libx264 bundled with PyAV 18.1 gave different bitstreams for the same frames from run to run
    (its assembly reads memory it did not write; ``asm=0``, ``bframes=0`` or ``mbtree=0`` each
    made it byte-identical). Dropping mbtree costs a little compression and keeps B-frames,
    which later stages should meet.
    """
    import av

    t, h32, w = yuv.shape
    h = h32 * 2 // 3
    tb = Fraction(1, fps)
    # +bitexact: no encoder version strings or other varying metadata in the container.
    with av.open(str(path), mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(fps, 1))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.codec_context.time_base = tb
        stream.codec_context.thread_count = 1  # x264 threads=1: output must not depend on scheduling
        stream.options = {
            "crf": str(crf),
            "preset": preset,
            # Fixed GOP: a keyframe exactly every `gop` frames, no scene-cut keyframes.
            "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:threads=1:lookahead-threads=1:mbtree=0",
        }
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(yuv[i], format="yuv420p")
            frame.pts = i
            frame.time_base = tb
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


# ---- the parallel driver -----------------------------------------------------------------------

_DIGITS: tuple[Any, Any] | None = None  # (images (N, 8, 8), targets (N,)) in each worker


def load_digit_scans():
    """scikit-learn's handwritten digits: images (1797, 8, 8) float64 0..16, targets (1797,) int."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("Moving Digits needs scikit-learn (its bundled handwritten digits); "
                        "install it with: pip install 'vidssl[demo]' (or pip install scikit-learn)") from None
    d = load_digits()
    return d.images, d.target


def _init_worker(images, targets) -> None:
    global _DIGITS
    _DIGITS = (images, targets)
    try:  # PyAV's logging bridge can deadlock with threads; keep it off in workers too
        import av.logging

        av.logging.set_level(None)
    except Exception:  # pragma: no cover
        pass


def _make_one(job: tuple[dict, int, str]) -> dict:
    """Render and encode one video (runs in a worker); returns its labels.csv row."""
    cfg_dict, index, outdir = job
    cfg = DigitsConfig.from_dict(cfg_dict)
    images, targets = _DIGITS  # type: ignore[misc]
    plan, rgb = render_video(cfg, index, images, targets)
    final = Path(outdir) / plan.path
    tmp = final.with_name(final.name + PART)
    try:
        encode_mp4(tmp, rgb_to_yuv420p(rgb), plan.fps, plan.gop, cfg.crf, cfg.preset)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return {"path": plan.path, "label": plan.motion, "motion": plan.motion, "digit": plan.digit,
            "frames": plan.frames, "fps": plan.fps, "width": plan.width, "height": plan.height,
            "gop": plan.gop, "seconds": f"{plan.frames / plan.fps:.6g}", "distractors": cfg.distractors,
            "index": plan.index}


def resolve_workers(workers: int, videos: int) -> int:
    """0 → all usable cores; never more processes than videos."""
    if workers == 0:
        try:
            workers = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            workers = os.cpu_count() or 1
    return max(1, min(workers, videos))


def generate_digits(cfg: DigitsConfig, outdir: str | Path, *, force: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``cfg.videos`` Moving Digits videos to ``outdir/videos/`` and ``outdir/labels.csv``.

    ``outdir`` follows the policy of :func:`vidssl.footage.outdir.prepare_outdir` (``force``
    allows a non-empty folder that is not a previous footage output). Work is spread over
    ``cfg.workers`` processes (0 = all cores); output is identical for any worker count.
    ``progress(done, total)`` is called as videos complete. Returns ``outdir`` as a Path.

    Workers are started with ``spawn`` (never ``fork``: unsafe once torch or other threaded
    libraries are loaded), so a script calling this with ``workers != 1`` needs the usual
    ``if __name__ == "__main__":`` guard. Needs scikit-learn (``vidssl[demo]``) and scipy.
    """
    images, targets = load_digit_scans()
    # `workers` is left out of the marker: it does not change the output, and the marker's bytes must not either.
    settings = {k: v for k, v in cfg.to_dict().items() if k != "workers"}
    names = (f"{VIDEOS}/{i:06d}.mp4" for i in range(cfg.videos))  # VideoPlan.path of every video
    out = prepare_outdir(outdir, kind="digits", settings=settings, force=force, files=names)
    # Workers get the config as plain data (picklable, re-validated there) and write to `out`.
    jobs = [(cfg.to_dict(), i, str(out)) for i in range(cfg.videos)]
    workers = resolve_workers(cfg.workers, cfg.videos)
    rows: list[dict] = []
    if workers == 1:
        _init_worker(images, targets)
        for job in jobs:
            rows.append(_make_one(job))
            if progress:
                progress(len(rows), cfg.videos)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn: workers never inherit the parent's threads or CUDA/torch state (fork is unsafe there).
        chunk = max(1, min(16, cfg.videos // (workers * 8)))
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(images, targets)) as pool:
            for row in pool.map(_make_one, jobs, chunksize=chunk):
                rows.append(row)
                if progress:
                    progress(len(rows), cfg.videos)
    rows.sort(key=lambda r: r["index"])
    write_labels(out, LABEL_COLUMNS, rows)  # last: its presence means the output is complete
    return out


def generate_digits_logged(cfg: DigitsConfig, outdir: str | Path, *, force: bool = False,
                           every_s: float = 2.0) -> tuple[Path, float]:
    """:func:`generate_digits` with progress log lines every ``every_s`` seconds; returns (outdir, seconds)."""
    t0 = time.perf_counter()
    last = [t0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if now - last[0] >= every_s and done < total:
            last[0] = now
            log.info("digits: %d/%d videos (%.1f videos/s)", done, total, done / (now - t0))

    out = generate_digits(cfg, outdir, force=force, progress=progress)
    return out, time.perf_counter() - t0


def label_counts(rows: Sequence[dict], column: str = "label") -> dict[str, int]:
    """How many rows per value of ``column`` (for summaries)."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[str(r[column])] = counts.get(str(r[column]), 0) + 1
    return counts
