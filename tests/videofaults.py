"""Small videos and broken inputs for the shard tests, made with PyAV into a folder (tmp_path).

Every maker returns the path it wrote. Frames carry a moving bright bar so tests can check
orientation and motion without golden files.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np


def pattern(i: int, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8: dark background, a white bar on the LEFT edge, a grey square moving right."""
    img = np.full((height, width, 3), 30, np.uint8)
    img[:, : max(2, width // 8)] = 255
    x = (i * 3) % max(1, width - 8)
    img[height // 2 - 4: height // 2 + 4, x: x + 8] = 150
    return img


def make_video(path: str | os.PathLike, frames: int = 24, size: tuple[int, int] = (64, 48), fps: int = 12,
               codec: str = "libx264", pix_fmt: str = "yuv420p", rotation: int | None = None,
               timestamps: list[float] | None = None, audio: bool = False, gop: int = 12,
               fmt: str | None = None, sar: Fraction | None = None) -> Path:
    """Encode ``frames`` pattern frames. ``timestamps`` (seconds) makes a variable-frame-rate file;
    ``sar``: a sample (pixel) aspect ratio other than 1 (anamorphic video)."""
    import av

    path = Path(path)
    width, height = size
    with av.open(str(path), "w", format=fmt) as out:
        vs = out.add_stream(codec, rate=fps)
        vs.width, vs.height, vs.pix_fmt = width, height, pix_fmt
        if codec == "libx264":
            vs.options = {"g": str(gop), "preset": "ultrafast"}
        if timestamps is not None:
            vs.codec_context.time_base = Fraction(1, 1000)
            vs.time_base = Fraction(1, 1000)
        if rotation is not None:
            vs.set_display_rotation(rotation)
        if sar is not None:
            vs.codec_context.sample_aspect_ratio = sar
        aus = None
        if audio:
            aus = out.add_stream("aac", rate=8000)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(pattern(i, width, height), format="rgb24")
            if timestamps is not None:
                frame.pts = int(round(timestamps[i] * 1000))
                frame.time_base = Fraction(1, 1000)
            else:
                frame.pts = i
            for p in vs.encode(frame):
                out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
        if aus is not None:
            _write_audio(out, aus, seconds=frames / fps)
    return path


def _write_audio(out, stream, seconds: float) -> None:
    import av

    rate = stream.codec_context.sample_rate
    n = int(rate * seconds)
    t = np.arange(n) / rate
    samples = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
    frame_size = stream.codec_context.frame_size or 1024
    pts = 0
    for start in range(0, n, frame_size):
        chunk = samples[:, start:start + frame_size]
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk), format="fltp", layout="mono")
        frame.sample_rate = rate
        frame.pts = pts
        pts += chunk.shape[1]
        for p in stream.encode(frame):
            out.mux(p)
    for p in stream.encode(None):
        out.mux(p)


def audio_only(path: str | os.PathLike, seconds: float = 1.0) -> Path:
    import av

    path = Path(path)
    with av.open(str(path), "w", format="mp4") as out:
        _write_audio(out, out.add_stream("aac", rate=8000), seconds)
    return path


def still_image(path: str | os.PathLike, size: tuple[int, int] = (64, 48)) -> Path:
    """A PNG picture (FFmpeg opens it as a one-frame 'video')."""
    import av

    path = Path(path)
    frame = av.VideoFrame.from_ndarray(pattern(0, *size), format="rgb24")
    with av.open(str(path), "w", format="image2") as out:
        vs = out.add_stream("png", rate=1)
        vs.width, vs.height, vs.pix_fmt = size[0], size[1], "rgb24"
        for p in vs.encode(frame):
            out.mux(p)
        for p in vs.encode(None):
            out.mux(p)
    return path


def zero_byte(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.write_bytes(b"")
    return path


def text_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    path.write_text("this is not a video\n" * 20)
    return path


def truncated(path: str | os.PathLike, keep: float = 0.5) -> Path:
    """A valid mp4 cut to ``keep`` of its bytes (the moov index at the end is lost)."""
    path = make_video(path, frames=36)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def corrupt_middle(path: str | os.PathLike) -> Path:
    """A valid mp4 whose middle bytes (inside the coded frames) are overwritten with garbage."""
    path = make_video(path, frames=48, size=(96, 64))
    data = bytearray(path.read_bytes())
    rng = np.random.default_rng(0)
    mid = len(data) // 2
    data[mid: mid + 600] = rng.integers(0, 256, 600, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def vfr(path: str | os.PathLike, frames: int = 30) -> Path:
    """Variable frame rate: intervals alternate 50 ms and 150 ms (average 10 fps over 3 s)."""
    ts, t = [], 0.0
    for i in range(frames):
        ts.append(t)
        t += 0.05 if i % 2 == 0 else 0.15
    return make_video(path, frames=frames, timestamps=ts, fmt="matroska")


def ten_bit(path: str | os.PathLike) -> Path:
    """10-bit 4:2:0 (FFV1 in Matroska: always available, unlike a 10-bit x264 build)."""
    return make_video(path, codec="ffv1", pix_fmt="yuv420p10le", fmt="matroska")


def odd_size(path: str | os.PathLike) -> Path:
    """Odd width and height (4:4:4 so the encoder accepts them)."""
    return make_video(path, size=(75, 47), pix_fmt="yuv444p")


def fifo(path: str | os.PathLike) -> Path:
    """A named pipe: opening it for reading blocks forever (a genuinely hanging input)."""
    path = Path(path)
    os.mkfifo(path)
    return path


def _encode_pattern(out, vs, frames: int) -> None:
    """Encode and mux ``frames`` numbered 64x48 pattern frames (pts 0, 1, ...), then flush."""
    import av

    for i in range(frames):
        frame = av.VideoFrame.from_ndarray(pattern(i, 64, 48), format="rgb24")
        frame.pts = i
        for p in vs.encode(frame):
            out.mux(p)
    for p in vs.encode(None):
        out.mux(p)


def truncated_at_packet(path: str | os.PathLike, keep_packets: int = 10, fmt: str = "mp4") -> Path:
    """A file cut exactly after its ``keep_packets``-th video packet, headers intact.

    MP4: written with the index first (faststart), so the cut file still opens and lists every
    frame. Matroska: the header keeps the full duration. FFmpeg reads such a file to the cut
    without any error (it only logs "partial file" / "File ended prematurely").
    """
    import av

    path = Path(path)
    options = {"movflags": "+faststart"} if fmt == "mp4" else {}
    with av.open(str(path), "w", format=fmt, options=options) as out:
        vs = out.add_stream("libx264", rate=12)
        vs.width, vs.height, vs.pix_fmt = 64, 48, "yuv420p"
        vs.options = {"g": "6", "preset": "ultrafast", "bf": "0"}
        _encode_pattern(out, vs, 36)
    with av.open(str(path)) as c:
        ends = [p.pos + p.size for p in c.demux(video=0) if p.size]
    data = path.read_bytes()
    path.write_bytes(data[: ends[keep_packets - 1]])
    return path


def other_codec(path: str | os.PathLike, codec: str = "mjpeg", fmt: str = "avi", frames: int = 24,
                gop: int | None = None, bframes: int = 0) -> Path:
    """A non-H.264 video (MJPEG in AVI, VP9 in WebM, MPEG-4 part 2 ...) at 12 fps, keyframes every
    ``gop``. MPEG-4 with ``bframes`` in AVI is the XviD/DivX layout of UCF101/HMDB51: AVI has no
    presentation times, so FFmpeg shows the first frame one frame after the stream start."""
    import av

    path = Path(path)
    with av.open(str(path), "w", format=fmt) as out:
        vs = out.add_stream(codec, rate=12)
        vs.width, vs.height = 64, 48
        vs.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if gop is not None:
            vs.codec_context.gop_size = gop
        if bframes:
            vs.options = {"bf": str(bframes)}
        _encode_pattern(out, vs, frames)
    return path


def cut_mid_gop(path: str | os.PathLike, frames: int = 48, keep: float = 0.6) -> Path:
    """An MPEG-TS recording that starts in the middle of a GOP (a capture begun mid-stream):
    the frames before its first keyframe cannot be decoded. Keyframes every 12 frames at 12 fps."""
    path = make_video(path, frames=frames, gop=12, fmt="mpegts")
    data = path.read_bytes()
    cut = (len(data) - int(len(data) * keep)) // 188 * 188  # whole TS packets
    path.write_bytes(data[cut:])
    return path
