"""Fast unit checks of the loader's hot paths: the fused colour jitter against torchvision's
formulas, and the PyAV decoder's seek/forward-decode plan against a full decode."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vidssl.data.augment import _colour
from vidssl.data.decode import PyAVDecoder, full_decode

av = pytest.importorskip("av")
F = pytest.importorskip("torchvision.transforms.v2.functional")

_TV = {"brightness": F.adjust_brightness, "contrast": F.adjust_contrast, "saturation": F.adjust_saturation}


def _torchvision(x, ops, gray):
    for name, f in ops:
        x = _TV[name](x, f)
    return F.rgb_to_grayscale(x, num_output_channels=3) if gray else x


@pytest.fixture(scope="module")
def clip():
    # (T, C, H, W) uint8 with smooth structure plus noise, so means and lumas are not trivial.
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0, 200, 40).view(1, 1, 1, 40).expand(4, 3, 24, 40)
    return (ramp + torch.randint(0, 55, (4, 3, 24, 40), generator=g)).to(torch.uint8)


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
@pytest.mark.parametrize("factor", [0.5, 1.0, 1.6])
def test_each_colour_op_matches_torchvision(clip, name, factor):
    ours = _colour(clip, [(name, factor)], False)
    ref = _torchvision(clip, [(name, factor)], False)
    assert ours.dtype == torch.uint8 and ours.shape == clip.shape
    # torchvision truncates to uint8, we round: at most one level apart.
    assert int((ours.int() - ref.int()).abs().max()) <= 1


def test_colour_chain_and_grayscale_close_to_torchvision(clip):
    worst = 0
    for seed in range(12):
        rng = random.Random(seed)
        ops = [(n, rng.uniform(0.6, 1.4)) for n in ("brightness", "contrast", "saturation")]
        rng.shuffle(ops)
        ours = _colour(clip, ops, seed % 2 == 0)
        worst = max(worst, int((ours.int() - _torchvision(clip, ops, seed % 2 == 0).int()).abs().max()))
        if seed % 2 == 0:  # grayscale: the same value in every channel
            assert torch.equal(ours[:, 0], ours[:, 1]) and torch.equal(ours[:, 1], ours[:, 2])
    # One rounding at the end instead of a truncation per op: a few levels at most.
    assert worst <= 4


def test_no_colour_ops_returns_the_input(clip):
    assert torch.equal(_colour(clip, [], False), clip)


@pytest.fixture(scope="module")
def gop8_video(tmp_path_factory):
    """72 frames, keyframe every 8 frames, no B-frames (like a shard); (bytes, meta)."""
    path = tmp_path_factory.mktemp("dec") / "v.mp4"
    rng = np.random.default_rng(1)
    base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.options = {"g": "8", "keyint_min": "8", "bf": "0", "sc_threshold": "0"}
        for t in range(72):
            f = np.roll(base, 3 * t, axis=1).copy()
            f[:4, : t % 64] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    with av.open(str(path)) as c:  # no B-frames: packet order is presentation order
        keys = [i for i, p in enumerate(p for p in c.demux(video=0) if p.size) if p.is_keyframe]
    assert keys[:3] == [0, 8, 16]
    return path.read_bytes(), {"fps": 25.0, "frames": 72, "keyframes": keys}


@pytest.mark.parametrize("indices", [
    list(range(0, 31, 2)),            # one window crossing keyframes 8, 16, 24: decoded forward
    list(range(37, 68, 2)),           # a window starting mid-GOP: one seek to keyframe 32
    [3, 5, 60, 62, 70, 71],           # far apart: two groups, a seek in between
    [50, 10, 10, 49, 0, 71],          # unsorted, with repeats
])
def test_pyav_decoder_returns_exactly_the_requested_frames(gop8_video, indices):
    data, meta = gop8_video
    ref = full_decode(data)  # (72, H, W, 3)
    got = PyAVDecoder(1).decode(data, indices, meta)
    assert got.shape == (len(indices), 48, 64, 3)
    assert np.array_equal(got, ref[indices])
