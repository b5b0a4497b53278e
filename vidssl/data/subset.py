"""Label-efficiency subsets: a stratified, seeded fraction of a labelled dataset, as a new dataset.

    from vidssl.data.subset import make_subset
    summary = make_subset("shards/ucf101-train", 0.1, seed=0, out_dir="runs/ft10/subset")

Per class, ``max(min_per_class, round_half_up(fraction * n_class))`` samples are kept (never more
than the class has). Within a class, samples are ranked by ``sha256(f"{seed}:{label}:{key}")`` and
the first ones are taken, so the choice depends only on (dataset, fraction, seed, min_per_class),
never on the machine, shard order or Python's hash seed; for a fixed seed a larger fraction keeps
a superset of a smaller one. Unlabelled samples (label -1 / no label) are left out and counted.

The output is an ordinary vidssl dataset (docs/formats.md): the chosen samples' tar members copied
byte for byte, in source order, into new shards written by :class:`ShardWriter`, an ``index.json``
with the source's ``classes`` (class ids never change) plus a ``subset`` entry, an empty
``errors.jsonl``, and ``subset_keys.json`` (the chosen keys per class). It is built in a temporary
folder next to ``out_dir`` and renamed into place, so ``out_dir`` never holds a half-written dataset;
a complete subset with the same source index, fraction, seed and min_per_class is reused as is.

Nothing is decoded and nothing is unpickled: only the ``KEY.json`` / ``KEY.cls`` members are read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import tarfile
import urllib.parse
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vidssl.data.index import is_remote, open_index
from vidssl.errors import UserError

__all__ = ["make_subset", "KEYS_FILE"]

KEYS_FILE = "subset_keys.json"
_FIELD = "label_fraction"
_EXTS = ("json", "mp4", "cls")  # the member order the format fixes


@dataclass
class _Entry:
    """One source sample: where its members lie in its shard (no member data kept)."""

    shard: int                                # index into the source index's shards
    key: str
    label: int                                # -1 when unlabelled
    members: list[tuple[str, int, int]]       # (extension, data offset, size) in member order
    frames: int
    seconds: float


def _check_args(fraction: Any, seed: Any, min_per_class: Any) -> float:
    if (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
            or not math.isfinite(fraction) or not 0 < fraction <= 1):
        raise UserError(f"{_FIELD}: got {fraction!r}; allowed: 0 < x <= 1")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed: got {seed!r}; allowed: an integer >= 0 (the label subset's seed)")
    if isinstance(min_per_class, bool) or not isinstance(min_per_class, int) or min_per_class < 0:
        raise UserError(f"min_per_class: got {min_per_class!r}; allowed: an integer >= 0")
    return float(fraction)


def _local_dataset(dataset: str | Path) -> str:
    """The dataset folder as a local path (UserError for URLs)."""
    loc = os.fspath(dataset)
    parsed = urllib.parse.urlparse(loc)
    if is_remote(loc):
        raise UserError(f"{_FIELD}: dataset {loc!r} is remote; label subsets need a local dataset folder "
                        f"(copy it to local disk first)")
    if len(parsed.scheme) > 1 and parsed.scheme.lower() == "file":
        loc = urllib.parse.unquote(parsed.path)
    if loc.endswith(".json") and os.path.isfile(loc):
        loc = os.path.dirname(loc) or "."
    return os.path.abspath(loc)


def _read_shard(path: str, shard: int, where: str) -> list[_Entry]:
    """Every sample of one local shard: key, label (``.cls`` wins over the json, as the loader
    does), frame count and member offsets. Only json and cls data are read; mp4 data is skipped."""
    entries: list[_Entry] = []
    groups: list[tuple[str, list[tarfile.TarInfo]]] = []
    try:
        with tarfile.open(path, mode="r:") as tar:  # seekable: mp4 data is skipped, not read
            for m in tar:
                if not m.isfile():
                    continue
                key = m.name.partition(".")[0]
                if not groups or groups[-1][0] != key:
                    groups.append((key, []))
                groups[-1][1].append(m)
            for key, members in groups:
                exts = [m.name[len(key) + 1:] if m.name.startswith(key + ".") else m.name for m in members]
                if exts not in (["json", "mp4"], ["json", "mp4", "cls"]):
                    raise UserError(f"{where}: sample {key!r} has members {[m.name for m in members]}; expected "
                                    f"KEY.json, KEY.mp4[, KEY.cls] (check it with 'vidssl shard verify')")
                parts = {e: m for e, m in zip(exts, members)}
                try:
                    meta = json.loads(tar.extractfile(parts["json"]).read())  # type: ignore[union-attr]
                    frames = int(meta["frames"])
                    fps = float(meta.get("fps") or 0.0)
                    if frames < 1 or fps <= 0:
                        raise ValueError(f"frames={frames}, fps={fps}")
                    label = meta.get("label", -1)
                    if "cls" in parts:
                        label = tar.extractfile(parts["cls"]).read().decode("ascii").strip()  # type: ignore[union-attr]
                    label = int(label if label is not None else -1)
                except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError) as exc:
                    raise UserError(f"{where}: sample {key!r}: unreadable metadata or label ({exc})") from None
                entries.append(_Entry(shard=shard, key=key, label=label if label >= 0 else -1,
                                      members=[(e, parts[e].offset_data, parts[e].size) for e in exts],
                                      frames=frames, seconds=frames / fps))
    except (tarfile.TarError, OSError) as exc:
        raise UserError(f"{where}: not a readable tar ({exc})") from None
    return entries


def _rank(seed: int, label: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{label}:{key}".encode("utf-8")).hexdigest()


def _count(fraction: float, n: int, min_per_class: int) -> int:
    """Samples kept from a class of ``n``: round half up (not Python's banker's rounding)."""
    return min(n, max(min_per_class, math.floor(fraction * n + 0.5)))


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _reusable(out: str, ident: dict[str, Any]) -> dict[str, Any] | None:
    """The existing index of ``out`` when it is a complete subset made with ``ident``, else None."""
    index = _load_json(os.path.join(out, "index.json"))
    if not isinstance(index, dict) or index.get("format") != "vidssl-shards":
        return None
    sub = index.get("subset")
    if not isinstance(sub, dict) or any(sub.get(k) != v for k, v in ident.items()):
        return None
    if not os.path.isfile(os.path.join(out, KEYS_FILE)):
        return None
    for s in index.get("shards") or []:
        try:
            if os.path.getsize(os.path.join(out, s["name"])) != s["bytes"]:
                return None
        except (OSError, KeyError, TypeError):
            return None
    return index


def _summary(out: str, index: dict[str, Any], reused: bool) -> dict[str, Any]:
    sub = index["subset"]
    return {"dataset": out, "samples": index["totals"]["samples"], "per_class": dict(sub["per_class"]),
            "unlabelled_skipped": sub["unlabelled_skipped"], "source_samples": sub["source_samples"],
            "missing_classes": list(sub["missing_classes"]), "reused": reused}


def _looks_replaceable(out: str) -> bool:
    """Only an empty folder or a vidssl dataset is ever replaced (never some other user folder)."""
    if not os.path.isdir(out):
        return not os.path.lexists(out)
    if not os.listdir(out):
        return True
    index = _load_json(os.path.join(out, "index.json"))
    return isinstance(index, dict) and index.get("format") == "vidssl-shards"


def _write(src: str, index: dict[str, Any], chosen: list[_Entry], staging: str) -> list[dict[str, Any]]:
    """Copy the chosen samples' members into new shards in ``staging``; returns the shard records."""
    from vidssl.shard.writer import ShardWriter  # noqa: PLC0415 - keep `import vidssl.data` light

    shards = index["shards"]
    cap_samples = max(int(s["samples"]) for s in shards)
    cap_bytes = max(int(s.get("bytes") or 0) for s in shards) or None
    prefix = str((index.get("settings") or {}).get("prefix") or index.get("name") or "subset")
    prefix = "".join(c if c.isalnum() or c in "_-" else "_" for c in prefix) or "subset"
    mp4_tmp = os.path.join(staging, ".mp4.tmp")
    records: list[dict[str, Any]] = []
    writer: ShardWriter | None = None
    handles: dict[int, Any] = {}
    try:
        for e in chosen:
            fh = handles.get(e.shard)
            if fh is None:
                for old in handles.values():  # chosen is in source order: one shard open at a time
                    old.close()
                handles.clear()
                fh = handles[e.shard] = open(os.path.join(src, shards[e.shard]["name"]), "rb")
            data: dict[str, bytes] = {}
            for ext, offset, size in e.members:
                fh.seek(offset)
                data[ext] = fh.read(size)
                if len(data[ext]) != size:
                    raise UserError(f"dataset {src!r}: {shards[e.shard]['name']} changed while being read")
            with open(mp4_tmp, "wb") as out:  # ShardWriter streams the clip from a file
                out.write(data["mp4"])
            extra = ShardWriter.sample_bytes(data["json"], len(data["mp4"]), data.get("cls"))
            if writer is not None and (writer.samples >= cap_samples or (
                    cap_bytes is not None and writer.final_size_if_added(extra) > cap_bytes)):
                records.append(writer.commit())
                writer = None
            if writer is None:
                writer = ShardWriter(staging, f"{prefix}-{len(records):06d}.tar")
            writer.add(e.key, data["json"], mp4_tmp, data.get("cls"), e.frames, e.seconds)
        if writer is not None:
            records.append(writer.commit())
            writer = None
    finally:
        for fh in handles.values():
            fh.close()
        if writer is not None:
            writer.abort()
        if os.path.exists(mp4_tmp):
            os.unlink(mp4_tmp)
    return records


