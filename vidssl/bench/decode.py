"""``vidssl bench decode``: GPU decoding (NVDEC + on-device augmentation) against CPU workers.

Issue 12's GPU checks in one command, for a session that is lent a GPU: on the same shards (the
loader benchmark's footage, GOP 16, the shard default B-frames), at each ``--sizes`` crop (shards at
short side 8/7 of the crop: 128 for 112, 256 for 224), the training loader in ``clip`` mode with
``augment: train`` and ``--frames`` frames at ``--stride``:

- **device**: ``decode_stage: main`` with ``decode_device: --device`` (``cuda``: torchcodec on NVDEC,
  augmentation on the GPU; two reader workers feed it compressed bytes);
- **cpu workers**: ``decode_stage: worker`` on the CPU with ``--workers`` worker processes (default:
  every core), PyAV.

Each side reads ``--batches`` batches after ``--warmup``, ``--repeats`` times alternately; clips/s is
the median, the ratio is the median of per-repeat ratios. On ``cuda`` the device side also reports
the GPU memory it took: device-wide used memory (``torch.cuda.mem_get_info``, so NVDEC surfaces
count too) at its peak during the run minus before the loader existed, and torch's own peak
allocation. ``--device cpu`` runs the same code with the main-process stage on the CPU (a smoke run
of the plumbing on a machine without a GPU; its figures say nothing about NVDEC).

The data-wait share of a real ViT-S step is ``vidssl bench train configs/pretrain/vit_s_k400.yaml
data.dataset=SHARDS --skip-compare`` on the shards this benchmark leaves in ``--dir``.
"""

from __future__ import annotations

import argparse

__all__ = ["register", "run"]


