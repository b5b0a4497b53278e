"""Per-input work done in a worker process: probe → plan clips → one decode → one encode pass.

:func:`process_input` takes a :class:`~vidssl.shard.tasks.ShardTask` and returns an
:class:`~vidssl.shard.tasks.InputResult` (both pickled between processes). Encoded clips are
written to files in the OUTDIR temp area, never kept in RAM; the result carries their paths and
the ``KEY.json`` metadata. Any failure rejects the whole input (no partial input ever reaches a
shard): the result then has no samples and one error record with the stage that failed.

Inside: :func:`process_input` opens and probes the input, then runs :class:`_Transcoder`
(re-encode) or :class:`_StreamCopier` (``copy``); each returns a :class:`ClipRecord` per clip
file, registering what it opens in a :class:`CleanupRegistry` that undoes it on rejection.

Timing model (re-encode): the source is a step function, frame *i* shown over
``[t_i, t_{i+1})`` (``t_{n}`` of the last frame = its timestamp + its duration). Output frame
*k* of a clip stands for the interval ``[clip_start + k/fps, clip_start + (k+1)/fps)`` and shows
the source frame visible at that interval's MIDDLE, ``clip_start + (k + 1/2)/fps``. A clip holds
every *k* whose middle lies before ``clip_end``, so

    frames = ceil((clip_end - clip_start) * fps - 1/2)     (round half down)

This gives a constant output rate from any input (VFR included), an exact frame count known
while encoding, and the source's own frames one for one when the rate is not changed, even when
container timestamps are rounded to the time base (sampling at interval starts would pick the
previous frame whenever a timestamp was rounded up). All times are exact fractions
(timestamp × time base), never floats: float sums such as ``0.2 + 0.04 > 0.24`` used to add a
frame.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, NamedTuple, Protocol

from vidssl.fsio import unlink_quiet
from vidssl.shard.sources import make_key, printable
from vidssl.shard.tasks import ErrorRecord, InputResult, Sample, ShardTask

# Container formats FFmpeg uses for single pictures: never videos.
_IMAGE_FORMATS = ("image2", "_pipe", "apng", "webp")
_IMAGE_CODECS = {"png", "mjpeg", "bmp", "tiff", "webp", "jpegls", "jpeg2000", "gif_still", "ppm", "pgm",
                 "pam", "qoi", "sgi", "targa", "dpx", "exr", "pcx", "xbm", "xpm", "jpegxl", "photocd"}


class Reject(Exception):
    """Reject this input (or clip) with (stage, reason)."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(reason)
        self.stage = stage
        self.reason = reason


def _fps_fraction(value: float | Fraction) -> Fraction:
    frac = Fraction(value).limit_denominator(1001)
    if frac <= 0:
        raise Reject("probe", f"unusable frame rate {value!r}")
    return frac


def exact(value: float | int | Fraction | None) -> Fraction | None:
    """A user-given time in seconds as the fraction its decimal text means (0.1 → 1/10, not 0.1000…0055)."""
    if value is None or isinstance(value, Fraction):
        return value
    return Fraction(repr(float(value))) if isinstance(value, float) else Fraction(value)


def output_frames(seconds: Fraction, fps: Fraction) -> int:
    """Frames of a clip covering ``seconds`` at ``fps``: ceil(seconds·fps − 1/2), see the module docstring."""
    return max(0, math.ceil(seconds * fps - Fraction(1, 2)))


def even_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """Output size: short side → ``short_side`` (aspect kept), both dimensions even (yuv420p)."""
    if short_side is not None:
        if width <= height:
            w, h = short_side, height * short_side / width
        else:
            w, h = width * short_side / height, short_side
    else:
        w, h = width, height
    return max(2, int(round(w / 2)) * 2), max(2, int(round(h / 2)) * 2)


def encoder_options(task: ShardTask) -> dict[str, str]:
    """Explicit encoder settings: rate control, preset, fixed GOP (no scene-cut keyframes), B-frames."""
    enc, gop, bf, crf, preset = task.encoder, task.gop, task.bframes, task.crf, task.preset
    if enc == "libx264":
        # In x264-params so nothing is silently dropped: scenecut=0 is what makes the GOP truly fixed.
        return {"crf": str(crf), "preset": preset, "g": str(gop), "bf": str(bf),
                "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bf}:open-gop=0"}
    if enc == "libx265":
        return {"crf": str(crf), "preset": preset, "x265-params":
                f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bf}:open-gop=0:log-level=error:"
                f"pools=none:frame-threads={task.threads}"}
    if enc == "libvpx-vp9":
        speed = {"ultrafast": 8, "superfast": 7, "veryfast": 6, "faster": 5, "fast": 4, "medium": 3,
                 "slow": 2, "slower": 1, "veryslow": 0}[preset]
        return {"crf": str(crf), "b": "0", "g": str(gop), "keyint_min": str(gop), "cpu-used": str(speed),
                "deadline": "good", "auto-alt-ref": "0", "lag-in-frames": "0"}
    if enc == "libsvtav1":
        speed = {"ultrafast": 12, "superfast": 11, "veryfast": 10, "faster": 9, "fast": 8, "medium": 6,
                 "slow": 4, "slower": 2, "veryslow": 1}[preset]
        return {"crf": str(crf), "preset": str(speed), "g": str(gop),
                "svtav1-params": "scd=0:irefresh-type=2"}
    raise Reject("encode", f"unsupported encoder {enc!r}")


# ---- probing -----------------------------------------------------------------------------------

