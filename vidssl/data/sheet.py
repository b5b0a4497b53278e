"""Contact sheets of loader batches: what the model receives, as a PNG (``vidssl data peek --save``).

One row per sample; every window the mode produces side by side (ssl: context | future | other;
clip: the clip; views: each view), the source frame number (``batch["frame_indices"]``) under every
frame, the key, label and row status in the left margin. Frames are the uint8 pixels of the batch
(after augmentation, before normalisation), copied unchanged; ``scale`` > 1 enlarges them by
repeating pixels (nearest neighbour), so values are still exact. Padding rows (``valid`` False) say
``padding`` in red in the margin.

Drawing uses Pillow only (no matplotlib state): fast enough to run on every peek.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from vidssl.data.windows import SSL_WINDOWS

__all__ = ["SheetWindow", "SheetRow", "Layout", "rows_from_batch", "layout", "draw_sheet", "save_png",
           "auto_scale", "PAD", "HEADER_H", "FRAME_GAP", "WINDOW_GAP", "LABEL_H", "ROW_GAP", "LINE_H",
           "MARGIN_MIN", "BACKGROUND", "PADDING_RGB"]

PAD = 4            # outer border, pixels
HEADER_H = 14      # window names above the first row
FRAME_GAP = 2      # between two frames of a window
WINDOW_GAP = 10    # between two windows of a row
LABEL_H = 12       # frame-number strip under every frame
ROW_GAP = 4        # between rows
LINE_H = 11        # one margin text line
MARGIN_MIN = 120   # smallest margin width (key, label, status)
KEY_CHARS = 24     # a key is wrapped to lines of this many characters
BACKGROUND = (24, 24, 24)
TEXT_RGB = (230, 230, 230)
DIM_RGB = (150, 150, 150)
PADDING_RGB = (255, 40, 40)
SEPARATOR_RGB = (90, 90, 200)


@dataclass
class SheetWindow:
    name: str
    frames: np.ndarray          # (T, H, W, 3) uint8, a copy of the batch's pixels
    indices: list[int]          # source frame numbers, one per frame (may be empty if unknown)


@dataclass
class SheetRow:
    key: str
    label: int
    label_name: str
    valid: bool
    windows: list[SheetWindow]
    batch: int = 1              # 1-based batch number (for the margin and batch separators)
    row: int = 0                # row within its batch

    def margin_lines(self) -> list[tuple[str, tuple[int, int, int]]]:
        key = self.key or "-"
        lines = [(key[i:i + KEY_CHARS], TEXT_RGB) for i in range(0, len(key), KEY_CHARS)]
        lines.append((f"label {self.label} {self.label_name}", TEXT_RGB))
        lines.append((f"batch {self.batch} row {self.row}", DIM_RGB))
        if not self.valid:
            lines.append(("padding (valid=False)", PADDING_RGB))
        return lines


def _np(x: Any) -> np.ndarray:
    """A torch tensor (any device) or array-like as a numpy array (no copy when already on the CPU)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _frames(x: Any) -> np.ndarray:
    """(T, C, H, W) tensor/array → (T, H, W, 3) uint8 copy."""
    a = np.array(_np(x), copy=True)
    if a.ndim != 4:
        raise ValueError(f"a window of shape {a.shape}; expected (T, C, H, W)")
    a = a.transpose(0, 2, 3, 1)
    if a.dtype != np.uint8:
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] > 3:
        a = a[..., :3]
    return np.ascontiguousarray(a)


def _indices(fi: Any, i: int, v: int | None = None) -> list[int]:
    if fi is None:
        return []
    row = fi[i] if v is None else fi[i][v]
    return [int(k) for k in _np(row).reshape(-1).tolist()]


def rows_from_batch(batch: dict[str, Any], classes: Sequence[str] = (), batch_number: int = 1) -> list[SheetRow]:
    """The rows of one loader batch (ssl, clip or views), its pixels copied (batch buffers may be reused)."""
    fi = batch.get("frame_indices") or {}
    keys = list(batch.get("key") or [])
    labels = [int(v) for v in _np(batch["label"]).reshape(-1).tolist()] if "label" in batch else []
    valid = [bool(v) for v in _np(batch["valid"]).reshape(-1).tolist()] if "valid" in batch else []
    if "context" in batch:
        names = [n for n in SSL_WINDOWS if n in batch]
        n_rows = len(batch[names[0]])
    elif "video" in batch:
        names = ["video"]
        n_rows = len(batch["video"])
    else:
        raise ValueError(f"a batch without video windows (keys {sorted(batch)})")
    rows = []
    for i in range(n_rows):
        windows = []
        for name in names:
            x = batch[name][i]
            nd = np.ndim(x) if not hasattr(x, "dim") else x.dim()
            if nd == 5:  # views: (V, T, C, H, W)
                for v in range(len(x)):
                    windows.append(SheetWindow(f"view {v}", _frames(x[v]), _indices(fi.get(name), i, v)))
            else:
                windows.append(SheetWindow(name, _frames(x), _indices(fi.get(name), i)))
        label = labels[i] if i < len(labels) else -1
        name = classes[label] if 0 <= label < len(classes) else "-"
        rows.append(SheetRow(key=str(keys[i]) if i < len(keys) else "", label=label, label_name=str(name),
                             valid=valid[i] if i < len(valid) else True, windows=windows,
                             batch=batch_number, row=i))
    return rows