def register(sub) -> None:
    from vidssl.bench.loader import add_footage_args  # noqa: PLC0415
    from vidssl.cli import add_command  # noqa: PLC0415

    p = add_command(sub, "decode", help="GPU (NVDEC) decoding + on-device augmentation vs CPU workers")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="decode_device of the main-process side (default cuda; cpu: a smoke run without a GPU)")
    p.add_argument("--sizes", default="112,224", help="crop sizes, comma-separated (default 112,224)")
    add_footage_args(p)
    p.add_argument("--frames", type=int, default=16, help="frames per clip (default 16)")
    p.add_argument("--stride", type=int, default=2, help="frame stride (default 2)")
    p.add_argument("--batch-size", type=int, default=16, help="clips per batch (default 16)")
    p.add_argument("--workers", type=int, default=0, help="CPU-side worker processes (0: every core)")
    p.add_argument("--batches", type=int, default=40, help="timed batches per measurement (default 40)")
    p.add_argument("--warmup", type=int, default=5, help="batches read before timing (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per side (median reported)")
    p.add_argument("--dir", default=None, help="work folder, reused when given (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=run)


def _measure(cfg, batches: int, warmup: int, device: str) -> dict:
    """Clips/s of ``batches`` batches after ``warmup`` (resampled epochs, so never short of batches),
    and on cuda the GPU memory the loader took."""
    import threading  # noqa: PLC0415
    import time  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from vidssl.data import build_loader  # noqa: PLC0415

    cuda = device == "cuda"
    peak = [0]
    stop = threading.Event()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        free, total = torch.cuda.mem_get_info()
        used0 = total - free

        def sample():  # device-wide used memory: NVDEC's surfaces are not torch allocations
            while not stop.is_set():
                f, t = torch.cuda.mem_get_info()
                peak[0] = max(peak[0], t - f)
                stop.wait(0.05)

        threading.Thread(target=sample, daemon=True).start()
    loader = build_loader(cfg, rank=0, world_size=1)
    it = iter(loader)
    n, t0 = 0, None
    try:
        for i in range(warmup + batches):
            if i == warmup:
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            b = next(it)
            if i >= warmup:
                n += len(b["key"])
        if cuda:
            torch.cuda.synchronize()
        rate = n / (time.perf_counter() - t0)
    finally:
        stop.set()
        loader.close()
    out = {"clips_s": rate, "backend": loader.stats["backend"], "decode_device": loader.stats["decode_device"]}
    if cuda:
        out["gpu_used_mb"] = (peak[0] - used0) / 2**20
        out["torch_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def run(args: argparse.Namespace) -> int:
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415
    import tempfile  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from vidssl.bench.loader import _median, footage_sources  # noqa: PLC0415
    from vidssl.data import DataConfig  # noqa: PLC0415
    from vidssl.data.cuda import cuda_decode_problem  # noqa: PLC0415
    from vidssl.errors import UserError  # noqa: PLC0415

    try:
        sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--sizes: got {args.sizes!r}; expected crop sizes like 112,224") from None
    if not sizes or min(sizes) < 8:
        raise UserError(f"--sizes: got {args.sizes!r}; allowed: crop sizes >= 8")
    for name in ("frames", "stride", "batch_size", "batches", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: got {getattr(args, name)}; allowed: >= 1")
    if args.warmup < 0 or args.workers < 0:
        raise UserError(f"--warmup/--workers: got {args.warmup}/{args.workers}; allowed: >= 0")
    if args.device == "cuda":
        why = cuda_decode_problem(None, [])  # no GPU, or no torchcodec: say so before any work
        if why:
            raise UserError(f"--device cuda: {why} (--device cpu runs the same code without a GPU)")
    workers = args.workers or os.cpu_count() or 1
    root = Path(args.dir or tempfile.mkdtemp(prefix="vidssl-bench-decode-"))
    src = root / "src"
    footage_sources(args, src)
    from vidssl.shard import ShardConfig, run_shard  # noqa: PLC0415

    result: dict = {"device": args.device, "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                    "cpu_count": os.cpu_count(), "cpu_workers": workers, "frames": args.frames,
                    "stride": args.stride, "batch_size": args.batch_size, "batches": args.batches,
                    "repeats": args.repeats, "sizes": {}}
    for crop in sizes:
        short = max(crop, int(round(crop * 8 / 7 / 2)) * 2)
        ds = root / f"shards-s{short}-g16-b{ShardConfig.bframes}"
        if not (ds / "index.json").exists():
            run_shard(ShardConfig(sources=[str(src)], output=str(ds), short_side=short, gop=16, clip_seconds=2.0,
                                  shard_samples=64, progress="none"))
        base = DataConfig(dataset=str(ds), mode="clip", frames=args.frames, stride=args.stride, augment="train",
                          crop_size=crop, batch_size=args.batch_size, resampled=True,
                          steps_per_epoch=args.warmup + args.batches, short="loop")
        sides = {"device": base.replace(decode_stage="main", decode_device=args.device, workers=2),
                 "cpu_workers": base.replace(decode_stage="worker", decode_device="cpu", workers=workers)}
        runs: dict = {k: [] for k in sides}
        for r in range(args.repeats):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for k in order:
                runs[k].append(_measure(sides[k].replace(seed=r), args.batches, args.warmup, args.device if k == "device" else "cpu"))
            print(f"crop {crop}, run {r + 1}: " + ", ".join(f"{k} {runs[k][-1]['clips_s']:.1f} clips/s" for k in sides),
                  flush=True)
        row = {k: {"clips_s": round(_median([m["clips_s"] for m in v]), 1), "backend": v[0]["backend"],
                   "decode_device": v[0]["decode_device"]} for k, v in runs.items()}
        if args.device == "cuda":
            row["device"]["gpu_used_mb"] = round(_median([m["gpu_used_mb"] for m in runs["device"]]), 1)
            row["device"]["torch_peak_mb"] = round(_median([m["torch_peak_mb"] for m in runs["device"]]), 1)
        row["ratio_device_vs_cpu_workers"] = round(
            _median([a["clips_s"] / b["clips_s"] for a, b in zip(runs["device"], runs["cpu_workers"])]), 3)
        row["shards"] = str(ds)
        result["sizes"][str(crop)] = row
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0