def open_input(path: str, quick: bool = False):
    """av.open with a reason on failure (stage read/probe). Returns (container, iso_bmff).

    ``iso_bmff``: the file starts with an ISO-BMFF ``ftyp`` box of a non-QuickTime brand (MP4).
    ``quick`` (stream copy): such files are opened without FFmpeg's stream-info probing, which
    decodes frames of every stream (≈ 20 ms for a 720p clip with audio); an MP4's headers already
    hold size, rate, duration and frame count, and copy mode reads the pixel format and rotation
    from the SPS, the MP4 matrices and its first keyframe instead (:func:`_first_key_facts`).
    """
    import av

    try:
        with open(path, "rb") as fh:  # a clear 'read' error before FFmpeg's generic ones
            head = fh.read(12)
    except IsADirectoryError:
        raise Reject("read", "is a directory") from None
    except OSError as exc:
        raise Reject("read", f"cannot read: {exc.strerror or exc}") from None
    if not head:
        raise Reject("probe", "empty file (0 bytes)")
    iso_bmff = head[4:8] == b"ftyp" and head[8:12] != b"qt  "
    try:
        if quick and iso_bmff:
            # skip_frame=all: FFmpeg's stream-info pass then decodes no picture at all (it would
            # decode the first keyframe of a single-stream file, ~25 ms at 1080p, only to learn
            # the pixel format, which copy mode reads from the SPS; see headers.py).
            return av.open(path, format="mp4", metadata_errors="ignore",
                           options={"probesize": "32", "analyzeduration": "0", "skip_frame": "all"}), True
        return av.open(path, metadata_errors="ignore"), iso_bmff
    except (av.FFmpegError, OSError, UnicodeDecodeError) as exc:
        raise Reject("probe", f"not a readable video container: {exc}") from None


