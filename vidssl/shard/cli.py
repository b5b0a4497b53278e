"""``vidssl shard``: the command line around :mod:`vidssl.shard` (heavy imports stay inside functions).

    vidssl shard SOURCE... -o OUTDIR [config.yaml] [key=value ...] [--workers 2 ...]
    vidssl shard merge OUTDIR      # combine the jobs of a num_jobs run into index.json
    vidssl shard verify OUTDIR     # check every shard against the index; exit 1 on problems
    vidssl shard info OUTDIR       # the dataset summary
    vidssl shard report DATASET [-o DIR] [--per-class N] [--seed S]   # static HTML page (vidssl.shard.report)

argparse cannot mix a SOURCE list with sub-verbs, so a first positional ``merge``, ``verify``,
``info`` or ``report`` selects the sub-verb; a source file literally named like that is passed as ``./merge``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any

from vidssl.errors import UserError

log = logging.getLogger("vidssl.shard")

SUBVERBS = ("merge", "verify", "info", "report")
_NOT_FLAGS = {"sources", "output"}

EPILOG = """\
Options come from a YAML file, key=value overrides, or flags (--clip-seconds 2 is clip_seconds=2);
later ones win: defaults < config.yaml < key=value < flags. Examples:
  vidssl shard footage/ -o shards/digits short_side=64 clip_seconds=2
  vidssl shard list.csv -o shards/train configs/shard/default.yaml --workers 8 --shard-size 1GB
  vidssl shard vids/ -o shards/x num_jobs=4 job_index=$SLURM_ARRAY_TASK_ID; vidssl shard merge shards/x
  vidssl shard verify shards/digits
  vidssl shard report shards/digits --per-class 4      # → shards/digits/report/report.html
See docs/sharding.md.
"""


def register(sub) -> None:
    from vidssl.cli import add_command
    from vidssl.shard.config import ShardConfig

    p = add_command(sub, "shard", help="raw footage → reproducible WebDataset shards (+ merge, verify, info, report)",
                    epilog=EPILOG)
    p.add_argument("items", nargs="*", metavar="SOURCE|merge|verify|info|report",
                   help="video files, folders, globs, manifests (.csv/.jsonl); a config.yaml; key=value "
                        "overrides. Or a sub-verb followed by OUTDIR (report: DATASET, a folder or URL)")
    p.add_argument("-o", "--output", metavar="OUTDIR", help="output folder (its parent must exist); report: the "
                   "report folder (default DATASET/report, or ./shard-report for a remote DATASET)")
    p.add_argument("--no-decode", action="store_true", help="verify: skip decoding every clip")
    p.add_argument("--json", action="store_true", help="info/verify: print JSON")
    p.add_argument("--per-class", type=int, default=None, metavar="N",
                   help="report: thumbnails of at most N clips per class, the only clips decoded (default 4)")
    p.add_argument("--seed", type=int, default=None, help="report: seed of the thumbnail sample (default 0)")
    opts = p.add_argument_group("shard options (same names as config keys)")
    for name, tname, default, help_text in ShardConfig.field_help():
        if name in _NOT_FLAGS:
            continue
        flag = "--" + name.replace("_", "-")
        if tname == "bool":
            opts.add_argument(flag, dest=f"opt_{name}", action="store_const", const="true", default=None,
                              help=f"{help_text} (default: {default})")
        else:
            opts.add_argument(flag, dest=f"opt_{name}", metavar=name.upper(), default=None,
                              help=f"{help_text} (default: {default})")
    p.set_defaults(func=run)
    # SOURCEs and key=value items may come before and after flags ("DIR -o OUT --workers 2 fps=8"):
    # argparse only does that with its intermixed parsing, which this parser switches to.
    p.__class__ = _intermixed(type(p))


def _intermixed(cls):
    class IntermixedParser(cls):
        _inside = False

        def parse_known_args(self, args=None, namespace=None):
            if self._inside:  # parse_known_intermixed_args calls back into parse_known_args
                return super().parse_known_args(args, namespace)
            self._inside = True
            try:
                return self.parse_known_intermixed_args(args, namespace)
            finally:
                self._inside = False

    IntermixedParser.__name__ = f"Intermixed{cls.__name__}"
    return IntermixedParser


def _split_items(items: list[str]) -> tuple[list[str], list[str]]:
    """(sources, config items: at most one *.yaml and key=value overrides)."""
    sources, config_items = [], []
    for item in items:
        if os.path.exists(item):
            (config_items if item.endswith((".yaml", ".yml")) else sources).append(item)
        elif "=" in item or item.endswith((".yaml", ".yml")):
            config_items.append(item)  # a missing YAML file is reported by the config loader
        else:
            sources.append(item)
    return sources, config_items


def build_config(args: argparse.Namespace):
    """ShardConfig from defaults < YAML < key=value < flags; CLI SOURCEs and -o replace the YAML's."""
    from vidssl.config import parse_config_args
    from vidssl.shard.config import ShardConfig

    sources, config_items = _split_items(args.items)
    for f in dataclasses.fields(ShardConfig):
        value = getattr(args, f"opt_{f.name}", None)
        if value is not None:
            config_items.append(f"{f.name}={value}")
    cfg = parse_config_args(ShardConfig, config_items)
    changes: dict[str, Any] = {}
    if sources:
        changes["sources"] = sources
    if args.output:
        changes["output"] = args.output
    return cfg.replace(**changes) if changes else cfg


