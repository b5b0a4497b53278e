"""``vidssl bench shard``: vidssl shard vs the ffmpeg CLI in a parallel loop plus tar.

Both sides do the same work on the same inputs with the same cores: decode each video once,
resize (short side), re-encode H.264 yuv420p with the same crf/preset/fixed GOP/B-frames (``--bframes``) and
one encoder thread per process, ``workers`` processes at a time, then pack the results into a
tar. Stream copy is timed the same way (``ffmpeg -c copy`` + tar). Throughput is input MB per
wall second; each figure is the median of ``--runs`` runs, timed alternately so machine noise hits
both sides alike.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger("vidssl.bench.shard")


def register(sub) -> None:
    from vidssl.cli import add_command

    p = add_command(sub, "shard", help="vidssl shard vs ffmpeg CLI + tar (re-encode and stream copy)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per side (median reported)")
    p.add_argument("--digits", type=int, default=300, help="Moving Digits videos to generate (0: skip)")
    p.add_argument("--copies", type=int, default=100, help="copies of the sample clips for the stream-copy run")
    p.add_argument("--reencode-copies", type=int, default=10,
                   help="copies of the sample clips for a re-encode run long enough to be stable (0: skip)")
    p.add_argument("--copy-only", action="store_true",
                   help="time only stream copy (skip every re-encode run and --reencode-copies)")
    p.add_argument("--workers", type=int, default=0, help="processes per side (0: all cores)")
    p.add_argument("--short-side", type=int, default=64, help="resize short side to this")
    p.add_argument("--crf", type=int, default=23)
    p.add_argument("--preset", default="veryfast")
    p.add_argument("--gop", type=int, default=16)
    p.add_argument("--bframes", type=int, default=None, help="B-frames (default: vidssl shard's default)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=run)


def _ffmpeg_version() -> str:
    try:
        out = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unavailable"
    return out.split("\n", 1)[0].replace("ffmpeg version ", "").split(" Copyright")[0]


def _bframes(args) -> int:
    """``--bframes``, or vidssl shard's default (both sides encode with the same number)."""
    from vidssl.shard import ShardConfig  # noqa: PLC0415

    return ShardConfig.bframes if args.bframes is None else args.bframes


def _ffmpeg_encode_cmd(src: str, dst: str, args) -> list[str]:
    s = args.short_side
    # Same geometry as vidssl: short side → s, the other side scaled and rounded to even.
    scale = f"scale='if(gt(iw,ih),-2,{s})':'if(gt(iw,ih),{s},-2)':flags=area,format=yuv420p"
    return ["ffmpeg", "-nostdin", "-v", "error", "-y", "-threads", "1", "-i", src, "-an", "-sn", "-dn",
            "-vf", scale, "-c:v", "libx264", "-preset", args.preset, "-crf", str(args.crf), "-g", str(args.gop),
            "-bf", str(_bframes(args)),
            "-x264-params", f"keyint={args.gop}:min-keyint={args.gop}:scenecut=0:bframes={_bframes(args)}:open-gop=0",
            "-threads", "1", "-fps_mode", "cfr", "-f", "mp4", dst]


def _ffmpeg_copy_cmd(src: str, dst: str, args) -> list[str]:
    return ["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", src, "-map", "0:v:0", "-c", "copy", "-f", "mp4", dst]


