"""The output folder shared by the footage generators: overwrite policy, marker, atomic writes.

Policy: a new or empty folder is used as is; a folder holding a previous footage output
(recognised by ``footage.json`` with ``"format": "vidssl-footage"``, written *first* by every
run, so even a killed run is recognised) is overwritten: its ``labels.csv``, ``footage.json``
and the videos it wrote (named by its settings in the marker, with their ``.part`` leftovers) are
removed before anything new is written, so no stale video survives next to the new labels. Any
other non-empty folder is refused (a :class:`UserError`) unless ``force`` is set, in which case
files are written into it. Files the footage run did not write itself are never deleted or
overwritten: a run that would write over one (``footage.json``, ``labels.csv``, a video of the
same name) is refused before it touches anything.
``labels.csv`` is always written last: its presence means the output is complete.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from vidssl.errors import UserError
from vidssl.fsio import atomic_write_json, atomic_write_text

MARKER = "footage.json"
FORMAT = "vidssl-footage"
LABELS = "labels.csv"
VIDEOS = "videos"
PART = ".part"  # suffix of files being written; renamed to their final name when complete


def is_footage_output(outdir: Path) -> bool:
    """True when ``outdir`` holds a (possibly incomplete) previous footage output."""
    return previous_files(outdir) is not None


def previous_files(outdir: Path) -> set[str] | None:
    """Paths (relative to ``outdir``) that the previous footage output there wrote, or None if there is none.

    Derived from the marker's ``kind`` and ``settings``: digits wrote ``videos/NNNNNN.mp4`` for
    ``settings.videos`` videos, samples ``videos/<clip>`` for ``settings.clips``. Files someone
    else put into the folder are not in the set.
    """
    try:
        data = json.loads((outdir / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return None
    settings = data.get("settings") if isinstance(data.get("settings"), dict) else {}
    owned = {MARKER, LABELS}
    if data.get("kind") == "digits" and isinstance(settings.get("videos"), int):
        owned.update(f"{VIDEOS}/{i:06d}.mp4" for i in range(settings["videos"]))
    elif data.get("kind") == "samples" and isinstance(settings.get("clips"), list):
        owned.update(f"{VIDEOS}/{name}" for name in settings["clips"] if isinstance(name, str) and "/" not in name)
    return owned


def check_outdir(outdir: str | Path, *, force: bool = False, files: Iterable[str] = ()) -> str:
    """Apply the overwrite policy without touching anything.

    Returns ``"new"`` (missing or empty), ``"previous"`` (a previous footage output, to be
    overwritten) or ``"forced"`` (non-empty, unrelated, allowed by ``force``); raises
    :class:`UserError` otherwise. ``files``: paths relative to ``outdir`` the run will write
    besides the marker and ``labels.csv``; if one of them (or the marker, or ``labels.csv``)
    exists and was not written by a previous footage output there, the run is refused: the
    user's files are never overwritten.
    """
    return _check(Path(outdir), force, files)[0]


def _check(out: Path, force: bool, files: Iterable[str]) -> tuple[str, set[str]]:
    """:func:`check_outdir`, also returning the previous output's own files (empty if none)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"OUTDIR {str(out)!r} exists and is not a folder; give a new or empty folder")
    if not out.is_dir() or not any(out.iterdir()):
        return "new", set()
    owned = previous_files(out)
    if owned is None and not force:
        raise UserError(f"OUTDIR {str(out)!r} is not empty and holds no previous footage output "
                        f"(no {MARKER}); choose a new or empty folder, or pass --force to write into it")
    owned = owned or set()
    listings: dict[Path, set[str]] = {}  # one listing per folder, not one stat per file

    def exists(name: str) -> bool:
        parent = (out / name).parent
        if parent not in listings:
            listings[parent] = {p.name for p in parent.iterdir()} if parent.is_dir() else set()
        return Path(name).name in listings[parent]

    taken = [name for name in itertools.chain((MARKER, LABELS), files) if name not in owned and exists(name)]
    if taken:
        raise UserError(f"OUTDIR {str(out)!r}: {len(taken)} of the files this run would write already exist "
                        f"and were not written by a footage run ({', '.join(taken[:3])}"
                        f"{', ...' if len(taken) > 3 else ''}); footage never overwrites them: move them or "
                        f"choose a new or empty folder")
    return ("previous" if MARKER in owned else "forced"), owned


def prepare_outdir(outdir: str | Path, *, kind: str, settings: Mapping[str, Any],
                   force: bool = False, files: Iterable[str] = ()) -> Path:
    """Check the overwrite policy, clear a previous footage output, write the marker.

    ``files``: the paths (relative to ``outdir``) the run will write, see :func:`check_outdir`.
    Returns the folder as a :class:`Path` with ``videos/`` created.
    """
    out = Path(outdir)
    state, owned = _check(out, force, files)
    if state == "previous":
        # Remove what the previous footage run wrote (and only that), so nothing stale is left behind.
        (out / LABELS).unlink(missing_ok=True)  # first: the folder no longer claims to be complete
        vids = out / VIDEOS
        if vids.is_dir():
            for p in vids.iterdir():
                rel = f"{VIDEOS}/{p.name[:-len(PART)] if p.name.endswith(PART) else p.name}"
                if p.is_file() and rel in owned:
                    p.unlink()
        (out / MARKER).unlink(missing_ok=True)
    try:
        (out / VIDEOS).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"OUTDIR {str(out)!r}: cannot create it: {exc.strerror or exc}") from None
    marker = {"format": FORMAT, "version": 1, "kind": kind, "complete_when": LABELS,
              "settings": dict(settings)}
    atomic_write_json(out / MARKER, marker, indent=2, sort_keys=True)
    return out


def write_labels(outdir: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``labels.csv`` (atomically, with ``\\n`` line ends so bytes do not vary by platform)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow(row)
    path = Path(outdir) / LABELS
    atomic_write_text(path, buf.getvalue())
    return path


def read_labels(outdir: str | Path) -> list[dict[str, str]]:
    """Rows of ``OUTDIR/labels.csv`` as dicts of strings (a helper for tests and tools)."""
    path = Path(outdir) / LABELS
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        raise UserError(f"{str(path)!r} does not exist: not a complete footage output") from None
