"""SOURCE expansion: files, directories, globs and manifests → an ordered list of inputs.

The order is a pure function of the SOURCE list and the file system (directories and globs are
sorted), so shard ids derived from it are stable across reruns. Problems with one row (a
missing file, a duplicate) become pre-rejected inputs that end up in errors.jsonl in order;
problems with the arguments themselves (a SOURCE that does not exist, a manifest without a
``path`` column) raise :class:`UserError`.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from vidssl.errors import UserError

MANIFEST_EXTS = (".csv", ".jsonl")
# Files with these extensions are treated as videos: a failed probe is an error with a reason.
VIDEO_EXTS = {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".m2ts", ".mts",
              ".flv", ".wmv", ".3gp", ".ogv", ".h264", ".264", ".hevc", ".265", ".y4m", ".gif", ".mxf",
              ".vob", ".dv", ".nut", ".ivf", ".asf", ".rm", ".rmvb", ".f4v"}
# Files with these extensions are never videos: skipped without probing inside directories.
SKIP_EXTS = {".csv", ".jsonl", ".json", ".txt", ".md", ".yaml", ".yml", ".tar", ".py", ".log", ".html",
             ".xml", ".pdf", ".zip", ".gz", ".tmp", ".partial", ".cls"}
_GLOB_CHARS = re.compile(r"[*?\[]")
_RESERVED = {"path", "label", "start", "end"}


@dataclass
class InputItem:
    """One input video (or one manifest span of it), in SOURCE order."""

    path: str  # absolute
    label: Any = None  # raw label from the manifest: class name (str) or index (int)
    start: float | None = None  # manifest span, source seconds
    end: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    strict: bool = True  # False: found by sniffing a directory; a non-video is skipped silently
    error: tuple[str, str] | None = None  # (stage, reason) when rejected before probing
    origin: str = ""  # where it came from (manifest:line), for messages

    def ident(self) -> str:
        """Stable identity used for keys, dedup and the input fingerprint."""
        span = "" if self.start is None and self.end is None else f"{self.start}:{self.end}"
        return f"{self.path}\0{span}"


def printable(text: str) -> str:
    """``text`` as valid Unicode for JSON: a file name that is not UTF-8 (bytes kept by Python as
    lone surrogates) gets its odd bytes written as ``\\xNN``; ordinary text is returned as is."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def slug(text: str, limit: int = 40) -> str:
    """A readable key part: ASCII letters/digits/-/_ only (no dots: webdataset splits keys on them)."""
    out = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")
    return (out[:limit].rstrip("_") or "clip")


def make_key(path: str, span: str) -> str:
    """Sample key from the source path and clip span alone (never from run order).

    ``span``: ``"full"`` for a whole video, else the planned ``"START-END"`` in seconds.
    """
    digest = hashlib.sha1(f"{path}\0{span}".encode("utf-8", "surrogateescape")).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"{slug(stem)}_{digest}"


def _float_or_none(value: Any, what: str) -> float | None:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{what}: got {value!r}; expected seconds")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: got {value!r}; expected seconds") from None
    if out != out or out < 0:
        raise ValueError(f"{what}: got {value!r}; expected seconds >= 0")
    return out


def _rows_from_manifest(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs; raises UserError for a manifest that cannot be used at all."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:  # -sig: Excel writes a BOM
            if path.lower().endswith(".csv"):
                reader = csv.DictReader(fh)
                if not reader.fieldnames or "path" not in [f.strip() for f in reader.fieldnames]:
                    raise UserError(f"manifest {path!r}: needs a 'path' column; found columns "
                                    f"{reader.fieldnames or []}")
                rows = []
                for i, row in enumerate(reader, start=2):
                    if None in row:  # more cells than header columns
                        raise UserError(f"manifest {path!r} line {i}: more cells than header columns")
                    rows.append((i, {k.strip(): v for k, v in row.items()}))
                return rows
            rows = []
            for i, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"manifest {path!r} line {i}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict) or "path" not in row:
                    raise UserError(f"manifest {path!r} line {i}: expected a JSON object with a 'path' field")
                rows.append((i, row))
            return rows
    except UnicodeDecodeError as exc:
        raise UserError(f"manifest {path!r}: not UTF-8 text ({exc.reason})") from None
    except OSError as exc:
        raise UserError(f"manifest {path!r}: cannot read ({exc.strerror or exc})") from None


def _from_manifest(path: str) -> list[InputItem]:
    base = os.path.dirname(os.path.abspath(path))
    items = []
    for line, row in _rows_from_manifest(path):
        origin = f"{path}:{line}"
        raw = row.get("path")
        if not isinstance(raw, str) or not raw.strip():
            what = "empty 'path'" if raw is None or isinstance(raw, str) else f"'path' is {raw!r}, not a file path"
            items.append(InputItem(path=f"{path}:{line}", error=("read", f"manifest {origin}: {what}"),
                                   origin=origin))
            continue
        target = os.path.abspath(os.path.join(base, os.path.expanduser(raw.strip())))
        extra = {k: v for k, v in row.items() if k not in _RESERVED}
        label = row.get("label")
        if isinstance(label, str):
            label = label.strip() or None
        item = InputItem(path=target, label=label, extra=extra, origin=origin)
        try:
            item.start = _float_or_none(row.get("start"), "start")
            item.end = _float_or_none(row.get("end"), "end")
            if item.start is not None and item.end is not None and item.end <= item.start:
                raise ValueError(f"end ({item.end}) must be greater than start ({item.start})")
        except ValueError as exc:
            item.error = ("plan", f"manifest {origin}: {exc}")
        bad_label = isinstance(label, (bool, float, list, dict)) or (isinstance(label, int) and label < 0)
        if item.error is None and bad_label:
            item.error = ("plan", f"manifest {origin}: label {label!r}; expected a class name or an integer")
        if item.error is None and not os.path.exists(target):
            item.error = ("read", f"file not found (manifest {origin})")
        items.append(item)
    return items


def _walk(root: str, exclude: str | None) -> list[InputItem]:
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorted, hidden folders skipped (our own OUTDIR temp area is hidden), OUTDIR itself skipped.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (exclude is None or os.path.abspath(os.path.join(dirpath, d)) != exclude))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            ext = os.path.splitext(name)[1].lower()
            if ext in SKIP_EXTS:
                continue
            full = os.path.abspath(os.path.join(dirpath, name))
            items.append(InputItem(path=full, strict=ext in VIDEO_EXTS, origin=root))
    return items


