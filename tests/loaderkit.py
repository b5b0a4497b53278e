"""Shared by the loader tests (local, HTTP, S3): small H.264 clips, sharding them, exact batch comparison."""

from __future__ import annotations

import numpy as np
import torch


def same(a, b) -> None:
    """Assert two batches (dicts of tensors, nested dicts, lists) are equal, naming the key that differs."""
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        elif isinstance(a[k], dict):
            same(a[k], b[k])
        elif isinstance(a[k], list) and a[k] and isinstance(a[k][0], torch.Tensor):  # rows of native sizes
            assert len(a[k]) == len(b[k]) and all(torch.equal(x, y) for x, y in zip(a[k], b[k])), k
        else:
            assert a[k] == b[k], k


def write_video(path, n, seed, w=64, h=48, fps=25):
    """A small H.264 clip whose frames all differ (moving noise + a frame-counter bar)."""
    import av

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"g": "30", "bf": "2"}  # long GOP + B-frames in the source; the sharder re-encodes
        for t in range(n):
            f = np.roll(base, 3 * t, axis=1).copy()
            f[:4, : (t % w)] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def shard_videos(src_paths, out, labels=None, shard_samples=3, **kw):
    """``vidssl shard`` of ``src_paths`` (through a manifest with ``labels``) into ``out``."""
    from vidssl.shard import ShardConfig, run_shard

    manifest = out.parent / (out.name + "-manifest.csv")
    rows = ["path,label"] + [f"{p},{labels[i] if labels else ''}" for i, p in enumerate(src_paths)]
    manifest.write_text("\n".join(rows) + "\n")
    run_shard(ShardConfig(sources=[str(manifest)], output=str(out), shard_samples=shard_samples,
                          short_side=kw.pop("short_side", 48), gop=kw.pop("gop", 8), workers=1, **kw))
    return out


def labelled_dataset(root, count, frames, classes, **kw):
    """``count`` clips (clip ``i`` has ``frames(i)`` frames, seed ``i``, label ``classes[i % len]``)
    written under ``root`` and sharded into ``root / "ds"`` (``kw`` as for :func:`shard_videos`)."""
    paths = []
    for i in range(count):
        p = root / f"clip{i:02d}.mp4"
        write_video(p, frames(i), seed=i)
        paths.append(p)
    return shard_videos(paths, root / "ds", labels=[classes[i % len(classes)] for i in range(count)], **kw)
