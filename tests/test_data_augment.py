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


def _encode(codec, times_ms, gop, bframes, all_sync=False):
    """An mp4 of len(times_ms) distinct frames shown at ``times_ms``; (bytes, keyframe numbers).
    ``all_sync`` marks every packet as a sync sample in the container's index, as an MPEG-4 Part 2
    stream remuxed from AVI ends up."""
    import fractions
    import io

    rng = np.random.default_rng(2)
    base = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as c:
        s = c.add_stream(codec, rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.time_base = fractions.Fraction(1, 1000)
        s.codec_context.gop_size = gop
        s.codec_context.max_b_frames = bframes
        packets = []
        for t, ms in enumerate(times_ms):
            f = np.roll(base, 3 * t, axis=1).copy()
            f[:4, : t % 64] = 255
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = ms, fractions.Fraction(1, 1000)
            packets += s.encode(frame)
        packets += s.encode()
        for p in packets:
            p.is_keyframe = p.is_keyframe or all_sync
            c.mux(p)
    data = buf.getvalue()
    with av.open(io.BytesIO(data)) as c:
        keys = [i for i, f in enumerate(c.decode(video=0)) if f.key_frame]
    return data, keys


def test_pyav_decoder_never_takes_frames_decoded_from_a_non_keyframe_seek():
    # The container says every sample is a sync sample: a seek lands on a P/B picture and the
    # MPEG-4 decoder returns garbage frames with correct timestamps until the next real keyframe.
    if "mpeg4" not in av.codecs_available:
        pytest.skip("no mpeg4 encoder in this PyAV build")
    data, keys = _encode("mpeg4", [40 * t for t in range(48)], gop=12, bframes=2, all_sync=True)
    ref = full_decode(data)
    assert len(ref) == 48 and len(keys) > 2 and keys != list(range(48))
    meta = {"fps": 25.0, "frames": 48, "keyframes": keys}
    for start in range(0, 40, 3):
        idx = list(range(start, start + 8))
        assert np.array_equal(PyAVDecoder(1).decode(data, idx, meta), ref[idx]), idx


def test_pyav_decoder_numbers_stream_copied_vfr_frames_by_timestamp_rank():
    # A stream copy keeps variable frame rate timestamps (40 ms, then 80 ms apart): frame numbers
    # are ranks of the timestamps (as the sharder counts them), not pts × fps.
    times = [40 * t for t in range(30)] + [1200 + 80 * t for t in range(30)]
    data, keys = _encode("libx264", times, gop=12, bframes=2)
    ref = full_decode(data)
    assert len(ref) == 60
    meta = {"fps": 60 / 3.6, "frames": 60, "keyframes": keys, "copy": True}
    for idx in ([0, 1, 2, 3], list(range(20, 44, 3)), [59, 45, 31, 30, 29, 5], list(range(50, 60))):
        assert np.array_equal(PyAVDecoder(1).decode(data, idx, meta), ref[idx]), idx


def _plans(n):
    """Frame lists a loader asks for: stride 2 from an even and an odd start, stride 1, stride 4,
    and scattered frames across several GOPs."""
    return [list(range(0, 16, 2)), list(range(13, 29, 2)), list(range(20, 28)), list(range(2, n, 4)),
            [1, 7, 8, 30, 31, n - 1], [n - 2, n - 1]]


@pytest.mark.parametrize("bframes,copy", [(2, False), (3, False), (3, True)])
def test_pyav_decoder_skips_unwanted_non_reference_pictures_without_changing_frames(bframes, copy):
    # x264 B-frames (3: with b-pyramid, where the middle B-frame is a reference) are not decoded
    # when no wanted frame needs them; every returned frame stays bit-identical to a full decode.
    data, keys = _encode("libx264", [40 * t for t in range(48)], gop=12, bframes=bframes)
    ref = full_decode(data)
    meta = {"fps": 25.0, "frames": 48, "keyframes": keys, "copy": copy}
    skipping, plain = PyAVDecoder(1), PyAVDecoder(1, skip_nonref=False)
    for idx in _plans(48):
        assert np.array_equal(skipping.decode(data, idx, meta), ref[idx]), idx
        assert np.array_equal(plain.decode(data, idx, meta), ref[idx]), idx
    # Fewer pictures decoded (the plain decoder decodes every packet it is sent; the skipping one
    # drains the decoder, so it returns every picture it decoded), and no packet fed past the last
    # wanted one: without the drain, B-frame reordering needs later pictures to release the last.
    assert skipping.frames_decoded < 0.9 * plain.packets_sent
    assert skipping.packets_sent < plain.packets_sent
    # Stride 2 from a keyframe: B-frames between the wanted frames are dropped.
    stride2 = PyAVDecoder(1)
    stride2.decode(data, list(range(0, 12, 2)), meta)
    assert stride2.frames_decoded < stride2.packets_sent


@pytest.mark.parametrize("copy,skips", [(False, True), (True, False)])
def test_pyav_decoder_skips_hevc_pictures_only_in_re_encoded_clips(copy, skips):
    # HEVC "non-reference" pictures may be referenced from a higher temporal sub-layer in footage
    # from elsewhere (stream-copied clips); vidssl's own encodes have one sub-layer.
    if "libx265" not in av.codecs_available:
        pytest.skip("no libx265 encoder in this PyAV build")
    data, keys = _encode("libx265", [40 * t for t in range(36)], gop=12, bframes=3)
    ref = full_decode(data)
    meta = {"fps": 25.0, "frames": 36, "keyframes": keys, "copy": copy}
    dec, plain = PyAVDecoder(1), PyAVDecoder(1, skip_nonref=False)
    for idx in _plans(36):
        assert np.array_equal(dec.decode(data, idx, meta), ref[idx]), idx
        plain.decode(data, idx, meta)
    assert (dec.frames_decoded < plain.frames_decoded) is skips


def test_pyav_decoder_decodes_every_picture_of_codecs_it_does_not_skip_in():
    if "mpeg4" not in av.codecs_available:
        pytest.skip("no mpeg4 encoder in this PyAV build")
    data, keys = _encode("mpeg4", [40 * t for t in range(36)], gop=12, bframes=2)
    ref = full_decode(data)
    meta = {"fps": 25.0, "frames": 36, "keyframes": keys}
    dec, plain = PyAVDecoder(1), PyAVDecoder(1, skip_nonref=False)
    for idx in _plans(36):
        assert np.array_equal(dec.decode(data, idx, meta), ref[idx]), idx
        plain.decode(data, idx, meta)
    assert (dec.frames_decoded, dec.packets_sent) == (plain.frames_decoded, plain.packets_sent)


def test_decord_backend_hands_codecs_it_cannot_open_to_pyav():
    # decord's bundled FFmpeg has no AV1 decoder ("cannot find video stream"), but the sharder can
    # write AV1 (codec=av1): the decord backend must still return the reference frames.
    pytest.importorskip("decord")
    from vidssl.data.decode import DecordDecoder

    codec = next((c for c in ("libsvtav1", "libaom-av1") if c in av.codecs_available), None)
    if codec is None:
        pytest.skip("no AV1 encoder in this PyAV build")
    data, keys = _encode(codec, [40 * t for t in range(24)], gop=8, bframes=0)
    ref = full_decode(data)
    meta = {"fps": 25.0, "frames": len(ref), "keyframes": keys, "codec": "av1", "copy": False, "bframes": 0}
    idx = [0, 3, 9, 17, len(ref) - 1]
    assert np.array_equal(DecordDecoder(1).decode(data, idx, meta), ref[idx])


def test_channel_shuffle_permutes_rgb_and_is_off_by_default():
    from vidssl.data.augment import apply_train, train_params
    from vidssl.data.config import DataConfig

    x = torch.zeros(3, 3, 16, 16, dtype=torch.uint8)
    x[:, 0], x[:, 1], x[:, 2] = 10, 100, 200
    off = DataConfig(dataset="d", jitter_p=0.0, grayscale_p=0.0, flip=False, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert off.channel_shuffle_p == 0.0
    rng = random.Random(0)
    assert all(train_params(16, 16, off, rng).perm is None for _ in range(20))
    on = DataConfig(dataset="d", jitter_p=0.0, grayscale_p=0.0, flip=False, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                    channel_shuffle_p=1.0)
    seen = set()
    for _ in range(60):
        p = train_params(16, 16, on, rng)
        y = apply_train(x, p, 16)
        colours = tuple(int(y[0, c, 0, 0]) for c in range(3))
        assert sorted(colours) == [10, 100, 200]  # the same values, reordered ...
        assert all(torch.equal(y[t], y[0]) for t in range(3))  # ... the same way on every frame
        seen.add(colours)
    assert len(seen) == 6  # every order occurs