def expand_sources(sources: list[str], exclude: str | None = None) -> list[InputItem]:
    """Expand SOURCE arguments in order; duplicates become pre-rejected items.

    ``exclude``: a folder never descended into (the OUTDIR, when it lies inside a source folder).
    """
    if not sources:
        raise UserError("no SOURCE given: pass video files, folders, globs or manifests (.csv/.jsonl)")
    exclude = os.path.abspath(exclude) if exclude else None
    items: list[InputItem] = []
    for src in sources:
        if not isinstance(src, str) or not src.strip():
            raise UserError(f"SOURCE {src!r}: empty")
        path = os.path.expanduser(src)
        if os.path.isdir(path):
            items.extend(_walk(path, exclude))
        elif os.path.lexists(path):
            if path.lower().endswith(MANIFEST_EXTS):
                items.extend(_from_manifest(path))
            else:
                items.append(InputItem(path=os.path.abspath(path), origin=src))
        elif _GLOB_CHARS.search(path):
            matches = sorted(glob.glob(path, recursive=True))
            if not matches:
                raise UserError(f"SOURCE {src!r}: the pattern matched no files")
            for m in matches:
                if os.path.isdir(m):
                    items.extend(_walk(m, exclude))
                elif m.lower().endswith(MANIFEST_EXTS):
                    items.extend(_from_manifest(m))
                else:
                    items.append(InputItem(path=os.path.abspath(m), origin=src))
        else:
            raise UserError(f"SOURCE {src!r}: no such file, folder or matching glob")
    # The same file (and span) twice would give two samples with the same key: keep the first.
    seen: dict[str, str] = {}
    for item in items:
        if item.error is not None:
            continue
        real = os.path.realpath(item.path)
        ident = f"{real}\0{item.start}:{item.end}"
        if ident in seen:
            item.error = ("plan", f"duplicate: the same file and span was already listed ({seen[ident]})")
        else:
            seen[ident] = item.origin or item.path
    return items


def resolve_labels(items: list[InputItem], classes: list[str] | None) -> tuple[list[str], list[tuple[int, str | None]]]:
    """Class list and (label index, label name) per item (-1, None when unlabelled).

    Labels are class names, or all integers (JSON ints or digit strings) meaning indices.
    Raises UserError when names and the fixed ``classes`` list disagree.
    """
    raw = [it.label for it in items if it.error is None and it.label is not None]
    as_int = all(isinstance(v, int) or (isinstance(v, str) and v.isdigit()) for v in raw) and bool(raw)
    if as_int and classes is None:
        n = max(int(v) for v in raw) + 1
        classes = [str(i) for i in range(n)]
    elif not as_int:
        names = sorted({str(v) for v in raw})
        if classes is None:
            classes = names
        else:
            missing = [n for n in names if n not in classes]
            if missing:
                raise UserError(f"classes: labels {missing[:5]} found in the manifests are not in the fixed "
                                f"class list {classes}")
    assert classes is not None
    out = []
    for it in items:
        if it.label is None or it.error is not None:
            out.append((-1, None))
        elif as_int:
            idx = int(it.label)
            if idx >= len(classes):
                raise UserError(f"label {idx} ({it.origin}): outside the class list of {len(classes)} classes")
            out.append((idx, classes[idx]))
        else:
            out.append((classes.index(str(it.label)), str(it.label)))
    return list(classes), out


def fingerprint(items: list[InputItem]) -> str:
    """Hash of the expanded input list: a resumed run must see the same inputs."""
    h = hashlib.sha256()
    for it in items:
        h.update(it.ident().encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    return h.hexdigest()
