"""``vidssl bench footage``: Moving Digits generation rate (videos/s), median of several runs.

For each video count, times ``generate_digits`` with all cores (``workers=0``) and, as the
baseline measured in the same run, with one process (``workers=1``); reports medians and the
speed-up. Default settings: the issue's target, few-second 64x64 videos (``sizes=64x64``);
extra ``key=value`` overrides change them.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time


def register(sub: argparse._SubParsersAction) -> None:
    from vidssl.cli import add_command

    p = add_command(sub, "footage", help="Moving Digits generation rate (videos/s), all cores vs one process")
    p.add_argument("settings", nargs="*", metavar="key=value",
                   help="DigitsConfig overrides applied to every run (default adds sizes=64x64)")
    p.add_argument("--videos", default="200,1000", help="comma-separated video counts (default 200,1000)")
    p.add_argument("--repeats", type=int, default=3, help="runs per setting; the median is reported (default 3)")
    p.add_argument("--no-baseline", action="store_true", help="skip the one-process baseline")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vidssl.config import parse_config_args
    from vidssl.errors import UserError
    from vidssl.footage.digits import DigitsConfig, generate_digits, resolve_workers

    try:
        counts = [int(v) for v in args.videos.split(",")]
    except ValueError:
        raise UserError(f"--videos: got {args.videos!r}; expected comma-separated positive integers") from None
    if not counts or min(counts) < 1:
        raise UserError(f"--videos: got {args.videos!r}; expected comma-separated positive integers")
    if args.repeats < 1:
        raise UserError(f"--repeats: got {args.repeats}; expected >= 1")
    base = parse_config_args(DigitsConfig, ["sizes=64x64", *args.settings])
    print(f"footage bench: repeats={args.repeats} settings: sizes={base.sizes} fps={base.fps} "
          f"seconds={list(base.seconds)} distractors={base.distractors} noise={base.noise} preset={base.preset}")
    print(f"{'videos':>7} {'workers':>7} {'median s':>9} {'videos/s':>9} {'frames/s':>9}  runs (s)")
    tmp = tempfile.mkdtemp(prefix="vidssl-bench-footage-")
    try:
        for n in counts:
            rates = {}
            settings = [(resolve_workers(0, n), 0)] + ([] if args.no_baseline else [(1, 1)])
            for shown, workers in settings:
                cfg = base.replace(videos=n, workers=workers)
                times = []
                frames = 0
                for _ in range(args.repeats):
                    out = f"{tmp}/{n}-{workers}"
                    t0 = time.perf_counter()
                    generate_digits(cfg, out)
                    times.append(time.perf_counter() - t0)
                    with open(f"{out}/labels.csv") as f:
                        frames = sum(int(line.split(",")[4]) for line in list(f)[1:])
                    shutil.rmtree(out)
                med = statistics.median(times)
                rates[workers] = n / med
                print(f"{n:>7} {shown:>7} {med:>9.2f} {n / med:>9.1f} {frames / med:>9.0f}  "
                      + " ".join(f"{t:.2f}" for t in times), flush=True)
            if 1 in rates:
                print(f"{n:>7} speed-up all cores vs one process: {rates[0] / rates[1]:.2f}x", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0