def _baseline(inputs: list[str], work: Path, args, workers: int, copy: bool) -> float:
    """ffmpeg per input, ``workers`` at a time, then tar; returns wall seconds."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    make = _ffmpeg_copy_cmd if copy else _ffmpeg_encode_cmd
    t0 = time.perf_counter()

    def one(i_src):
        i, src = i_src
        subprocess.run(make(src, str(work / f"{i:06d}.mp4"), args), check=True)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, enumerate(inputs)))
    names = sorted(p.name for p in work.glob("*.mp4"))
    subprocess.run(["tar", "cf", str(work / "out.tar"), *names], cwd=work, check=True)
    return time.perf_counter() - t0


def _cpu_seconds() -> float:
    """User + system CPU of this process and its reaped children (the shard workers)."""
    import resource

    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def _vidssl(inputs: list[str], work: Path, args, workers: int, copy: bool, cpu: list | None = None) -> float:
    """Wall seconds of one run_shard; appends its CPU seconds (all processes) to ``cpu``."""
    from vidssl.shard import ShardConfig, run_shard

    shutil.rmtree(work, ignore_errors=True)
    cfg = ShardConfig(sources=inputs, output=str(work), workers=workers, progress="none", copy=copy,
                      short_side=None if copy else args.short_side, crf=args.crf, preset=args.preset,
                      gop=args.gop, bframes=_bframes(args), threads=1, min_seconds=0.0)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    summary = run_shard(cfg)
    dt = time.perf_counter() - t0
    if cpu is not None:
        cpu.append(_cpu_seconds() - c0)
    if summary["rejected"]:
        log.warning("vidssl rejected %d inputs (see %s/errors.jsonl)", summary["rejected"], work)
    return dt


def _measure(name: str, inputs: list[str], root: Path, args, workers: int,
             modes: tuple[str, ...] = ("reencode", "copy")) -> list[dict]:
    mb = sum(os.path.getsize(p) for p in inputs) / 1e6
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in modes:
        copy = mode == "copy"
        times: dict[str, list[float]] = {"vidssl": [], "ffmpeg+tar": []}
        cpu: list[float] = []
        load0 = os.getloadavg()[0]  # other processes on the same cores skew both sides: record it
        _vidssl(inputs, root / "warm", args, workers, copy)  # warm the page cache and imports
        for _ in range(args.runs):
            times["vidssl"].append(_vidssl(inputs, root / "v", args, workers, copy, cpu))
            times["ffmpeg+tar"].append(_baseline(inputs, root / "b", args, workers, copy))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"dataset": name, "mode": mode, "inputs": len(inputs), "input_mb": round(mb, 2),
               "vidssl_s": round(med["vidssl"], 3), "baseline_s": round(med["ffmpeg+tar"], 3),
               "vidssl_mb_s": round(mb / med["vidssl"], 2), "baseline_mb_s": round(mb / med["ffmpeg+tar"], 2),
               "ratio": round(med["ffmpeg+tar"] / med["vidssl"], 3), "runs": args.runs,
               "all_vidssl_s": [round(t, 3) for t in times["vidssl"]],
               "all_baseline_s": [round(t, 3) for t in times["ffmpeg+tar"]],
               "load_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
               # CPU seconds of vidssl (parent + workers) per run: unlike wall time, barely moved by
               # other processes on the cores; / cores is the wall time the work needs on idle cores.
               "vidssl_cpu_s": round(statistics.median(cpu), 3)}
        log.info("%s %s: vidssl %.2f MB/s, ffmpeg+tar %.2f MB/s, ratio %.2f", name, mode, row["vidssl_mb_s"],
                 row["baseline_mb_s"], row["ratio"])
        rows.append(row)
    return rows


def _sample_clips() -> list[str]:
    from vidssl.errors import UserError
    from vidssl.footage.samples import find_sample_clips

    try:
        return [str(p) for p in find_sample_clips()]
    except UserError as exc:  # the real-clip rows are skipped, the Moving Digits rows still run
        log.warning("no real sample clips: %s", exc)
        return []


def run(args) -> int:
    import av

    from vidssl.errors import UserError
    from vidssl.shard.config import default_workers

    if args.runs < 1:
        raise UserError(f"--runs: got {args.runs}; allowed: >= 1")
    for name in ("copies", "reencode_copies", "digits"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')}: got {getattr(args, name)}; allowed: >= 0")
    if shutil.which("ffmpeg") is None:
        raise UserError("the baseline needs the ffmpeg command line (apt-get install ffmpeg)")
    workers = args.workers or default_workers()
    root = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="vidssl-bench-shard-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    modes = ("copy",) if args.copy_only else ("reencode", "copy")
    clips = _sample_clips()
    if clips:
        rows += _measure("sample clips", clips, root / "samples", args, workers, modes=modes)
        # Stream copy is I/O-bound: time it on enough bytes that process start-up does not dominate.
        big = root / "copies"
        big.mkdir(parents=True, exist_ok=True)
        reenc = 0 if args.copy_only else args.reencode_copies
        copies = []
        for i in range(max(args.copies, reenc)):
            for c in clips:
                dst = big / f"{i:04d}-{os.path.basename(c)}"
                if not dst.exists():
                    shutil.copyfile(c, dst)
                copies.append(str(dst))
        if args.copies > 0:
            rows += _measure(f"sample clips x{args.copies} copies", copies[:args.copies * len(clips)],
                             root / "copies-run", args, workers, modes=("copy",))
        if reenc > 0:
            # The 4 clips alone take ~1.5 s to re-encode, so worker start-up swings the ratio; ×N is stable.
            rows += _measure(f"sample clips x{reenc} copies", copies[:reenc * len(clips)], root / "reenc-run", args,
                             workers, modes=("reencode",))
    if args.digits > 0:
        from vidssl.footage.digits import DigitsConfig, generate_digits

        ddir = root / "digits"
        if not (ddir / "labels.csv").exists():
            generate_digits(DigitsConfig(videos=args.digits, workers=workers), ddir, force=True)
        vids = sorted(str(p) for p in (ddir / "videos").rglob("*.mp4"))
        rows += _measure(f"moving digits x{len(vids)}", vids, root / "digits-run", args, workers, modes=modes)
    versions = {"pyav": av.__version__, "pyav_ffmpeg": str(getattr(av, "ffmpeg_version_info", "?")),
                "ffmpeg_cli": _ffmpeg_version(), "workers": workers}
    print(f"workers={workers}  PyAV {versions['pyav']} (FFmpeg {versions['pyav_ffmpeg']})  "
          f"ffmpeg CLI {versions['ffmpeg_cli']}")
    print("| data | mode | inputs | MB | vidssl MB/s | ffmpeg+tar MB/s | ratio | load (1 min, start-end) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['dataset']} | {r['mode']} | {r['inputs']} | {r['input_mb']} | {r['vidssl_mb_s']} | "
              f"{r['baseline_mb_s']} | {r['ratio']} | {r['load_1min'][0]}-{r['load_1min'][1]} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"versions": versions, "rows": rows}, indent=1))
    if not args.work:
        shutil.rmtree(root, ignore_errors=True)
    return 0