def probe(container) -> dict[str, Any]:
    """Source facts from the container headers; raises Reject when there is no usable video."""
    fmt = container.format.name or ""
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams})
        raise Reject("probe", "no video stream" + (f" (found: {', '.join(kinds)})" if kinds else ""))
    vs = container.streams.video[0]
    cc = vs.codec_context
    codec = cc.name if cc is not None else "unknown"
    if any(x in fmt for x in _IMAGE_FORMATS) or codec in _IMAGE_CODECS and (vs.frames or 0) <= 1:
        raise Reject("probe", f"still image ({fmt}/{codec}), not a video")
    rate = vs.average_rate or vs.guessed_rate or vs.base_rate
    duration = None
    if vs.duration is not None and vs.time_base is not None:
        duration = float(vs.duration * vs.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000
    start_exact = vs.start_time * Fraction(vs.time_base) if vs.start_time is not None and vs.time_base else None
    start = float(start_exact) if start_exact is not None else None
    return {"codec": codec, "width": int(cc.width or 0), "height": int(cc.height or 0),
            "fps": float(rate) if rate else None, "rate": rate, "duration": duration, "start": start,
            "start_exact": start_exact,
            "pix_fmt": cc.format.name if cc.format is not None else None, "format": fmt}


def _damaged(packet, tb) -> Reject:
    """The reject for a packet the demuxer flags as corrupt (a partial read at a truncated end)."""
    at = f"{float(packet.pts * tb):.3f}s" if packet.pts is not None and tb else "unknown time"
    return Reject("decode", f"damaged or truncated packet at {at} (the file is cut short or corrupt)")


def _is_flush(packet) -> bool:
    """PyAV's end-of-stream marker (not a packet of the file)."""
    return packet.size == 0 and packet.pts is None and packet.dts is None


def _mkv_duration(text: Any) -> float | None:
    """Seconds from a Matroska ``DURATION`` tag (``HH:MM:SS.nnnnnnnnn``), None if absent/unparsable."""
    try:
        h, m, sec = str(text).strip().split(":")
        return int(h) * 3600 + int(m) * 60 + float(sec)
    except (ValueError, AttributeError):
        return None


def check_complete(container, vs, packets: int | None, end: float | Fraction | None) -> None:
    """Reject a file whose demuxing ended early: a file cut exactly between two packets reads
    without any error (FFmpeg only logs "partial file" / "File ended prematurely").

    ``packets``: packets read from the video stream (None: demuxing began after a seek); ``end``:
    absolute end time (seconds) of the last one. MP4/MOV/AVI headers give the frame count; Matroska
    gives a duration (the stream's DURATION tag, else the segment's when video is the only stream).
    """
    fmt = container.format.name or ""
    declared_frames = vs.frames or 0
    indexed = "mp4" in fmt or "mov" in fmt or fmt == "avi"  # formats whose headers count the frames
    if packets is not None and declared_frames and indexed and packets < declared_frames:
        raise Reject("decode", f"truncated file: its index lists {declared_frames} frames, only {packets} "
                               "could be read")
    if "matroska" in fmt and end is not None:
        declared = _mkv_duration(vs.metadata.get("DURATION"))
        if declared is None and len(container.streams) == 1 and container.duration:
            declared = container.duration / 1_000_000
        rate = vs.average_rate or vs.guessed_rate
        tol = 0.1 + (2 / float(rate) if rate else 0.1)
        if declared is not None and float(end) < declared - tol:
            raise Reject("decode", f"truncated file: the video stream ends at {float(end):.3f}s, its header "
                                   f"says {declared:.3f}s")


def _after_end(start: float, duration: float) -> str:
    """The reject reason for a span that starts at or after the end of the video."""
    return f"the span starts at {start:g}s, after the end of the video ({duration:.3f}s): no clip planned"


def _sample_aspect(vs) -> Fraction:
    """The stream's sample (pixel) aspect ratio; 1 when unset or unusable."""
    for sar in (vs.sample_aspect_ratio, getattr(vs.codec_context, "sample_aspect_ratio", None)):
        try:
            frac = Fraction(sar) if sar else Fraction(0)
        except (TypeError, ValueError, ZeroDivisionError):
            continue
        if Fraction(1, 16) <= frac <= 16:
            return frac
    return Fraction(1)


# ---- clip planning ------------------------------------------------------------------------------

class Plan:
    """Which clips an input yields. Windows are created lazily (the duration may be unknown)."""

    def __init__(self, task: ShardTask) -> None:
        # Exact fractions: window bounds are compared with exact frame times.
        self.clip_seconds = exact(task.clip_seconds)
        self.stride = exact(task.clip_stride) or self.clip_seconds
        self.start = exact(task.start)
        self.end = exact(task.end)
        self.mode = "window" if self.clip_seconds else ("span" if self.start is not None or self.end is not None
                                                          else "whole")
        self.next_window = 0
        self.emitted_span = False

    def finished(self, t: Fraction | float) -> bool:
        """True when no clip can start at or after source time ``t``."""
        if self.mode == "whole":
            return False
        if self.mode == "span":
            return self.emitted_span
        return self.end is not None and t >= self.end

    def clips_starting_before(self, t: Fraction | float) -> list[tuple[Fraction, Fraction | float, str]]:
        """New clips (start, planned end, span id) whose start is < t; bounds are exact fractions
        (an open end is ``math.inf``). Span ids use 3 decimals of the same values as before."""
        out: list[tuple[Fraction, Fraction | float, str]] = []
        if self.mode == "window":
            lo = self.start or Fraction(0)
            while True:
                s = lo + self.next_window * self.stride
                if s >= t or (self.end is not None and s >= self.end):
                    break
                e = s + self.clip_seconds
                if self.end is not None:
                    e = min(e, self.end)
                out.append((s, e, f"{float(s):.3f}-{float(e):.3f}"))
                self.next_window += 1
        elif not self.emitted_span:
            s = self.start or Fraction(0)
            if s < t:
                e = self.end if self.end is not None else math.inf
                span = ("full" if self.mode == "whole" else
                        f"{float(s):.3f}-{'end' if self.end is None else f'{float(e):.3f}'}")
                out.append((s, e, span))
                self.emitted_span = True
        return out


# ---- what a clip pass hands back, and what it must undo ----------------------------------------
# _Transcoder / _StreamCopier → process_input: a ClipRecord per clip file written (or planned and
# found empty); process_input turns them into Samples and plan errors. CleanupRegistry: what was
# opened or written for the input, undone by process_input when the input is rejected.

@dataclass(frozen=True)
class ClipRecord:
    """One clip of an input: its file in the temp area and the facts its ``KEY.json`` reports."""

    # -- where it lies in the source (seconds from the time origin), its file and span id
    start: float
    end: float
    frames: int
    path: str
    span: str
    # -- the output video (left at the defaults for a clip with no frames or a duplicate)
    width: int = 0
    height: int = 0
    fps: float = 0.0
    keyframes: list[int] = field(default_factory=list)
    codec: str = ""
    pix_fmt: str | None = None
    gop: int | None = None
    bframes: int | None = None
    copy: bool = False
    rotation: int = 0  # display rotation applied (re-encode), counter-clockwise degrees
    # -- stream copy only: owned=False when ``path`` is the SOURCE itself (never delete it);
    #    duplicate_of: the span of an earlier window that gave this very clip (not stored again)
    owned: bool = True
    duplicate_of: str | None = None


class _Abortable(Protocol):
    def abort(self) -> None:
        """Close the output (ignoring errors) and delete its file."""


class CleanupRegistry:
    """Temp files and open clip outputs of the input being worked on, undone if it is rejected.

    The clip passes register each output before (re-encode) or right after (stream copy) opening
    it; a clip that makes it into the result is the parent's to delete from then on.
    """

    def __init__(self) -> None:
        self._files: list[str] = []
        self._encoders: list[_Abortable] = []

    def add_file(self, path: str) -> None:
        """A finished file (the video-only copy of an MP4) to delete on rejection."""
        self._files.append(path)

    def forget_file(self, path: str) -> None:
        """``path`` was not written after all (nothing to delete)."""
        self._files.remove(path)

    def add_encoder(self, enc: _Abortable) -> None:
        """An output being written (:class:`_ClipEncoder`, :class:`_CopyClip`): aborted on rejection."""
        self._encoders.append(enc)

    def wrote_output(self) -> bool:
        """True once any output was registered (an unexpected failure is then an 'encode' one)."""
        return bool(self._files or self._encoders)

    def close_all(self) -> None:
        for enc in self._encoders:
            enc.abort()
        for path in self._files:
            unlink_quiet(path)


# ---- re-encode ----------------------------------------------------------------------------------
# _Transcoder: demux → decode → (_FrameShaper: rotate, resize, yuv420p) → one _ClipEncoder per
# clip open at that time (overlapping windows share the decoded and shaped frame).

class _Rotator:
    """Applies display-matrix rotation with FFmpeg's transpose/flip filters (frames come out upright)."""

    def __init__(self, stream, rotation: int) -> None:
        import av

        self.graph = av.filter.Graph()
        src = self.graph.add_buffer(template=stream)
        rot = ((rotation + 180) % 360) - 180  # → -180..179; counter-clockwise degrees
        if rot == 90:
            chain = [("transpose", "cclock")]
        elif rot == -90:
            chain = [("transpose", "clock")]
        else:
            chain = [("hflip", None), ("vflip", None)]
        nodes = [src] + [self.graph.add(name, arg) if arg else self.graph.add(name) for name, arg in chain]
        nodes.append(self.graph.add("buffersink"))
        self.graph.link_nodes(*nodes).configure()

    def __call__(self, frame):
        self.graph.vpush(frame)
        return self.graph.vpull()


class _FrameShaper:
    """Source frame → output frame: upright, square pixels, the output size, yuv420p.

    Rotation and size are fixed by the first frame shaped (``size`` is None until then).
    """

    def __init__(self, stream, short_side: int | None) -> None:
        self.stream = stream
        self.short_side = short_side
        self.size: tuple[int, int] | None = None
        self.rotation = 0  # counter-clockwise degrees, from the first frame
        self.rotator: _Rotator | None = None
        self.reformatter = None  # av VideoReformatter, made on first use

    def _fix_geometry(self, frame) -> None:
        rotation = int(round(frame.rotation or 0))
        self.rotation = rotation
        if rotation % 360:
            self.rotator = _Rotator(self.stream, rotation)
        # Non-square pixels (anamorphic DV/HDV/DVD: sample aspect ratio != 1): output square
        # pixels at the display aspect, as players show it (the width is scaled by the SAR).
        sar = _sample_aspect(self.stream)
        w, h = (frame.width * sar, frame.height)
        w, h = (h, w) if rotation % 180 else (w, h)
        self.size = even_size(w, h, self.short_side)

    def __call__(self, frame):
        if self.size is None:
            self._fix_geometry(frame)
        if self.rotator is not None:
            frame = self.rotator(frame)
        w, h = self.size
        if frame.width == w and frame.height == h and frame.format.name == "yuv420p":
            return frame
        # One reused, single-threaded converter per input: frame.reformat() builds a new
        # multi-threaded swscale context per frame, 3.7x slower (1.14 vs 0.31 ms per 720p frame).
        if self.reformatter is None:
            from av.video.reformatter import VideoReformatter  # noqa: PLC0415

            self.reformatter = VideoReformatter()
        return self.reformatter.reformat(frame, width=w, height=h, format="yuv420p", interpolation="AREA",
                                         threads=1)


class _ClipEncoder:
    """One output clip: an mp4 file in the temp area fed frames at a constant rate."""

    def __init__(self, task: ShardTask, path: str, start: Fraction, end: Fraction | float, span: str,
                 size: tuple[int, int], fps: Fraction, cleanup: CleanupRegistry) -> None:
        import av

        self.start, self.end, self.span = start, end, span
        self.fps = fps
        self.step = 1 / fps  # output frame interval; exact Fractions are slow: computed once
        self.index = 0  # next output frame index
        self.keyframes: list[int] = []
        self.last_time = start
        self.path = path
        self.out = None
        cleanup.add_encoder(self)  # before the file exists: a failed open is undone too
        self.out = av.open(self.path, "w", format="mp4", options={"fflags": "+bitexact"})
        try:
            self.stream = self.out.add_stream(task.encoder, rate=fps, options=encoder_options(task))
            self.stream.width, self.stream.height = size
            self.stream.pix_fmt = "yuv420p"
            cc = self.stream.codec_context
            cc.time_base = 1 / fps
            cc.thread_count = task.threads
            cc.thread_type = "FRAME" if task.threads > 1 else "SLICE"
        except Exception:
            self.out.close()
            raise

    def next_time(self) -> Fraction:
        """Source time shown by the next output frame: the middle of its interval (module docstring)."""
        return self.start + (self.index + _HALF) * self.step

    def _mux(self, packets) -> None:
        for p in packets:
            if p.is_keyframe and p.pts is not None:
                self.keyframes.append(int(round(float(p.pts * p.time_base) * self.fps)))
            self.out.mux(p)

    def add(self, frame, time: Fraction) -> None:
        # The decoder marks the source's keyframes as pict_type I, and x264 honours that as a
        # forced keyframe: clear it so the GOP is exactly ``gop`` frames.
        frame.pict_type = 0
        frame.pts = self.index
        frame.time_base = self.stream.codec_context.time_base
        self._mux(self.stream.encode(frame))
        self.index += 1
        self.last_time = time

    def finish(self) -> None:
        self._mux(self.stream.encode(None))
        self.out.close()

    def abort(self) -> None:
        if self.out is not None:
            try:
                self.out.close()
            except Exception:  # noqa: BLE001 - already failing; the file is deleted next
                pass
        unlink_quiet(self.path)


_HALF = Fraction(1, 2)


class _Shown(NamedTuple):
    """A decoded source frame and the interval [start, start + duration) it is shown over."""

    frame: Any
    start: Fraction
    duration: Fraction


class _Transcoder:
    """One decode → one encode pass over an input; :meth:`run` returns its clips.

    A decoded frame is held back (``pending``) until the next one arrives: only then is the end of
    the interval it is shown over known, and it is handed to every open clip (``active``) for the
    output frames whose interval middle falls inside. Times are exact Fractions (timestamp × time
    base) from ``t_origin`` on.
    """

    def __init__(self, container, info: dict[str, Any], task: ShardTask, cleanup: CleanupRegistry) -> None:
        import av

        self.container, self.info, self.task, self.cleanup = container, info, task, cleanup
        vs = self.vs = container.streams.video[0]
        vs.thread_type = "SLICE"  # frame threading can mislabel frames; slices keep order exact
        vs.codec_context.thread_count = task.threads
        self.plan = Plan(task)
        if self.plan.start:
            # Start decoding from the keyframe before the span instead of the file's beginning.
            try:
                container.seek(int((self.plan.start + (info["start"] or 0.0)) / vs.time_base), stream=vs,
                               backward=True)
            except av.FFmpegError:
                container.seek(0, stream=vs)
        src_rate = info["rate"]
        self.default_dur = 1 / Fraction(src_rate) if src_rate else Fraction(1, 25)
        self.t_origin: Fraction | None = info["start_exact"]
        # None: no rate in the headers; the first frame's duration then sets it.
        self.out_fps: Fraction | None = _fps_fraction(task.fps) if task.fps else (
            _fps_fraction(src_rate) if src_rate else None)
        self.shaper = _FrameShaper(vs, task.short_side)
        self.active: list[_ClipEncoder] = []
        self.done: list[tuple[_ClipEncoder, Fraction]] = []  # (finished clip, its end time)
        self.opened = 0  # clip files opened (numbers the temp files)
        self.pending: _Shown | None = None
        self.packets = 0  # video packets read (for check_complete)

    def run(self) -> list[ClipRecord]:
        import av

        try:
            for frame in self._decoded_frames():
                if self._take(frame):
                    break
            else:
                if self.pending is not None:
                    self._end_of_stream()
        except av.FFmpegError as exc:
            raise Reject("encode", f"{type(exc).__name__}: {exc}") from None
        if self.pending is None:
            dur = self.info.get("duration")
            if self.plan.start and dur is not None and self.plan.start >= Fraction(repr(dur)):
                # The seek went past the last frame (MPEG-TS and others): a plan problem, not damage.
                raise Reject("plan", _after_end(float(self.plan.start), dur))
            raise Reject("decode", "no frame could be decoded")
        return self._records()

    def _decoded_frames(self):
        """The video stream's frames in presentation order; counts the packets read."""
        import av

        vs = self.vs
        for packet in self.container.demux(vs):
            if packet.is_corrupt:
                raise _damaged(packet, vs.time_base)
            if not _is_flush(packet):
                self.packets += 1
            try:
                frames = packet.decode()
            except av.FFmpegError as exc:
                at = f"{float(packet.pts * vs.time_base):.3f}s" if packet.pts is not None else "unknown time"
                raise Reject("decode", f"decode error at {at}: {exc}") from None
            for frame in frames:
                if frame.is_corrupt:
                    raise Reject("decode", f"corrupt frame at {frame.time}s (damaged stream)")
                yield frame

    def _times(self, frame) -> tuple[Fraction, Fraction]:
        """(start, duration) of a decoded frame, exact seconds from the time origin."""
        prev = self.pending
        ftb = frame.time_base or self.vs.time_base
        if frame.pts is None or ftb is None:
            t = (prev.start + prev.duration) if prev is not None else Fraction(0)
        else:
            t = frame.pts * Fraction(ftb)
            if self.t_origin is None:
                self.t_origin = t
            t -= self.t_origin
        dur = frame.duration * Fraction(ftb) if frame.duration and ftb else self.default_dur
        if self.out_fps is None:  # no rate in the headers: trust the first frame's duration
            self.out_fps = _fps_fraction(1 / dur)
        if prev is None and not self.plan.start and self.t_origin is not None and 0 < t <= dur:
            # The first frame up to one frame after the stream's start time is a timestamp
            # artifact (AVI with B-frames: the reorder delay), not a gap: the video starts
            # here. (A longer gap, e.g. a stream cut mid-GOP, is not padded either: clips
            # start at the first frame, see _emit.)
            self.t_origin += t
            t = Fraction(0)
        return t, dur

    def _take(self, frame) -> bool:
        """Hold ``frame`` back and emit the previous one; True when no clip needs more frames."""
        t, dur = self._times(frame)
        prev = self.pending
        if prev is None:
            self.pending = _Shown(frame, t, dur)
        elif t <= prev.start:  # non-increasing timestamp: this frame replaces the previous one
            self.pending = _Shown(frame, prev.start, dur)
        else:
            self._emit(prev.frame, prev.start, t)
            self.pending = _Shown(frame, t, dur)
            return self.plan.finished(t) and not self.active
        return False

    def _end_of_stream(self) -> None:
        """The last frame lasts its own duration; open clips end here."""
        last = self.pending
        end = last.start + last.duration
        check_complete(self.container, self.vs, None if self.plan.start else self.packets,
                       end + (self.t_origin or 0))
        self._emit(last.frame, last.start, end)
        for clip in list(self.active):
            self._finish(clip, min(clip.end, end))

    def _open_clips(self, a: Fraction, b: Fraction) -> None:
        """Open an encoder for each planned clip starting before ``b``."""
        for s, e, span in self.plan.clips_starting_before(b):
            # Only the first frame can come after a planned start (a stream cut mid-GOP, whose
            # frames before the first keyframe do not decode; B-frame reorder delay): the clip
            # starts at that frame instead of repeating it back to the planned start, and a
            # window that ends before it holds no frame of the video at all.
            if e <= a:
                continue
            path = self.task.clip_path(self.opened)
            self.opened += 1
            self.active.append(_ClipEncoder(self.task, path, max(s, a), e, span, self.shaper.size, self.out_fps,
                                            self.cleanup))

    def _emit(self, raw, a: Fraction, b: Fraction) -> None:
        """Source frame ``raw`` shown over [a, b): feed it to each clip for each output frame whose
        interval middle ``start + (k + 1/2)/fps`` falls inside (see the module docstring)."""
        if self.shaper.size is None:
            self.shaper(raw)  # fixes the output size before the first encoder opens
        self._open_clips(a, b)
        shaped = None  # converted once, only when some clip uses this frame
        for clip in list(self.active):
            t = clip.next_time()
            while t < b and t < clip.end:
                if shaped is None:
                    shaped = self.shaper(raw)
                clip.add(shaped, t)
                t = clip.next_time()
            if t >= clip.end:
                self._finish(clip, clip.end)

    def _finish(self, clip: _ClipEncoder, end: Fraction) -> None:
        clip.finish()
        self.active.remove(clip)
        self.done.append((clip, end))

    def _records(self) -> list[ClipRecord]:
        task, (width, height) = self.task, self.shaper.size
        return [ClipRecord(start=float(clip.start), end=float(end), frames=clip.index, path=clip.path,
                           span=clip.span, width=width, height=height, fps=float(clip.fps),
                           keyframes=sorted(set(clip.keyframes)), codec=task.codec, pix_fmt="yuv420p",
                           gop=task.gop, bframes=task.bframes, copy=False, rotation=self.shaper.rotation)
                for clip, end in self.done]


# ---- stream copy --------------------------------------------------------------------------------
# _StreamCopier: demux only; packets go to the output as they are, GOP by GOP (_CopyClip), or the
# whole source file is the clip (verbatim). The first keyframe is read for rotation/pixel format.

def _first_key_facts(vs, packet, info: dict[str, Any], path: str) -> tuple[int, str | None]:
    """(display rotation in counter-clockwise degrees, pixel format) for stream copy.

    Read from headers when they settle it (H.264 in an MP4: identity ``mvhd``/``tkhd`` matrices,
    no display-orientation SEI in the first keyframe, an 8-bit 4:2:0 limited-range SPS; see
    :mod:`vidssl.shard.headers`); otherwise by decoding the first keyframe ``packet``
    (single-threaded, then flushed): the display matrix is stream side data that PyAV 18 does not
    expose on the stream, and the decoder attaches it to every frame.
    """
    from vidssl.shard import headers

    cc = vs.codec_context
    if info.get("iso_bmff") and cc is not None and cc.name == "h264":
        data = bytes(packet)
        pix = info["pix_fmt"] or headers.h264_pix_fmt(cc.extradata, cc.color_range, data)
        if (pix is not None and headers.h264_orientation_sei(cc.extradata, data) is False
                and headers.mp4_display_matrix_is_identity(path, vs.id)):
            return 0, pix
    return _decoded_facts(vs, packet)


def _decoded_facts(vs, packet) -> tuple[int, str | None]:
    """(rotation, pixel format) of the frame that decoding ONE keyframe packet gives."""
    cc = vs.codec_context
    cc.thread_count = 1
    cc.thread_type = "SLICE"
    frames = list(cc.decode(packet)) + list(cc.decode(None))
    if not frames:
        return 0, None
    return int(round(frames[0].rotation or 0)), frames[0].format.name


class _CopyClip:
    """One remuxed output clip: an mp4 file in the temp area fed whole GOPs of source packets."""

    def __init__(self, path: str, stream, start: Fraction, end: Fraction | float, span: str) -> None:
        import av

        self.start, self.end, self.span = start, end, span  # the planned window (seconds from the origin)
        self.path = path
        self.out = av.open(path, "w", format="mp4", options={"fflags": "+bitexact"})
        try:
            self.ostream = self.out.add_stream_from_template(stream)
        except ValueError as exc:  # PyAV: "'mp4' format does not support 'prores' codec"
            self.out.close()
            unlink_quiet(path)
            raise Reject("plan", f"stream copy: {exc}; use copy=false to re-encode it") from None
        except Exception:
            self.out.close()
            raise
        self.offset: int | None = None  # subtracted from every timestamp: the clip starts at 0
        self.pts: list[int] = []  # presentation times of the packets written (output ticks)
        self.key_pts: list[int] = []  # … of its keyframes
        self.first: Fraction | None = None  # start of its first GOP (None: no GOP written)
        self.last: Fraction | None = None  # end of its last GOP

    def add_gop(self, gop: list, g_start: Fraction, g_end: Fraction, time_base) -> None:
        """Write the packets of one GOP (``gop[0]`` its keyframe) shown over [g_start, g_end)."""
        import av

        if self.offset is None:
            # First GOP of this clip: leading pictures (shown before the keyframe) need the
            # previous GOP, which this clip does not have: leave them out.
            key_pts = gop[0].pts
            use = [p for p in gop if p.pts >= key_pts]
            self.offset = min(p.dts if p.dts is not None else p.pts for p in use)
            self.first = g_start
        else:
            use = gop
        self.last = g_end
        off = self.offset
        for p in use:
            # A copy of the payload only (the same packet may go to overlapping clips): its
            # duration and keyframe flag must be set again, or the MP4 muxer trims the last
            # frame with its edit list and marks every sample (non-H.264) as a sync sample.
            q = av.Packet(p)
            q.pts = p.pts - off
            q.dts = (p.dts - off) if p.dts is not None else None
            q.duration = p.duration
            q.is_keyframe = p.is_keyframe
            q.time_base = time_base
            q.stream = self.ostream
            self.pts.append(q.pts)
            if p.is_keyframe:
                self.key_pts.append(q.pts)
            self.out.mux(q)

    def close(self) -> None:
        self.out.close()

    def abort(self) -> None:
        try:
            self.out.close()
        except Exception:  # noqa: BLE001 - already failing; the file is deleted next
            pass
        unlink_quiet(self.path)


class _StreamCopier:
    """Stream copy of one input; :meth:`run` returns its clips.

    Whole-video plans of an MP4 are taken verbatim (one demux-only pass gives frame count and
    keyframes): a single-stream file's bytes go into the tar as they are, a file with other tracks
    is rewritten without them at the box level (:func:`headers.mp4_video_only`, the video track
    byte for byte). Everything else is remuxed GOP by GOP: a clip covers every GOP overlapping its
    planned span.

    Timing is exact integer ticks of the stream time base; a GOP boundary becomes a Fraction once.
    Open-GOP sources: packets that follow a keyframe in decode order but are shown BEFORE it
    (leading B-frames) reference the previous GOP, so they are dropped from the clip that starts
    at that keyframe (they belong to, and are decodable in, the clip before it).
    """

    def __init__(self, container, info: dict[str, Any], task: ShardTask, cleanup: CleanupRegistry) -> None:
        from av.stream import Discard

        self.container, self.info, self.task, self.cleanup = container, info, task, cleanup
        vs = self.vs = container.streams.video[0]
        for other in container.streams:
            if other.index != vs.index:
                other.discard = Discard.all  # the demuxer then skips their packets without reading them
        self.vs_tb = vs.time_base  # a new Fraction on every access: read once
        self.tb = tb = Fraction(self.vs_tb)
        self.origin: int | None = vs.start_time  # ticks; None → the first packet's pts
        self.plan = Plan(task)
        self.default_dur = (max(1, int(round(1 / (float(info["fps"]) * tb)))) if info["fps"]
                            else max(1, round(1 / (25 * tb))))
        self.key_checked = False  # the first keyframe's rotation and pixel format were read
        self.open: list[_CopyClip] = []  # clips still taking GOPs
        self.done: list[_CopyClip] = []  # closed clips

    def run(self) -> list[ClipRecord]:
        import av

        if self.plan.mode == "whole" and self.info.get("iso_bmff"):
            rec = self._verbatim()
            if rec is not None and len(self.container.streams) == 1:
                return [rec]
            if rec is not None:
                rec = self._video_only(rec)
                if rec is not None:
                    return [rec]
            try:
                self.container.seek(0, stream=self.vs)  # not verbatim after all: remux from the start
            except av.FFmpegError as exc:
                raise Reject("decode", f"cannot read the video again from its start ({exc}); "
                                       "the file may be truncated") from None
        self._remux()
        return self._records()

    def _check_first_key(self, packet) -> None:
        """Read rotation and pixel format at the first keyframe; reject a rotated video."""
        if self.key_checked:
            return
        rot, pix = _first_key_facts(self.vs, packet, self.info, self.task.path)
        self.key_checked = True
        if rot % 360:
            raise Reject("plan", f"rotation metadata ({rot} degrees) needs a re-encode to come out upright; "
                         "stream copy cannot apply it (use copy=false)")
        if pix:
            self.info["pix_fmt"] = self.info["pix_fmt"] or pix

    # -- whole file, verbatim

    def _verbatim(self) -> ClipRecord | None:
        """The whole file as is, when that is exactly what a remux would give: one demux-only pass
        (no decode beyond the first keyframe) collects presentation times and keyframes. Returns None
        (remux instead) when the first packet is not a keyframe, when the demuxer marks packets to
        discard (an edit list trims frames), or when any frame is shown before the first keyframe."""
        pts_list: list[int] = []
        key_pts: list[int] = []
        last_end = 0
        first = True
        for packet in self.container.demux(self.vs):
            pts = packet.pts
            if pts is None:
                if packet.size == 0:
                    continue
                return None
            if packet.is_corrupt:
                raise _damaged(packet, self.tb)
            if first:
                if not packet.is_keyframe:
                    return None
                self._check_first_key(packet)
                first = False
            if packet.is_discard:
                return None
            if packet.is_keyframe:
                key_pts.append(pts)
            pts_list.append(pts)
            last_end = max(last_end, pts + (packet.duration or self.default_dur))
        if first or min(pts_list) < pts_list[0]:
            return None
        check_complete(self.container, self.vs, len(pts_list), None)
        origin = pts_list[0] if self.origin is None else self.origin
        return ClipRecord(start=float((pts_list[0] - origin) * self.tb), end=float((last_end - origin) * self.tb),
                          frames=len(pts_list), path=self.task.path, owned=False, span="full",
                          **_copy_facts(self.info), keyframes=_keyframe_indices(pts_list, key_pts))

    def _video_only(self, rec: ClipRecord) -> ClipRecord | None:
        """``rec`` as a copy of the MP4 without its other tracks (audio, …): the video track's boxes
        and bytes as they are (headers.mp4_video_only), instead of a packet by packet remux."""
        from vidssl.shard.headers import mp4_video_only

        path = self.task.clip_path(0)
        self.cleanup.add_file(path)
        if mp4_video_only(self.task.path, self.vs.id, path):
            return replace(rec, path=path, owned=True)
        self.cleanup.forget_file(path)
        return None

    # -- remux, GOP by GOP

    def _remux(self) -> None:
        """Collect each GOP's packets; at the next keyframe hand the GOP to the clips it overlaps."""
        import av

        tb = self.tb
        gop: list = []
        g_start = 0  # ticks from the origin
        last_end = 0
        started = False  # a keyframe was seen (packets before it cannot be decoded on their own)
        packets = 0
        try:
            for packet in self.container.demux(self.vs):
                pts = packet.pts
                if pts is None:
                    if packet.size == 0:
                        continue  # the demuxer's end-of-stream marker
                    raise Reject("plan", "packets without timestamps: cannot stream copy (use copy=false)")
                if packet.is_corrupt:
                    raise _damaged(packet, tb)
                packets += 1
                if self.origin is None:
                    self.origin = pts
                t = pts - self.origin
                last_end = max(last_end, t + (packet.duration or self.default_dur))
                if packet.is_keyframe:
                    self._check_first_key(packet)
                    if gop:
                        self._flush_gop(gop, g_start, t)
                        gop = []
                        if self.plan.finished(t * tb) and not self.open and self.done:
                            break
                    g_start = t
                    started = True
                elif not started:
                    continue
                gop.append(packet)
            else:
                check_complete(self.container, self.vs, packets, (last_end + (self.origin or 0)) * tb)
                if gop:
                    self._flush_gop(gop, g_start, last_end)
            for clip in self.open:
                clip.close()
                self.done.append(clip)
        except av.FFmpegError as exc:
            raise Reject("encode", f"remux failed: {exc}") from None

    def _flush_gop(self, gop: list, g_start: int, g_end: int) -> None:
        gs, ge = g_start * self.tb, g_end * self.tb  # exact seconds from the origin
        for s, e, span in self.plan.clips_starting_before(ge):
            path = self.task.clip_path(len(self.open) + len(self.done))
            clip = _CopyClip(path, self.vs, s, e, span)
            self.cleanup.add_encoder(clip)
            self.open.append(clip)
        for clip in list(self.open):
            if gs >= clip.end:
                clip.close()
                self.open.remove(clip)
                self.done.append(clip)
            elif ge > clip.start:
                clip.add_gop(gop, gs, ge, self.vs_tb)

    def _records(self) -> list[ClipRecord]:
        out = []
        landed: dict[tuple, str] = {}  # (first, last) GOP bounds → span of the window kept for them
        for clip in sorted(self.done, key=lambda c: c.start):
            if clip.first is None:
                out.append(ClipRecord(start=float(clip.start), end=float(clip.start), frames=0, path=clip.path,
                                      span=clip.span))
                continue
            bounds = (clip.first, clip.last)
            if bounds in landed:
                # GOPs longer than the stride: this window lands on exactly the clip an earlier one
                # gave (same keyframes, same bytes). Keep it once instead of storing copies.
                out.append(ClipRecord(start=float(clip.first), end=float(clip.last), frames=len(clip.pts),
                                      path=clip.path, span=clip.span, duplicate_of=landed[bounds]))
                continue
            landed[bounds] = clip.span
            out.append(ClipRecord(start=float(clip.first), end=float(clip.last), frames=len(clip.pts),
                                  path=clip.path, span=clip.span, **_copy_facts(self.info),
                                  keyframes=_keyframe_indices(clip.pts, clip.key_pts)))
        return out


def _keyframe_indices(pts: list[int], key_pts: list[int]) -> list[int]:
    """Positions of the keyframes ``key_pts`` among the frames ``pts`` in presentation order."""
    index = {p: i for i, p in enumerate(sorted(pts))}
    return sorted(index[p] for p in key_pts)


def _copy_facts(info: dict[str, Any]) -> dict[str, Any]:
    return {"width": info["width"], "height": info["height"], "fps": float(info["fps"] or 0.0),
            "codec": info["codec"], "pix_fmt": info["pix_fmt"], "gop": None, "bframes": None, "copy": True,
            "rotation": 0}


# ---- the worker entry point ---------------------------------------------------------------------
# worker.py → process_input(ShardTask) → InputResult → worker.py → the parent (pipeline.py).

def process_input(task: ShardTask) -> InputResult:
    """Probe, plan and transcode one input. Never raises for bad media: returns error records."""
    cleanup = CleanupRegistry()
    container = None
    try:
        container, iso_bmff = open_input(task.path, quick=task.copy)
        info = probe(container)
        info["iso_bmff"] = iso_bmff
        if task.copy:
            clips = _StreamCopier(container, info, task, cleanup).run()  # rejects rotated inputs itself
        else:
            clips = _Transcoder(container, info, task, cleanup).run()
    except Reject as rej:
        cleanup.close_all()
        if not task.strict and rej.stage == "probe":
            return InputResult(task.index, skipped=True)  # a non-video file found while walking a folder
        return InputResult.rejected(task.index, rej.stage, rej.reason)
    except Exception as exc:  # noqa: BLE001 - any other failure rejects the input, with its reason
        stage = "encode" if cleanup.wrote_output() else "decode"
        cleanup.close_all()
        return InputResult.rejected(task.index, stage, f"{type(exc).__name__}: {exc}")
    finally:
        if container is not None:
            container.close()
    samples: list[Sample] = []
    errors: list[ErrorRecord] = []
    for rec in sorted(clips, key=lambda r: (r.start, r.span)):
        seconds = rec.end - rec.start
        if rec.duplicate_of:
            unlink_quiet(rec.path)
            errors.append({
                "stage": "plan", "start": round(rec.start, 6), "end": round(rec.end, 6),
                "reason": f"stream copy: window {rec.span} s lands on the same keyframe-aligned clip as window "
                          f"{rec.duplicate_of} s (a GOP longer than clip_stride); stored once", "_short": True})
        elif rec.frames == 0 or seconds < task.min_seconds - 1e-9:
            if rec.owned:
                unlink_quiet(rec.path)
            errors.append(_dropped_clip(rec, seconds, task.min_seconds))
        else:
            # owned=False: the file is the SOURCE itself (verbatim stream copy); the writer must not delete it.
            samples.append(Sample(meta=_sample_meta(task, info, rec), file=rec.path, size=os.path.getsize(rec.path),
                                  owned=rec.owned))
    if not samples and not errors:
        errors.append({"stage": "plan", "reason": _nothing_planned(task, info)})
    return InputResult(task.index, samples=samples, errors=errors)


def _dropped_clip(rec: ClipRecord, seconds: float, min_seconds: float) -> ErrorRecord:
    """The plan record of a clip too short to keep."""
    # A window tail shorter than half an output frame holds no frame: a short clip, not an error.
    short = rec.frames > 0 or seconds > 0
    if rec.frames == 0:
        why = ("no frames inside the span" if seconds <= 0 else
               f"clip too short to hold one frame ({seconds:.3f}s at {rec.fps:g} fps)")
    else:
        why = f"clip shorter than min_seconds ({seconds:.3f}s < {min_seconds}s)"
    return {"stage": "plan", "reason": why, "start": round(rec.start, 6), "end": round(rec.end, 6), "_short": short}


def _nothing_planned(task: ShardTask, info: dict[str, Any]) -> str:
    """The reason for an input that gave no clip and no other error."""
    start, end, dur = task.start, task.end, info.get("duration")
    if start is not None and dur is not None and start >= dur:
        return _after_end(start, dur)
    if start is not None or end is not None:
        return f"no decodable frame inside the span {start or 0:g}-{'end' if end is None else f'{end:g}'}s"
    return "no clip planned inside the video"


def _sample_meta(task: ShardTask, info: dict[str, Any], rec: ClipRecord) -> dict[str, Any]:
    """The clip's ``KEY.json``."""
    meta = {
        "key": make_key(task.path, rec.span), "source": printable(task.path), "source_codec": info["codec"],
        "source_width": info["width"], "source_height": info["height"],
        "source_fps": round(info["fps"], 6) if info["fps"] else None,
        "source_duration": round(info["duration"], 6) if info["duration"] is not None else None,
        "clip_start": round(rec.start, 6), "clip_end": round(rec.end, 6),
        "fps": round(rec.fps, 6), "frames": rec.frames, "width": rec.width, "height": rec.height,
        "keyframes": rec.keyframes, "codec": rec.codec, "pix_fmt": rec.pix_fmt, "gop": rec.gop,
        "bframes": rec.bframes, "copy": rec.copy, "label": task.label,
        "label_name": task.label_name, "extra": task.extra,
    }
    if rec.rotation:
        meta["source_rotation"] = rec.rotation
    return meta
