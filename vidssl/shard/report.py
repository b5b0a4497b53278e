"""``vidssl shard report``: a static HTML page about a dataset (one file plus PNGs; opens from disk).

    make_report("shards/digits")                      # → shards/digits/report/report.html
    make_report("https://host/digits", "rep", per_class=2)

What it holds: the index's totals; a table per class (samples, seconds, frames) including classes
with no sample; histograms of clip duration, frames, resolution, fps and bytes per second of video;
thumbnails (first, middle and last frame) of at most ``per_class`` clips per class, drawn with a
seeded reservoir sample; the rejected inputs of ``errors.jsonl`` with their reasons; samples that
could not be read.

Reading: ``index.json`` does not hold per-sample metadata, so every shard is streamed once with the
loader's reader (:func:`vidssl.data.stream.read_segment`: local paths, http(s)://, fsspec URLs) to
read each ``KEY.json``; only the sampled clips are decoded. Images are written atomically.
"""

from __future__ import annotations

import html
import io
import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from vidssl.errors import UserError

__all__ = ["make_report", "scan_dataset", "DatasetScan", "default_outdir", "REPORT", "IMG"]

REPORT = "report.html"
IMG = "img"
THUMB_H = 96  # thumbnail height in pixels (aspect kept)
UNLABELLED = "(unlabelled)"


@dataclass
class DatasetScan:
    """What one pass over a dataset's shards found (metadata only, plus the sampled clips' bytes)."""

    location: str
    index: dict[str, Any]
    classes: list[str]
    samples: list[dict[str, Any]] = field(default_factory=list)   # key, shard, label, class, frames, fps, ...
    sampled: dict[str, list[tuple[dict, bytes]]] = field(default_factory=dict)  # class → [(meta, mp4)]
    failures: list[dict[str, Any]] = field(default_factory=list)  # shard, ordinal, kind, message
    errors: list[dict[str, Any]] = field(default_factory=list)    # errors.jsonl lines
    errors_note: str = ""


def default_outdir(dataset: str) -> str:
    """DATASET/report for a local dataset, ./shard-report for a remote one."""
    from vidssl.data.index import is_remote  # noqa: PLC0415

    if is_remote(dataset):
        return os.path.abspath("shard-report")
    base = os.path.dirname(dataset) if dataset.endswith(".json") else dataset
    return os.path.join(base or ".", "report")


def _base(location: str) -> str:
    from vidssl.data.index import is_remote  # noqa: PLC0415

    loc = location.rstrip("/") if len(location) > 1 else location
    if loc.endswith(".json"):
        return loc.rsplit("/", 1)[0] if is_remote(loc) else (os.path.dirname(loc) or ".")
    return loc


def _read_text(location: str, name: str, timeout: float) -> str | None:
    """The text of ``name`` next to index.json, or None when it does not exist."""
    from vidssl.data.index import ShardMissing, _join, open_stream  # noqa: PLC0415

    try:
        with open_stream(_join(_base(location), name), timeout) as f:
            return f.read().decode("utf-8", errors="replace")
    except ShardMissing:
        return None


