"""The output folder shared by the footage generators: overwrite policy, marker, atomic writes.

Policy: a new or empty folder is used as is; a folder holding a previous footage output
(recognised by ``footage.json`` with ``"format": "vidssl-footage"``, written *first* by every
run, so even a killed run is recognised) is overwritten: its ``labels.csv``, ``footage.json``
and ``videos/*.mp4``/``*.part`` are removed before anything new is written, so no stale video
survives next to the new labels. Any other non-empty folder is refused (a :class:`UserError`)
unless ``force`` is set, in which case files are written into it and nothing is deleted.
``labels.csv`` is always written last: its presence means the output is complete.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from vidssl.errors import UserError

MARKER = "footage.json"
FORMAT = "vidssl-footage"
LABELS = "labels.csv"
VIDEOS = "videos"
PART = ".part"  # suffix of files being written; renamed to their final name when complete


def is_footage_output(outdir: Path) -> bool:
    """True when ``outdir`` holds a (possibly incomplete) previous footage output."""
    try:
        data = json.loads((outdir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def check_outdir(outdir: str | Path, *, force: bool = False) -> str:
    """Apply the overwrite policy without touching anything.

    Returns ``"new"`` (missing or empty), ``"previous"`` (a previous footage output, to be
    overwritten) or ``"forced"`` (non-empty, unrelated, allowed by ``force``); raises
    :class:`UserError` otherwise.
    """
    out = Path(outdir)
    if out.exists() and not out.is_dir():
        raise UserError(f"OUTDIR {str(out)!r} exists and is not a folder; give a new or empty folder")
    if not out.is_dir() or not any(out.iterdir()):
        return "new"
    if is_footage_output(out):
        return "previous"
    if force:
        return "forced"
    raise UserError(f"OUTDIR {str(out)!r} is not empty and holds no previous footage output "
                    f"(no {MARKER}); choose a new or empty folder, or pass --force to write into it")


def prepare_outdir(outdir: str | Path, *, kind: str, settings: Mapping[str, Any],
                   force: bool = False) -> Path:
    """Check the overwrite policy, clear a previous footage output, write the marker.

    Returns the folder as a :class:`Path` with ``videos/`` created.
    """
    out = Path(outdir)
    if check_outdir(out, force=force) == "previous":
        # Ours: remove everything a footage run writes, so nothing stale is left behind.
        (out / LABELS).unlink(missing_ok=True)  # first: the folder no longer claims to be complete
        vids = out / VIDEOS
        if vids.is_dir():
            for p in vids.iterdir():
                if p.is_file() and (p.suffix == ".mp4" or p.name.endswith(PART)):
                    p.unlink()
        (out / MARKER).unlink(missing_ok=True)
    try:
        (out / VIDEOS).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"OUTDIR {str(out)!r}: cannot create it: {exc.strerror or exc}") from None
    marker = {"format": FORMAT, "version": 1, "kind": kind, "complete_when": LABELS,
              "settings": dict(settings)}
    write_atomic(out / MARKER, (json.dumps(marker, indent=2, sort_keys=True) + "\n").encode())
    return out


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary name and a rename (no half-written final file)."""
    tmp = path.with_name(path.name + PART)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_labels(outdir: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``labels.csv`` (atomically, with ``\\n`` line ends so bytes do not vary by platform)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow(row)
    path = Path(outdir) / LABELS
    write_atomic(path, buf.getvalue().encode("utf-8"))
    return path


def read_labels(outdir: str | Path) -> list[dict[str, str]]:
    """Rows of ``OUTDIR/labels.csv`` as dicts of strings (a helper for tests and tools)."""
    path = Path(outdir) / LABELS
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        raise UserError(f"{str(path)!r} does not exist: not a complete footage output") from None