def _format_summary(summary: dict[str, Any]) -> str:
    rows = [("inputs", summary["inputs"]), ("samples", summary["samples"]), ("shards", summary["shards"]),
            ("  kept from a previous run", summary["resumed_shards"]), ("frames", summary["frames"]),
            ("clip seconds", summary["clip_seconds"]), ("MB written", f"{summary['bytes'] / 1e6:.1f}"),
            ("rejected (errors.jsonl)", summary["rejected"]), ("clips dropped (short)", summary["dropped_short"]),
            ("non-video files skipped", summary["skipped"]), ("wall seconds", summary["seconds"]),
            ("index", summary["index"] or "(waiting for other jobs; then: vidssl shard merge)")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    from vidssl.shard import dataset_info, merge_index, run_shard, verify_dataset

    items = list(args.items)
    verb = items[0] if items and items[0] in SUBVERBS else None
    if verb != "report":
        for flag, value in (("--per-class", args.per_class), ("--seed", args.seed)):
            if value is not None:
                raise UserError(f"{flag} is an option of 'vidssl shard report' only")
    if verb == "report":
        rest = items[1:]
        if len(rest) != 1:
            raise UserError(f"shard report: expected exactly one DATASET, got {len(rest)} arguments {rest}")
        from vidssl.shard.report import make_report  # noqa: PLC0415

        path = make_report(rest[0], args.output, per_class=4 if args.per_class is None else args.per_class,
                           seed=args.seed or 0)
        print(f"wrote {path}")
        return 0
    if verb is not None:
        rest = items[1:]
        if len(rest) != 1:
            raise UserError(f"shard {verb}: expected exactly one OUTDIR, got {len(rest)} arguments {rest}")
        outdir = rest[0]
        if not os.path.isdir(outdir):
            raise UserError(f"shard {verb}: {outdir!r} is not a folder")
        if verb == "merge":
            path = merge_index(outdir)
            print(f"wrote {path}")
            return 0
        if verb == "verify":
            problems = verify_dataset(outdir, decode=not args.no_decode)
            if args.json:
                print(json.dumps({"ok": not problems, "problems": problems}, indent=1))
            else:
                for prob in problems:
                    print(f"PROBLEM {prob}")
                info = dataset_info(outdir) if os.path.isfile(os.path.join(outdir, "index.json")) else {}
                print(f"{'FAILED' if problems else 'OK'}: {len(problems)} problems; "
                      f"{info.get('shards', 0)} shards, {info.get('samples', 0)} samples checked")
            return 1 if problems else 0
        info = dataset_info(outdir)
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            for k in ("name", "path", "created", "shards", "samples", "frames", "seconds", "bytes", "rejected",
                      "dropped_short", "classes"):
                print(f"{k:<14} {info.get(k)}")
            print(f"{'versions':<14} {info.get('versions')}")
        return 0
    cfg = build_config(args)
    summary = run_shard(cfg)
    print(_format_summary(summary), file=sys.stdout)
    if summary["samples"] == 0 and summary["inputs"] > 0 and summary["index"]:
        # Still exit 0 (the job finished; the dataset is valid, just empty), but say so loudly.
        log.warning("no sample was written: all %d inputs were rejected, skipped or too short; the reasons are "
                    "in %s", summary["inputs"], os.path.join(os.path.dirname(summary["index"]), "errors.jsonl"))
    return 0