def make_subset(dataset: str | Path, fraction: float, seed: int, out_dir: str | Path, *,
                min_per_class: int = 1) -> dict[str, Any]:
    """Write a stratified ``fraction`` of the labelled samples of local ``dataset`` to ``out_dir``.

    Returns ``{"dataset": str(out_dir), "samples", "per_class": {class name: n} (every class, 0
    for classes the source lacks), "unlabelled_skipped", "source_samples", "missing_classes":
    [names of classes with no sample in the source], "reused": bool}``.
    Raises UserError for bad arguments (naming ``label_fraction``, ``seed``, ``min_per_class``),
    remote or malformed datasets, a source without labelled samples, or an ``out_dir`` that is
    the source itself or a non-empty folder that is not a vidssl dataset.
    """
    fraction = _check_args(fraction, seed, min_per_class)
    src = _local_dataset(dataset)
    out = os.path.abspath(os.fspath(out_dir))
    open_index(src)  # the loader's checks and messages: missing index, wrong format, no samples
    index_path = os.path.join(src, "index.json")
    index = _load_json(index_path)
    if not isinstance(index, dict):
        raise UserError(f"dataset {src!r}: cannot read {index_path}")
    if os.path.realpath(out) == os.path.realpath(src):
        raise UserError(f"{_FIELD}: the subset folder {out!r} is the source dataset itself; choose another folder")
    ident = {"source_index_sha256": _file_sha256(index_path), "fraction": fraction, "seed": seed,
             "min_per_class": min_per_class}
    existing = _reusable(out, ident)
    if existing is not None:
        return _summary(out, existing, reused=True)
    if not _looks_replaceable(out):
        raise UserError(f"{_FIELD}: {out!r} exists and is neither empty nor a vidssl dataset; refusing to "
                        f"replace it with the label subset (choose another folder)")

    # ---- read every sample's key and label (json + cls members only) ------------------------
    classes = [str(c) for c in index.get("classes") or []]
    entries: list[_Entry] = []
    for i, s in enumerate(index["shards"]):
        if int(s["samples"]) == 0:
            continue
        path = os.path.join(src, str(s["name"]))
        got = _read_shard(path, i, f"dataset {src!r}: {s['name']}")
        if len(got) != int(s["samples"]):
            raise UserError(f"dataset {src!r}: {s['name']} holds {len(got)} samples, index.json says "
                            f"{s['samples']} (check it with 'vidssl shard verify')")
        entries.extend(got)
    seen: set[str] = set()
    by_label: dict[int, list[_Entry]] = {}
    unlabelled = 0
    for e in entries:
        if e.key in seen:
            raise UserError(f"dataset {src!r}: key {e.key!r} appears twice (check it with 'vidssl shard verify')")
        seen.add(e.key)
        if e.label < 0:
            unlabelled += 1
            continue
        if classes and e.label >= len(classes):
            raise UserError(f"dataset {src!r}: sample {e.key!r} has label {e.label}, outside the "
                            f"{len(classes)} classes of index.json")
        by_label.setdefault(e.label, []).append(e)
    if not by_label:
        raise UserError(f"{_FIELD}: dataset {src!r} has no labelled samples ({unlabelled} unlabelled); "
                        f"a label subset needs labels")
    names = classes or [str(i) for i in range(max(by_label) + 1)]

    # ---- choose: per class, the lowest sha256(seed:label:key) ranks --------------------------
    keep: set[str] = set()
    keys_per_class: dict[str, list[str]] = {}
    per_class: dict[str, int] = {}
    source_per_class: dict[str, int] = {}
    for label, name in enumerate(names):
        members = by_label.get(label, [])
        k = _count(fraction, len(members), min_per_class)
        picked = sorted(members, key=lambda e: (_rank(seed, label, e.key), e.key))[:k]
        keep.update(e.key for e in picked)
        keys_per_class[name] = sorted(e.key for e in picked)
        per_class[name] = k
        source_per_class[name] = len(members)
    missing = [name for name in names if source_per_class[name] == 0]
    chosen = [e for e in entries if e.key in keep]  # source order: shard by shard, as written
    if not chosen:
        raise UserError(f"min_per_class: got 0 and {_FIELD} {fraction} rounds every class to 0 samples; "
                        f"nothing to write")

    # ---- write into a temporary folder next to out_dir, then rename it into place ------------
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(out)
    staging = os.path.join(parent, f".{base}.subset-tmp-{os.getpid()}-{secrets.token_hex(4)}")
    os.mkdir(staging)
    try:
        from vidssl.shard.pipeline import library_versions  # noqa: PLC0415
        from vidssl.fsio import atomic_write_bytes, atomic_write_json, fsync_dir  # noqa: PLC0415

        records = _write(src, index, chosen, staging)
        sub = {"source": src, "source_name": index.get("name"), **ident,
               "selection": "per class: the max(min_per_class, round_half_up(fraction * n)) samples with the "
                            "lowest sha256('{seed}:{label}:{key}')",
               "source_samples": len(entries), "unlabelled_skipped": unlabelled,
               "per_class": per_class, "source_per_class": source_per_class, "missing_classes": missing}
        atomic_write_json(os.path.join(staging, KEYS_FILE),
                          {"source": src, "fraction": fraction, "seed": seed, "min_per_class": min_per_class,
                           "classes": names, "keys": keys_per_class})
        atomic_write_bytes(os.path.join(staging, "errors.jsonl"), b"")
        new_index = {
            "format": index["format"], "version": index["version"],
            "name": f"{index.get('name') or os.path.basename(src)}-subset",
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "settings": index.get("settings", {}), "classes": classes, "shards": records,
            "totals": {"shards": len(records), "samples": sum(r["samples"] for r in records),
                       "frames": sum(r["frames"] for r in records),
                       "seconds": round(sum(r["seconds"] for r in records), 6),
                       "bytes": sum(r["bytes"] for r in records),
                       "rejected": 0, "dropped_short": 0, "skipped": 0},
            "versions": library_versions(),
            "subset": sub,
        }
        atomic_write_json(os.path.join(staging, "index.json"), new_index)  # last: marks it complete
        _swap_in(staging, out, ident)
        staging = ""
        fsync_dir(parent)
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)
    final = _reusable(out, ident)
    return _summary(out, final if final is not None else new_index, reused=False)


def _swap_in(staging: str, out: str, ident: dict[str, Any]) -> None:
    """Rename the finished ``staging`` folder to ``out``. An old ``out`` is moved aside first and
    deleted after, so ``out`` is at every moment absent, the old folder or the new one. If another
    process put the same subset in place meanwhile, theirs is kept and ours dropped."""
    old = ""
    if os.path.lexists(out):
        old = f"{staging}.old"
        os.rename(out, old)
    try:
        os.rename(staging, out)
    except OSError:
        if _reusable(out, ident) is None:
            if old and not os.path.lexists(out):
                os.rename(old, out)  # put the previous folder back
            raise
        shutil.rmtree(staging, ignore_errors=True)
    if old:
        if os.path.islink(old):
            os.unlink(old)
        else:
            shutil.rmtree(old, ignore_errors=True)
