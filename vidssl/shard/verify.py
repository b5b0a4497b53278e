"""``vidssl shard verify``: check every shard of a dataset against its index."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
from typing import Any

_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ORDER = {"json": 0, "mp4": 1, "cls": 2}


def _decode_check(data: bytes, meta: dict[str, Any]) -> list[str]:
    """Decode the clip: frame count, size and keyframe positions must match the metadata."""
    import av

    problems = []
    try:
        with av.open(io.BytesIO(data)) as c:
            if not c.streams.video:
                return ["mp4 has no video stream"]
            n = 0
            keys = []
            size = None
            for frame in c.decode(video=0):
                if frame.key_frame:
                    keys.append(n)
                size = (frame.width, frame.height)
                n += 1
    except Exception as exc:  # noqa: BLE001 - any decode failure is a problem to report
        return [f"mp4 does not decode ({type(exc).__name__}: {exc})"]
    if n != meta.get("frames"):
        problems.append(f"mp4 decodes to {n} frames, metadata says {meta.get('frames')}")
    if size is not None and size != (meta.get("width"), meta.get("height")):
        problems.append(f"mp4 frames are {size[0]}x{size[1]}, metadata says {meta.get('width')}x{meta.get('height')}")
    if not meta.get("copy") and meta.get("keyframes") is not None and keys != meta.get("keyframes"):
        problems.append(f"keyframes {keys[:8]} differ from metadata {meta.get('keyframes', [])[:8]}")
    return problems


def _check_shard(path: str, entry: dict[str, Any], classes: list[str], seen: set[str], decode: bool) -> list[str]:
    name = entry.get("name")
    problems: list[str] = []
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            sha.update(chunk)
    size = os.path.getsize(path)
    if size != entry.get("bytes"):
        problems.append(f"{name}: {size} bytes, index says {entry.get('bytes')}")
    if sha.hexdigest() != entry.get("sha256"):
        problems.append(f"{name}: sha256 differs from the index (file changed or damaged)")
    samples: list[tuple[str, dict[str, bytes]]] = []
    try:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    problems.append(f"{name}: member {member.name!r} is not a regular file")
                    continue
                key, _, ext = member.name.partition(".")
                if not samples or samples[-1][0] != key:
                    samples.append((key, {}))
                parts = samples[-1][1]
                if ext in parts:
                    problems.append(f"{name}: sample {key}: member .{ext} appears twice")
                parts[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
                order = [_ORDER.get(e, 9) for e in parts]
                if order != sorted(order):
                    problems.append(f"{name}: sample {key}: members out of order ({', '.join(parts)})")
    except (tarfile.TarError, OSError) as exc:
        return problems + [f"{name}: not a readable tar ({exc})"]
    if len(samples) != entry.get("samples"):
        problems.append(f"{name}: {len(samples)} samples, index says {entry.get('samples')}")
    frames = 0
    for key, parts in samples:
        where = f"{name}: sample {key}"
        if not _KEY.match(key):
            problems.append(f"{where}: key has characters other than letters, digits, '_' and '-'")
        if key in seen:
            problems.append(f"{where}: key is not unique in the dataset")
        seen.add(key)
        unknown = sorted(set(parts) - set(_ORDER))
        if unknown:
            problems.append(f"{where}: unexpected members {unknown}")
        if "json" not in parts or "mp4" not in parts:
            problems.append(f"{where}: incomplete (has {sorted(parts)}; needs json and mp4)")
            continue
        try:
            meta = json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError):
            problems.append(f"{where}: KEY.json is not valid JSON")
            continue
        if meta.get("key") != key:
            problems.append(f"{where}: json key {meta.get('key')!r} differs from the member name")
        frames += meta.get("frames") or 0
        label = meta.get("label", -1)
        if isinstance(label, int) and label >= 0:
            if "cls" not in parts:
                problems.append(f"{where}: labelled ({label}) but has no .cls member")
            elif parts["cls"].decode("ascii", "replace").strip() != str(label):
                problems.append(f"{where}: .cls {parts['cls']!r} differs from json label {label}")
            if classes and label >= len(classes):
                problems.append(f"{where}: label {label} outside the {len(classes)} classes")
        elif "cls" in parts:
            problems.append(f"{where}: has a .cls member but json label is {label!r}")
        if decode:
            problems.extend(f"{where}: {p}" for p in _decode_check(parts["mp4"], meta))
    if "frames" in entry and frames != entry["frames"]:
        problems.append(f"{name}: samples hold {frames} frames, index says {entry['frames']}")
    return problems


def verify_dataset(outdir: str, decode: bool = True) -> list[str]:
    """Check a dataset folder; returns a list of problems (empty when everything is consistent).

    Checks: index.json readable; each listed shard exists with the index's size, sha256 and sample
    count; each sample is complete (json + mp4, cls iff labelled), in member order, with a unique
    key; with ``decode`` each mp4 decodes to its declared frame count, size and keyframes; totals
    add up; no unlisted shard or leftover partial file sits in the folder.
    """
    problems: list[str] = []
    index_path = os.path.join(outdir, "index.json")
    try:
        with open(index_path, encoding="utf-8") as fh:
            index = json.load(fh)
    except FileNotFoundError:
        return [f"{index_path}: missing (the run did not finish, or this is not a dataset folder)"]
    except (OSError, json.JSONDecodeError) as exc:
        return [f"{index_path}: unreadable ({exc})"]
    if not isinstance(index, dict) or index.get("format") != "vidssl-shards":
        return [f"{index_path}: not a vidssl-shards index"]
    shards = index.get("shards") or []
    classes = index.get("classes") or []
    seen: set[str] = set()
    listed = set()
    for entry in shards:
        name = entry.get("name", "?")
        listed.add(name)
        path = os.path.join(outdir, name)
        if not os.path.isfile(path):
            problems.append(f"{name}: listed in index.json but missing")
            continue
        problems.extend(_check_shard(path, entry, classes, seen, decode))
    totals = index.get("totals", {})
    for field in ("samples", "bytes", "frames"):
        total = sum(s.get(field, 0) for s in shards)
        if totals.get(field) != total:
            problems.append(f"index.json: totals.{field} is {totals.get(field)}, shards add up to {total}")
    for path in sorted(glob.glob(os.path.join(glob.escape(outdir), "*.tar"))):
        if os.path.basename(path) not in listed:
            problems.append(f"{os.path.basename(path)}: a shard file not listed in index.json")
    for path in sorted(glob.glob(os.path.join(glob.escape(outdir), ".*.partial"))):
        problems.append(f"{os.path.basename(path)}: a partial shard left by an interrupted run")
    return problems
