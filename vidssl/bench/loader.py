"""``vidssl bench loader``: the streaming loader against two baselines timed in the same run.

1. clips/s of ``build_loader`` (clip mode, augment none) vs PyAV decoding the SAME frames of the
   SAME samples in a tight loop (bytes already in memory, one process per worker, same cores).
   Target: ratio >= 0.85.
2. clips/s of ``build_loader`` (clip mode) vs a VideoMAE-style loader: a torch DataLoader whose
   dataset opens each ORIGINAL file with decord.VideoReader and takes one random clip per video.
   Target: ratio >= 2.
3. peak resident memory (main + workers) reading the same number of batches from a 10-shard and
   a 1000-shard dataset. Target: within 10%.

Footage: synthetic camera-like clips (long GOP sources), sharded with ``vidssl shard`` settings
(short side, short fixed GOP). Each measurement is repeated ``--repeats`` times; medians reported.
"""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


def register(sub) -> None:
    from vidssl.cli import add_command  # noqa: PLC0415

    p = add_command(sub, "loader", help="loader clips/s vs PyAV tight loop and a VideoMAE-style loader; memory")
    p.add_argument("--videos", type=int, default=24, help="source videos to generate (default 24)")
    p.add_argument("--seconds", type=float, default=6.0, help="length of each source video (default 6)")
    p.add_argument("--size", default="320x240", help="source WxH (default 320x240)")
    p.add_argument("--short-side", type=int, default=128, help="shard short side (default 128)")
    p.add_argument("--frames", type=int, default=16, help="frames per clip (default 16)")
    p.add_argument("--stride", type=int, default=2, help="frame stride (default 2)")
    p.add_argument("--workers", type=int, default=2, help="loader workers (default 2 = this machine's cores)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (median reported)")
    p.add_argument("--memory-batches", type=int, default=60, help="batches read for the memory test")
    p.add_argument("--skip-memory", action="store_true", help="skip the 10 vs 1000 shard memory test")
    p.add_argument("--dir", default=None, help="work folder (default: a temporary folder)")
    p.set_defaults(func=run)


def _make_sources(out, n, seconds, w, h):
    import av  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    paths = []
    fps = 25
    for i in range(n):
        path = out / f"cam{i:03d}.mp4"
        paths.append(path)
        if path.exists():
            continue
        rng = np.random.default_rng(i)
        base = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        with av.open(str(path), "w") as c:
            s = c.add_stream("libx264", rate=fps)
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            s.options = {"preset": "veryfast", "g": "250"}  # camera-like: long GOP, B-frames (x264 default)
            for t in range(int(seconds * fps)):
                f = np.roll(base, 2 * t, axis=1)
                for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
    return paths


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def _loader_rate(cfg):
    """Clips/s over one epoch, timed from the first batch (worker start-up excluded), plus the
    (key, frame numbers) of every clip for the tight-loop baseline."""
    import time  # noqa: PLC0415

    from vidssl.data import build_loader  # noqa: PLC0415

    loader = build_loader(cfg, rank=0, world_size=1)
    it = iter(loader)
    first = next(it)
    t0 = time.perf_counter()
    n = 0
    work = []
    for b in it:
        n += len(b["key"])
        work.extend(zip(b["key"], b["frame_indices"]["video"].tolist()))
    return n / (time.perf_counter() - t0), work


def _tight_worker(args):
    import time  # noqa: PLC0415

    from vidssl.data.decode import PyAVDecoder  # noqa: PLC0415

    items = args
    dec = PyAVDecoder(1)
    t0 = time.perf_counter()
    for data, meta, idx in items:
        dec.decode(data, idx, meta)
    return time.perf_counter() - t0


def _tight_rate(ds, work, procs):
    """PyAV decoding exactly the loader's (sample, frames) list, bytes in memory, ``procs`` processes."""
    import multiprocessing as mp  # noqa: PLC0415
    import time  # noqa: PLC0415

    from vidssl.data.index import open_index  # noqa: PLC0415
    from vidssl.data.stream import Sample, read_segment  # noqa: PLC0415

    samples = {}
    for _name, url, n in open_index(str(ds)).shards:
        for _o, item in read_segment(url, 0, n):
            if isinstance(item, Sample):
                samples[item.key] = item
    items = [(samples[k].data, samples[k].meta, idx) for k, idx in work]
    chunks = [items[i::procs] for i in range(procs)]
    with mp.get_context("fork").Pool(procs) as pool:
        t0 = time.perf_counter()
        pool.map(_tight_worker, chunks)
        wall = time.perf_counter() - t0
    return len(items) / wall


class _VideoMAEStyle:
    """VideoMAE's VideoClsDataset pattern: decord.VideoReader over the original file, one random
    clip of T frames at stride s per video per epoch (no shards, no keyframe plan)."""

    def __init__(self, paths, frames, stride):
        self.paths, self.frames, self.stride = [str(p) for p in paths], frames, stride

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import random  # noqa: PLC0415

        import decord  # noqa: PLC0415
        import torch  # noqa: PLC0415

        vr = decord.VideoReader(self.paths[i], num_threads=1, ctx=decord.cpu(0))
        span = (self.frames - 1) * self.stride + 1
        t0 = random.randint(0, max(0, len(vr) - span))
        idx = [min(t0 + j * self.stride, len(vr) - 1) for j in range(self.frames)]
        return torch.from_numpy(vr.get_batch(idx).asnumpy()).permute(0, 3, 1, 2)  # (T, C, H, W)


