#!/usr/bin/env python3
"""UCF101 / HMDB51 official split files → CSV manifests (path,label) for ``vidssl shard``.

UCF101 (``ucfTrainTestlist/``: ``classInd.txt``, ``trainlist0N.txt`` "Class/v_Class_g08_c01.avi 1",
``testlist0N.txt`` "Class/v_Class_g01_c01.avi"):

    python tools/ucf101_manifest.py ucf101 --splits ucfTrainTestlist --videos UCF-101 --split 1 -o manifests/

HMDB51 (``testTrainMulti_7030_splits/``: ``<class>_test_split<N>.txt`` with lines "video.avi 1|2|0",
1 = train, 2 = test, 0 = unused; videos in ``<videos>/<class>/video.avi``):

    python tools/ucf101_manifest.py hmdb51 --splits testTrainMulti_7030_splits --videos hmdb51 --split 1 -o manifests/

Writes ``OUT/{ucf101,hmdb51}-train<N>.csv`` and ``-test<N>.csv`` (absolute paths; label = class name),
shuffled with a fixed seed (sorted lists would give one-class batches), and a classes file in the
official order. Both manifests list every class, so the two datasets get the same class list. Then:

    vidssl shard manifests/ucf101-train1.csv -o shards/ucf101-train1 short_side=128 --workers 16
    vidssl shard manifests/ucf101-test1.csv -o shards/ucf101-test1 short_side=128 --workers 16

Missing video files are reported (and the run fails unless --allow-missing).
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import sys
from pathlib import Path


def ucf101(splits: Path, videos: Path, split: int) -> tuple[list[str], dict[str, list[tuple[Path, str]]]]:
    classes = []
    for line in (splits / "classInd.txt").read_text().splitlines():
        if line.strip():
            _idx, name = line.split()
            classes.append(name)
    out: dict[str, list[tuple[Path, str]]] = {"train": [], "test": []}
    for part, fname in (("train", f"trainlist0{split}.txt"), ("test", f"testlist0{split}.txt")):
        for line in (splits / fname).read_text().splitlines():
            if not line.strip():
                continue
            rel = line.split()[0]
            cls = rel.split("/")[0]
            if cls not in classes:
                raise SystemExit(f"{fname}: class {cls!r} of {rel!r} is not in classInd.txt")
            out[part].append((videos / rel, cls))
    return classes, out


def hmdb51(splits: Path, videos: Path, split: int) -> tuple[list[str], dict[str, list[tuple[Path, str]]]]:
    pat = re.compile(rf"^(.*)_test_split{split}\.txt$")
    files = sorted(p for p in splits.iterdir() if pat.match(p.name))
    if not files:
        raise SystemExit(f"{splits}: no *_test_split{split}.txt files")
    classes = [pat.match(p.name).group(1) for p in files]
    out: dict[str, list[tuple[Path, str]]] = {"train": [], "test": []}
    for p, cls in zip(files, classes):
        for line in p.read_text().splitlines():
            parts = line.split()
            if len(parts) != 2:
                continue
            name, flag = parts
            if flag == "1":
                out["train"].append((videos / cls / name, cls))
            elif flag == "2":
                out["test"].append((videos / cls / name, cls))
    return classes, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=("ucf101", "hmdb51"))
    ap.add_argument("--splits", type=Path, required=True, help="folder of the official split files")
    ap.add_argument("--videos", type=Path, required=True, help="folder of the videos")
    ap.add_argument("--split", type=int, default=1, choices=(1, 2, 3))
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0, help="shuffle seed of the manifest rows")
    ap.add_argument("--allow-missing", action="store_true", help="write the manifests even if videos are missing")
    args = ap.parse_args(argv)
    classes, parts = (ucf101 if args.dataset == "ucf101" else hmdb51)(args.splits, args.videos.resolve(), args.split)
    missing = [str(p) for rows in parts.values() for p, _ in rows if not p.is_file()]
    if missing:
        print(f"{len(missing)} listed videos are missing, e.g. {missing[:3]}", file=sys.stderr)
        if not args.allow_missing:
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.dataset}-classes.txt").write_text("\n".join(classes) + "\n")
    for part, rows in parts.items():
        rows = [r for r in rows if r[0].is_file()] if args.allow_missing else list(rows)
        random.Random(args.seed).shuffle(rows)
        path = args.out / f"{args.dataset}-{part}{args.split}.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label"])
            w.writerows([str(p), c] for p, c in rows)
        present = {c for _, c in rows}
        print(f"{path}: {len(rows)} videos, {len(present)} of {len(classes)} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