def scan_dataset(location: str, per_class: int = 4, seed: int = 0, timeout: float = 60.0) -> DatasetScan:
    """Stream every shard once: per-sample metadata, a seeded reservoir of ``per_class`` clips per class."""
    from vidssl.data.index import open_index  # noqa: PLC0415
    from vidssl.data.stream import Failure, Sample, read_segment  # noqa: PLC0415

    idx = open_index(location, timeout)  # UserError naming the location when missing/invalid
    try:
        raw = json.loads(_read_text(location, "index.json", timeout) if not location.endswith(".json")
                         else _read_index_file(location, timeout))
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"dataset {location!r}: cannot re-read index.json ({exc})") from None
    scan = DatasetScan(location=location, index=raw, classes=list(idx.classes))
    rng = random.Random(seed)
    seen: Counter = Counter()
    for shard, url, n in idx.shards:
        for ordinal, item in read_segment(url, 0, n, timeout=timeout):
            if isinstance(item, Failure):
                scan.failures.append({"shard": shard, "ordinal": ordinal, "kind": item.kind, "message": item.message})
                continue
            if not isinstance(item, Sample):
                continue
            m = item.meta
            label = item.label
            cls = idx.classes[label] if 0 <= label < len(idx.classes) else (
                str(m.get("label_name")) if m.get("label_name") else UNLABELLED)
            frames, fps = int(m.get("frames") or 0), float(m.get("fps") or 0.0)
            seconds = frames / fps if fps > 0 else 0.0
            scan.samples.append({"key": item.key, "shard": shard, "label": label, "class": cls, "frames": frames,
                                 "fps": fps, "width": int(m.get("width") or 0), "height": int(m.get("height") or 0),
                                 "seconds": seconds, "bytes": len(item.data),
                                 "bytes_per_second": len(item.data) / seconds if seconds > 0 else 0.0,
                                 "source": m.get("source")})
            seen[cls] += 1
            if per_class > 0:  # reservoir sampling: every clip of the class equally likely, seeded
                res = scan.sampled.setdefault(cls, [])
                if len(res) < per_class:
                    res.append((m, item.data))
                else:
                    j = rng.randrange(seen[cls])
                    if j < per_class:
                        res[j] = (m, item.data)
    text = _read_text(location, "errors.jsonl", timeout)
    if text is None:
        scan.errors_note = "no errors.jsonl next to index.json"
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
                scan.errors.append(e if isinstance(e, dict) else {"reason": line})
            except ValueError:
                scan.errors.append({"source": f"errors.jsonl line {i}", "reason": f"not JSON: {line[:200]}"})
    return scan


def _read_index_file(location: str, timeout: float) -> str:
    from vidssl.data.index import open_stream  # noqa: PLC0415

    with open_stream(location, timeout) as f:
        return f.read().decode("utf-8")


# ---- images -------------------------------------------------------------------------------------

def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _figure(width: float = 4.2, height: float = 2.8):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError:
        raise UserError("shard report: the histograms need matplotlib, a dependency of vidssl "
                        "(pip install 'matplotlib>=3.7')") from None
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_fig(fig, path: str) -> None:
    from vidssl.fsio import atomic_write_bytes  # noqa: PLC0415

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    atomic_write_bytes(path, buf.getvalue())


def _histograms(samples: list[dict[str, Any]], img_dir: str) -> list[tuple[str, str]]:
    """[(title, file name)] of the histogram PNGs written into ``img_dir``."""
    out = []
    numeric = [("clip duration (s)", "duration", [s["seconds"] for s in samples]),
               ("frames per clip", "frames", [s["frames"] for s in samples]),
               ("video kB per second", "kbps", [s["bytes_per_second"] / 1000 for s in samples])]
    for title, name, values in numeric:
        fig = _figure()
        ax = fig.add_subplot(1, 1, 1)
        ax.hist(values, bins=min(30, max(1, len(set(values)))), color="#4a78b5")
        ax.set_xlabel(title)
        ax.set_ylabel("clips")
        ax.set_title(f"{title}: {len(values)} clips", fontsize=9)
        _save_fig(fig, os.path.join(img_dir, f"hist-{name}.png"))
        out.append((title, f"hist-{name}.png"))
    categorical = [("resolution (width x height)", "resolution", [f"{s['width']}x{s['height']}" for s in samples]),
                   ("fps", "fps", [f"{s['fps']:g}" for s in samples])]
    for title, name, values in categorical:
        counts = Counter(values).most_common(30)
        fig = _figure()
        ax = fig.add_subplot(1, 1, 1)
        ax.bar(range(len(counts)), [c for _, c in counts], color="#4a78b5")
        ax.set_xticks(range(len(counts)))
        ax.set_xticklabels([k for k, _ in counts], rotation=45 if len(counts) > 4 else 0, ha="right"
                           if len(counts) > 4 else "center", fontsize=7)
        ax.set_ylabel("clips")
        ax.set_title(f"{title}{' (30 most common)' if len(set(values)) > 30 else ''}", fontsize=9)
        _save_fig(fig, os.path.join(img_dir, f"hist-{name}.png"))
        out.append((title, f"hist-{name}.png"))
    return out