def auto_scale(rows: Sequence[SheetRow], min_height: int = 64, most: int = 4) -> int:
    """Integer enlargement so the smallest frame is at least ``min_height`` pixels tall (at most ``most``)."""
    heights = [w.frames.shape[1] for r in rows for w in r.windows if w.frames.size]
    if not heights:
        return 1
    return int(max(1, min(most, -(-min_height // max(1, min(heights))))))


def _font():
    from PIL import ImageFont  # noqa: PLC0415

    return ImageFont.load_default()


def _text_width(font, text: str) -> int:
    try:
        return int(np.ceil(font.getlength(text)))
    except AttributeError:  # pragma: no cover - very old Pillow
        return 6 * len(text)


@dataclass
class Layout:
    """Pixel geometry of a sheet: ``frame_box(r, j, t)`` is where frame t of window j of row r starts."""

    scale: int
    margin: int
    names: list[str]
    cells: list[tuple[int, int]]          # (width, height) of one frame cell per window column, scaled
    lengths: list[int]                    # frames per window column (the most any row has)
    row_h: int
    n_rows: int
    x0: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        x = self.margin
        self.x0 = []
        for (cw, _), t in zip(self.cells, self.lengths):
            self.x0.append(x)
            x += t * cw + max(0, t - 1) * FRAME_GAP + WINDOW_GAP
        self._right = x - WINDOW_GAP if self.cells else x

    @property
    def size(self) -> tuple[int, int]:
        return self._right + PAD, PAD + HEADER_H + self.n_rows * self.row_h + PAD

    def row_y(self, r: int) -> int:
        return PAD + HEADER_H + r * self.row_h

    def frame_box(self, r: int, j: int, t: int) -> tuple[int, int]:
        cw, _ = self.cells[j]
        return self.x0[j] + t * (cw + FRAME_GAP), self.row_y(r)


def layout(rows: Sequence[SheetRow], scale: int = 1) -> Layout:
    if scale < 1:
        raise ValueError(f"scale {scale}; allowed: >= 1")
    font = _font()
    names: list[str] = []
    cells: list[tuple[int, int]] = []
    lengths: list[int] = []
    for r in rows:
        for j, w in enumerate(r.windows):
            t, h, wd = w.frames.shape[:3]
            if j == len(names):
                names.append(w.name)
                cells.append((wd * scale, h * scale))
                lengths.append(t)
            else:
                cells[j] = (max(cells[j][0], wd * scale), max(cells[j][1], h * scale))
                lengths[j] = max(lengths[j], t)
    widest = max([_text_width(font, s) for r in rows for s, _ in r.margin_lines()] or [0])
    margin = PAD + max(MARGIN_MIN, widest + 8)
    lines = max([len(r.margin_lines()) for r in rows] or [0])
    cell_h = max([h for _, h in cells] or [0])
    row_h = max(cell_h + LABEL_H, lines * LINE_H) + ROW_GAP
    return Layout(scale=scale, margin=margin, names=names, cells=cells, lengths=lengths, row_h=row_h,
                  n_rows=len(rows))


def draw_sheet(rows: Sequence[SheetRow], scale: int = 1):
    """Draw ``rows`` (from :func:`rows_from_batch`) into a PIL RGB image (see the module doc for the layout)."""
    from PIL import Image, ImageDraw  # noqa: PLC0415

    if not rows:
        raise ValueError("no rows to draw")
    lay = layout(rows, scale)
    img = Image.new("RGB", lay.size, BACKGROUND)
    canvas = np.asarray(img).copy()
    for r, row in enumerate(rows):
        for j, w in enumerate(row.windows):
            f = w.frames
            if scale > 1:
                f = f.repeat(scale, axis=1).repeat(scale, axis=2)
            for t in range(f.shape[0]):
                x, y = lay.frame_box(r, j, t)
                canvas[y:y + f.shape[1], x:x + f.shape[2]] = f[t]
    img = Image.fromarray(canvas)
    draw = ImageDraw.Draw(img)
    font = _font()
    for j, name in enumerate(lay.names):
        draw.text((lay.x0[j], PAD), name, fill=TEXT_RGB, font=font)
    for r, row in enumerate(rows):
        y = lay.row_y(r)
        if r and row.batch != rows[r - 1].batch:
            draw.line([(PAD, y - ROW_GAP // 2 - 1), (lay.size[0] - PAD, y - ROW_GAP // 2 - 1)], fill=SEPARATOR_RGB)
        for i, (text, colour) in enumerate(row.margin_lines()):
            draw.text((PAD, y + i * LINE_H), text, fill=colour, font=font)
        for j, w in enumerate(row.windows):
            h = w.frames.shape[1] * scale
            cw = lay.cells[j][0]
            for t, idx in enumerate(w.indices[:w.frames.shape[0]]):
                x, _ = lay.frame_box(r, j, t)
                s = str(idx)
                draw.text((x + max(0, (cw - _text_width(font, s)) // 2), y + h + 1), s, fill=DIM_RGB, font=font)
    return img


def save_png(img, path: str | os.PathLike) -> str:
    """Write ``img`` as PNG atomically (temporary file + rename); the folder must exist."""
    import io  # noqa: PLC0415

    from vidssl.fsio import atomic_write_bytes  # noqa: PLC0415

    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    atomic_write_bytes(os.fspath(path), buf.getvalue())
    return os.fspath(path)
