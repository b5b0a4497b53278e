"""Looking at the data: contact sheets of batches (`vidssl data peek --save`) and `vidssl shard report`."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from vidssl.data import sheet

# ---- contact sheet ----------------------------------------------------------------------------


def _ssl_batch(b=3, t=4, f=2, h=20, w=24, valid=None):
    """A hand-made ssl batch: every frame one flat colour derived from (row, window, frame)."""
    def window(wi, n):
        x = torch.zeros(b, n, 3, h, w, dtype=torch.uint8)
        for r in range(b):
            for k in range(n):
                x[r, k] = torch.tensor([10 + 40 * r, 20 + 60 * wi, 5 + 25 * k], dtype=torch.uint8).view(3, 1, 1)
        return x

    return {"context": window(0, t), "future": window(1, f), "other": window(2, t),
            "frame_indices": {"context": torch.arange(b * t).view(b, t), "future": 100 + torch.arange(b * f).view(b, f),
                              "other": 200 + torch.arange(b * t).view(b, t)},
            "key": [f"key{r}" for r in range(b)], "label": torch.tensor([0, 1, -1][:b]),
            "dataset": torch.zeros(b, dtype=torch.int64),
            "valid": torch.tensor(valid if valid is not None else [True] * b)}


@pytest.mark.parametrize("scale", [1, 2])
def test_ssl_sheet_layout_and_exact_pixels(scale):
    b, t, f, h, w = 3, 4, 2, 20, 24
    batch = _ssl_batch(b, t, f, h, w)
    rows = sheet.rows_from_batch(batch, ["left", "right"])
    assert len(rows) == b and [len(r.windows) for r in rows] == [3] * b
    assert [x.name for x in rows[0].windows] == ["context", "future", "other"]
    assert rows[1].label_name == "right" and rows[2].label_name == "-"
    img = sheet.draw_sheet(rows, scale=scale)
    lay = sheet.layout(rows, scale)
    # Size: margin + three windows of T, F, T cells with gaps; header + one row per sample.
    cw, ch = w * scale, h * scale
    frames_w = sum(n * cw + (n - 1) * sheet.FRAME_GAP for n in (t, f, t)) + 2 * sheet.WINDOW_GAP
    assert img.size == (lay.margin + frames_w + sheet.PAD, 2 * sheet.PAD + sheet.HEADER_H + b * lay.row_h)
    assert lay.row_h >= ch + sheet.LABEL_H
    assert lay.cells == [(cw, ch)] * 3 and lay.lengths == [t, f, t]
    px = np.asarray(img)
    cells = 0
    for r in range(b):
        for j, name in enumerate(("context", "future", "other")):
            for k in range(batch[name].shape[1]):
                x, y = lay.frame_box(r, j, k)
                want = batch[name][r, k].permute(1, 2, 0).numpy().repeat(scale, 0).repeat(scale, 1)
                assert np.array_equal(px[y:y + ch, x:x + cw], want), (r, name, k)
                cells += 1
    assert cells == b * (2 * t + f)


def test_sheet_of_views_and_real_frames_under_frame_numbers():
    b, v, t, h, w = 2, 3, 2, 8, 8
    video = torch.randint(0, 256, (b, v, t, 3, h, w), dtype=torch.uint8)
    batch = {"video": video, "frame_indices": {"video": torch.arange(b * v * t).view(b, v, t)},
             "key": ["a", "b"], "label": torch.tensor([0, 0]), "valid": torch.tensor([True, True])}
    rows = sheet.rows_from_batch(batch, ["x"])
    assert [x.name for x in rows[0].windows] == ["view 0", "view 1", "view 2"]
    assert rows[1].windows[2].indices == [10, 11]
    img = sheet.draw_sheet(rows)
    lay = sheet.layout(rows)
    px = np.asarray(img)
    x, y = lay.frame_box(1, 2, 1)
    assert np.array_equal(px[y:y + h, x:x + w], video[1, 2, 1].permute(1, 2, 0).numpy())


def test_padding_rows_are_marked_in_red():
    rows = sheet.rows_from_batch(_ssl_batch(valid=[True, False, True]), ["left", "right"])
    img = np.asarray(sheet.draw_sheet(rows))
    lay = sheet.layout(rows)

    def red_in_margin(r):
        y0 = lay.row_y(r)
        m = img[y0:y0 + lay.row_h, :lay.margin]
        return bool(((m[..., 0] > 200) & (m[..., 1] < 80) & (m[..., 2] < 80)).any())

    assert [red_in_margin(r) for r in range(3)] == [False, True, False]
    assert any("padding" in s for s, _ in rows[1].margin_lines())


def test_batch_buffers_are_copied():
    batch = _ssl_batch()
    rows = sheet.rows_from_batch(batch)
    before = rows[0].windows[0].frames.copy()
    batch["context"].zero_()  # a reused loader buffer overwritten by the next batch
    assert np.array_equal(rows[0].windows[0].frames, before)


def test_cli_peek_save_and_save_dir(ssl_shards, tmp_path, capsys):
    from PIL import Image

    from vidssl import cli

    out = tmp_path / "sheet.png"
    per = tmp_path / "per"
    args = ["data", "peek", "-n", "2", "--save", str(out), "--save-dir", str(per), "--scale", "1", str(ssl_shards),
            "workers=0", "batch_size=3", "frames=3", "stride=2", "future=2", "gap_min=2", "gap_max=8", "crop_size=24"]
    assert cli.main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in per.iterdir()) == ["batch-001.png", "batch-002.png"]
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]  # atomic writes leave no temporary file
    full, one = Image.open(out), Image.open(per / "batch-001.png")
    # Width: 3 + 2 + 3 cells of 24 px; the full sheet has the rows of both batches.
    lay_w = 8 * 24 + 5 * sheet.FRAME_GAP + 2 * sheet.WINDOW_GAP + sheet.PAD
    # The margin fits the widest key/label of the sheet's rows: the whole sheet (both batches' rows) is
    # at least as wide as one batch's. (Keys hash the source path, so their text width varies by a
    # pixel between runs: equal widths held only when the widest key happened to be in batch 1.)
    assert one.size[0] - lay_w >= sheet.MARGIN_MIN and one.size[0] <= full.size[0]
    row_h = (one.size[1] - 2 * sheet.PAD - sheet.HEADER_H) // 3
    assert full.size[1] == 2 * sheet.PAD + sheet.HEADER_H + 6 * row_h

    assert cli.main(["data", "peek", "--save", str(tmp_path / "x.jpg"), str(ssl_shards)]) == 2
    assert "--save" in capsys.readouterr().err
    assert cli.main(["data", "peek", "--save", str(tmp_path / "no" / "x.png"), str(ssl_shards)]) == 2
    assert "does not exist" in capsys.readouterr().err


# ---- shard report -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report_dataset(digits_dir, tmp_path_factory):
    """12 of the digits videos plus one file that is not a video (so errors.jsonl has a line)."""
    import csv

    from vidssl.shard import ShardConfig, run_shard

    root = tmp_path_factory.mktemp("report")
    bad = root / "broken.mp4"
    bad.write_bytes(b"this is not a video")
    with open(digits_dir / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))[:12]
    manifest = root / "manifest.csv"
    manifest.write_text("path,label\n" + "".join(f"{digits_dir / r['path']},{r['label']}\n" for r in rows)
                        + f"{bad},{rows[0]['label']}\n")
    out = root / "ds"
    run_shard(ShardConfig(sources=[str(manifest)], output=str(out), gop=8, shard_samples=5, progress="none",
                          workers=1))
    return out, rows


def test_shard_report_page(report_dataset, tmp_path, capsys):
    from vidssl import cli

    ds, rows = report_dataset
    out = tmp_path / "rep"
    assert cli.main(["shard", "report", str(ds), "-o", str(out), "--per-class", "1", "--seed", "3"]) == 0
    assert str(out / "report.html") in capsys.readouterr().out
    page = (out / "report.html").read_text(encoding="utf-8")
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert srcs and all((out / s).is_file() for s in srcs)
    assert sum(s.startswith("img/hist-") for s in srcs) == 5
    index = json.loads((ds / "index.json").read_text())
    counts = {}
    for r in rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    table = page[page.index("<table class=classes>"):]
    table = table[:table.index("</table>")]
    for name in index["classes"]:
        assert f"<tr><td>{name}</td><td class=n>{counts.get(name, 0)}</td>" in table, name
    # One thumbnail per class present (--per-class 1), each with first/middle/last frame.
    assert sum(s.startswith("img/thumb-") for s in srcs) == len(counts)
    assert f"<td class=n>{index['totals']['samples']}</td>" in page
    assert "broken.mp4" in page and "Rejected inputs (errors.jsonl): 1" in page


def test_shard_report_default_folder_and_bad_arguments(report_dataset, tmp_path, capsys):
    from vidssl import cli

    ds, _ = report_dataset
    assert cli.main(["shard", "report", str(ds), "--per-class", "0"]) == 0
    assert (ds / "report" / "report.html").is_file()
    capsys.readouterr()
    missing = tmp_path / "nowhere"
    assert cli.main(["shard", "report", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert cli.main(["shard", "report", str(ds), "--per-class", "-1", "-o", str(tmp_path / "r")]) == 2
    assert "--per-class" in capsys.readouterr().err
    assert cli.main(["shard", "report"]) == 2
    assert "DATASET" in capsys.readouterr().err
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["shard", "report", str(ds), "-o", str(afile)]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert cli.main(["shard", "info", str(ds), "--seed", "1"]) == 2
    assert "report" in capsys.readouterr().err


def _browser() -> str | None:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.browser
def test_shard_report_renders_in_a_headless_browser(report_dataset, tmp_path):
    """The page as a user sees it: every image loads, the class table is there, the screenshot is not blank;
    and with one image deleted the page reports it (the check can fail)."""
    import subprocess

    from PIL import Image

    from vidssl.shard.report import make_report

    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser installed (Debian: apt-get install chromium); .ci/run installs one")
    ds, _ = report_dataset
    out = tmp_path / "rep"
    page = make_report(str(ds), str(out), per_class=1, seed=0)
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--virtual-time-budget=10000", f"--user-data-dir={tmp_path / 'profile'}"]

    def dom() -> str:
        res = subprocess.run(flags + ["--dump-dom", f"file://{page}"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        return res.stdout

    rendered = dom()
    images = int(re.search(r'data-images="(\d+)"', rendered).group(1))
    assert images >= 6 and 'data-broken-images="0"' in rendered
    assert "<table class=\"classes\">" in rendered or "<table class=classes>" in rendered
    shot = tmp_path / "shot.png"
    res = subprocess.run(flags + ["--window-size=1200,1600", f"--screenshot={shot}", f"file://{page}"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    lo, hi = Image.open(shot).convert("L").getextrema()
    assert hi - lo > 50  # text and images drawn, not a blank page
    # Delete one image: the page must notice.
    next((out / "img").glob("thumb-*.png")).unlink()
    assert 'data-broken-images="1"' in dom()