def _thumbnail(meta: dict, data: bytes, path: str) -> list[int]:
    """First, middle and last frame side by side, THUMB_H tall; returns the frame numbers."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    from vidssl.data.decode import make_decoder  # noqa: PLC0415
    from vidssl.fsio import atomic_write_bytes  # noqa: PLC0415

    n = int(meta["frames"])
    want = sorted({0, n // 2, n - 1})
    frames = make_decoder("pyav").decode(data, want, meta)  # (k, H, W, 3)
    h, w = frames.shape[1:3]
    tw = max(1, round(w * THUMB_H / h))
    strip = np.full((THUMB_H, len(want) * tw + (len(want) - 1) * 2, 3), 255, dtype=np.uint8)
    for i, f in enumerate(frames):
        small = np.asarray(Image.fromarray(f).resize((tw, THUMB_H), Image.BILINEAR))
        strip[:, i * (tw + 2):i * (tw + 2) + tw] = small
    atomic_write_bytes(path, _png_bytes(Image.fromarray(strip)))
    return want


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:80] or "x"


# ---- page ---------------------------------------------------------------------------------------

_CSS = """body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
th{background:#eee}td.n{text-align:right}.warn{color:#b00}.hists img{margin:4px;border:1px solid #ddd}
.thumbs{display:flex;flex-wrap:wrap;gap:10px}.thumb{font-size:11px}.thumb img{display:block}
code{background:#f4f4f4;padding:0 3px}"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _table(head: list[str], rows: list[list[Any]], numeric: set[int] = frozenset(), cls: str = "") -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td{' class=n' if i in numeric else ''}>{_e(c)}</td>" for i, c in enumerate(r))
                   + "</tr>\n" for r in rows)
    return f"<table{f' class={cls}' if cls else ''}><tr>{th}</tr>\n{body}</table>\n"


# A few lines of plain JavaScript (no framework), run once the page has loaded: the number of images
# that failed to load goes on <body> (data-broken-images, read by the browser test) and, when not 0,
# into a warning at the top of the page, so a report copied without its img/ folder says so.
_SELF_CHECK = """<script>
window.addEventListener("load", function () {
  var imgs = document.images, broken = 0;
  for (var i = 0; i < imgs.length; i++) { if (!imgs[i].complete || imgs[i].naturalWidth === 0) broken++; }
  document.body.setAttribute("data-images", String(imgs.length));
  document.body.setAttribute("data-broken-images", String(broken));
  if (broken) {
    var p = document.createElement("p");
    p.className = "warn";
    p.textContent = broken + " of " + imgs.length + " images failed to load (is the img/ folder next to this page?)";
    document.body.insertBefore(p, document.body.firstChild);
  }
});
</script>
"""


def make_report(dataset: str, outdir: str | None = None, per_class: int = 4, seed: int = 0,
                timeout: float = 60.0) -> str:
    """Write ``OUTDIR/report.html`` and ``OUTDIR/img/*.png``; return the path of report.html."""
    from vidssl.fsio import atomic_write_bytes  # noqa: PLC0415

    if per_class < 0:
        raise UserError(f"--per-class: got {per_class}; allowed: >= 0 (0: no thumbnails)")
    out = outdir or default_outdir(dataset)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"report output {out!r} exists and is not a folder")
    scan = scan_dataset(dataset, per_class=per_class, seed=seed, timeout=timeout)
    img_dir = os.path.join(out, IMG)
    try:
        os.makedirs(img_dir, exist_ok=True)
    except OSError as exc:
        raise UserError(f"report output {out!r}: cannot create it ({exc})") from None

    idx = scan.index
    totals = idx.get("totals") or {}
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset=utf-8><title>vidssl dataset report: {_e(idx.get('name'))}"
             f"</title><style>{_CSS}</style></head><body>\n",
             f"<h1>Dataset <code>{_e(idx.get('name'))}</code></h1>\n<p>{_e(scan.location)}; created "
             f"{_e(idx.get('created'))}; report: {per_class} thumbnail clips per class, seed {seed}.</p>\n"]

    parts.append("<h2 id=totals>Totals (index.json)</h2>\n")
    parts.append(_table(["", "value"], [[k, v] for k, v in totals.items()] + [["classes", len(scan.classes)]],
                        numeric={1}))
    n_idx = sum(int(s.get("samples", 0)) for s in idx.get("shards") or [])
    if len(scan.samples) != n_idx:
        parts.append(f"<p class=warn>read {len(scan.samples)} samples; the index lists {n_idx} "
                     f"({len(scan.failures)} could not be read, see below).</p>\n")

    by_class: dict[str, list[dict]] = {}
    for s in scan.samples:
        by_class.setdefault(s["class"], []).append(s)
    names = list(scan.classes) + sorted(c for c in by_class if c not in scan.classes)
    rows = []
    for c in names:
        ss = by_class.get(c, [])
        rows.append([c, len(ss), f"{sum(s['seconds'] for s in ss):.1f}", sum(s["frames"] for s in ss),
                     f"{100 * len(ss) / max(1, len(scan.samples)):.1f}%"])
    parts.append("<h2 id=classes>Classes</h2>\n")
    parts.append(_table(["class", "samples", "seconds", "frames", "share"], rows, numeric={1, 2, 3, 4},
                        cls="classes"))
    empty = [c for c in names if not by_class.get(c)]
    if empty:
        parts.append(f"<p class=warn>classes with no sample: {_e(', '.join(empty))}</p>\n")

    if scan.samples:
        parts.append("<h2 id=histograms>Histograms</h2>\n<div class=hists>\n")
        for title, fname in _histograms(scan.samples, img_dir):
            parts.append(f"<img src=\"{IMG}/{_e(fname)}\" alt=\"{_e(title)}\" title=\"{_e(title)}\">\n")
        parts.append("</div>\n")

    if per_class > 0 and scan.sampled:
        parts.append(f"<h2 id=thumbnails>Thumbnails</h2>\n<p>First, middle and last frame of up to {per_class} "
                     f"clips per class (a seeded random sample; only these clips were decoded).</p>\n")
        for c in names:
            picks = sorted(scan.sampled.get(c, []), key=lambda md: str(md[0].get("key")))
            if not picks:
                continue
            parts.append(f"<h3>{_e(c)} ({len(by_class.get(c, []))} samples)</h3>\n<div class=thumbs>\n")
            for meta, data in picks:
                key = str(meta.get("key"))
                fname = f"thumb-{_safe(c)}-{_safe(key)}.png"
                try:
                    idxs = _thumbnail(meta, data, os.path.join(img_dir, fname))
                except Exception as exc:  # noqa: BLE001 - one bad clip must not stop the report
                    parts.append(f"<div class='thumb warn'>{_e(key)}: cannot decode ({_e(exc)})</div>\n")
                    continue
                parts.append(f"<div class=thumb><img src=\"{IMG}/{_e(fname)}\" alt=\"{_e(key)}\">{_e(key)} "
                             f"{meta.get('width')}x{meta.get('height')} {meta.get('frames')} frames "
                             f"@ {float(meta.get('fps') or 0):g} fps; frames {idxs}</div>\n")
            parts.append("</div>\n")

    parts.append(f"<h2 id=rejected>Rejected inputs (errors.jsonl): {len(scan.errors)}</h2>\n")
    if scan.errors_note:
        parts.append(f"<p>{_e(scan.errors_note)}</p>\n")
    elif scan.errors:
        parts.append(_table(["source", "stage", "reason", "span"],
                            [[e.get("source", ""), e.get("stage", ""), e.get("reason", ""),
                              f"{e['start']}-{e.get('end')}" if "start" in e else ""] for e in scan.errors],
                            cls="rejected"))
    else:
        parts.append("<p>none</p>\n")
    if scan.failures:
        parts.append(f"<h2 id=unreadable>Samples that could not be read: {len(scan.failures)}</h2>\n")
        parts.append(_table(["shard", "ordinal", "kind", "message"],
                            [[f["shard"], f["ordinal"], f["kind"], f["message"]] for f in scan.failures]))
    parts.append(_SELF_CHECK)
    parts.append("</body></html>\n")
    path = os.path.join(out, REPORT)
    atomic_write_bytes(path, "".join(parts).encode("utf-8"))
    return path