def _videomae_rate(paths, frames, stride, workers, batch):
    import time  # noqa: PLC0415

    import torch  # noqa: PLC0415

    dl = torch.utils.data.DataLoader(_VideoMAEStyle(paths, frames, stride), batch_size=batch, shuffle=True,
                                     num_workers=workers, drop_last=True)
    it = iter(dl)
    next(it)
    t0 = time.perf_counter()
    n = sum(len(b) for b in it)
    return n / (time.perf_counter() - t0)


def _rss_tree() -> int:
    import psutil  # noqa: PLC0415

    me = psutil.Process()
    total = me.memory_info().rss
    for c in me.children(recursive=True):
        try:
            total += c.memory_info().rss
        except psutil.Error:
            pass
    return total


def _fake_many(ds, out, n_shards):
    """A dataset of ``n_shards`` shards: links to the real tars, cycled (valid format, no re-encode)."""
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415

    idx = json.loads((ds / "index.json").read_text())
    src = idx["shards"]
    out.mkdir(exist_ok=True)
    shards = []
    for i in range(n_shards):
        s = src[i % len(src)]
        name = f"many-{i:06d}.tar"
        if not (out / name).exists():
            os.symlink(os.path.abspath(ds / s["name"]), out / name)
        shards.append(dict(s, name=name))
    idx["shards"] = shards
    (out / "index.json").write_text(json.dumps(idx))
    return out


def _peak_memory(ds, cfg, batches):
    import threading  # noqa: PLC0415

    from vidssl.data import build_loader  # noqa: PLC0415

    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_tree())
            stop.wait(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    loader = build_loader(cfg.replace(dataset=str(ds)), rank=0, world_size=1)
    for i, _b in enumerate(loader):
        if i + 1 >= batches:
            break
    stop.set()
    th.join()
    return peak[0]


def run(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415
    import tempfile  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from vidssl.data import DataConfig  # noqa: PLC0415
    from vidssl.errors import UserError  # noqa: PLC0415
    from vidssl.shard import ShardConfig, run_shard  # noqa: PLC0415

    try:
        w, h = (int(x) for x in args.size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size: got {args.size!r}; expected WxH like 320x240") from None
    for name in ("videos", "frames", "stride", "workers", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name}: got {getattr(args, name)}; allowed: >= 1")
    root = Path(args.dir or tempfile.mkdtemp(prefix="vidssl-bench-loader-"))
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src"
    src.mkdir(exist_ok=True)
    paths = _make_sources(src, args.videos, args.seconds, w, h)
    ds = root / "shards"
    if not (ds / "index.json").exists():
        run_shard(ShardConfig(sources=[str(src)], output=str(ds), shard_samples=4, short_side=args.short_side,
                              gop=8, workers=args.workers))
    batch = 4
    cfg = DataConfig(dataset=str(ds), mode="clip", augment="none", frames=args.frames, stride=args.stride,
                     workers=args.workers, batch_size=batch, shuffle_buffer=8)
    rates, tight, mae = [], [], []
    for r in range(args.repeats):
        rate, work = _loader_rate(cfg.replace(seed=r))
        rates.append(rate)
        tight.append(_tight_rate(ds, work, args.workers))
        mae.append(_videomae_rate(paths, args.frames, args.stride, args.workers, batch))
        print(f"run {r + 1}: loader {rate:.1f} clips/s, PyAV tight loop {tight[-1]:.1f}, VideoMAE-style {mae[-1]:.1f}")
    result = {"cpu_count": os.cpu_count(), "videos": args.videos, "source": args.size,
              "short_side": args.short_side, "frames": args.frames, "stride": args.stride, "workers": args.workers,
              "loader_clips_s": round(_median(rates), 1), "pyav_tight_clips_s": round(_median(tight), 1),
              "videomae_clips_s": round(_median(mae), 1)}
    # Ratios per run (baseline timed right after the loader), then the median: robust to drifting load.
    result["ratio_vs_tight"] = round(_median([a / b for a, b in zip(rates, tight)]), 3)
    result["ratio_vs_videomae"] = round(_median([a / b for a, b in zip(rates, mae)]), 3)
    if not args.skip_memory:
        mem = {}
        for n in (10, 1000):
            many = _fake_many(ds, root / f"many{n}", n)
            peaks = [_peak_memory(many, cfg.replace(resampled=True, steps_per_epoch=args.memory_batches),
                                  args.memory_batches) for _ in range(args.repeats)]
            mem[n] = _median(peaks)
        result["rss_10_shards_mb"] = round(mem[10] / 2**20, 1)
        result["rss_1000_shards_mb"] = round(mem[1000] / 2**20, 1)
        result["rss_ratio"] = round(mem[1000] / mem[10], 3)
    print(json.dumps(result, indent=1))
    return 0
