"""Per-input work done in a worker process: probe → plan clips → one decode → one encode pass.

:func:`process_input` takes a plain-dict task and returns a plain-dict result (both pickled
between processes). Encoded clips are written to files in the OUTDIR temp area, never kept in
RAM; the result carries their paths and the ``KEY.json`` metadata. Any failure rejects the
whole input (no partial input ever reaches a shard): the result then has no samples and one
error record with the stage that failed.

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
from fractions import Fraction
from typing import Any

from vidssl.shard.sources import make_key, printable

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


def encoder_options(task: dict[str, Any]) -> dict[str, str]:
    """Explicit encoder settings: rate control, preset, fixed GOP (no scene-cut keyframes), B-frames."""
    enc, gop, bf, crf, preset = task["encoder"], task["gop"], task["bframes"], task["crf"], task["preset"]
    if enc == "libx264":
        # In x264-params so nothing is silently dropped: scenecut=0 is what makes the GOP truly fixed.
        return {"crf": str(crf), "preset": preset, "g": str(gop), "bf": str(bf),
                "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bf}:open-gop=0"}
    if enc == "libx265":
        return {"crf": str(crf), "preset": preset, "x265-params":
                f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes={bf}:open-gop=0:log-level=error:"
                f"pools=none:frame-threads={task['threads']}"}
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

    def __init__(self, task: dict[str, Any]) -> None:
        # Exact fractions: window bounds are compared with exact frame times.
        self.clip_seconds = exact(task["clip_seconds"])
        self.stride = exact(task["clip_stride"]) or self.clip_seconds
        self.start = exact(task.get("start"))
        self.end = exact(task.get("end"))
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


# ---- re-encode ----------------------------------------------------------------------------------

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


class _ClipEncoder:
    """One output clip: an mp4 file in the temp area fed frames at a constant rate."""

    def __init__(self, task, start: float, end: float, span: str, size: tuple[int, int], fps: Fraction) -> None:
        import av

        self.start, self.end, self.span = start, end, span
        self.fps = fps
        self.index = 0  # next output frame index
        self.keyframes: list[int] = []
        self.last_time = start
        self.path = os.path.join(task["tmpdir"], f"{task['index']:08d}-{len(task['_clips'])}.mp4")
        task["_clips"].append(self)
        self.out = av.open(self.path, "w", format="mp4", options={"fflags": "+bitexact"})
        try:
            self.stream = self.out.add_stream(task["encoder"], rate=fps, options=encoder_options(task))
            self.stream.width, self.stream.height = size
            self.stream.pix_fmt = "yuv420p"
            cc = self.stream.codec_context
            cc.time_base = 1 / fps
            cc.thread_count = task["threads"]
            cc.thread_type = "FRAME" if task["threads"] > 1 else "SLICE"
        except Exception:
            self.out.close()
            raise

    def _mux(self, packets) -> None:
        for p in packets:
            if p.is_keyframe and p.pts is not None:
                self.keyframes.append(int(round(float(p.pts * p.time_base) * self.fps)))
            self.out.mux(p)

    def add(self, frame, time: float) -> None:
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
        try:
            self.out.close()
        except Exception:  # noqa: BLE001 - already failing; the file is deleted next
            pass
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _transcode(container, info: dict[str, Any], task: dict[str, Any]) -> list[dict[str, Any]]:
    """One decode → one encode pass; returns finished clip records (sample meta + tmp file)."""
    import av

    vs = container.streams.video[0]
    vs.thread_type = "SLICE"  # frame threading can mislabel frames; slices keep order exact
    vs.codec_context.thread_count = task["threads"]
    plan = Plan(task)
    if plan.start:
        # Start decoding from the keyframe before the span instead of the file's beginning.
        try:
            container.seek(int((plan.start + (info["start"] or 0.0)) / vs.time_base), stream=vs, backward=True)
        except av.FFmpegError:
            container.seek(0, stream=vs)
    src_rate = info["rate"]
    # Exact times (Fraction seconds) from here on: timestamp × time base, no float rounding.
    default_dur = 1 / Fraction(src_rate) if src_rate else Fraction(1, 25)
    t_origin: Fraction | None = info["start_exact"]
    out_fps: Fraction | None = _fps_fraction(task["fps"]) if task["fps"] else (
        _fps_fraction(src_rate) if src_rate else None)
    active: list[_ClipEncoder] = []
    done: list[dict[str, Any]] = []
    state: dict[str, Any] = {"rotator": None, "size": None, "rotation": 0, "reformatter": None}

    def transformed(frame):
        if state["size"] is None:
            rotation = int(round(frame.rotation or 0))
            state["rotation"] = rotation
            if rotation % 360:
                state["rotator"] = _Rotator(vs, rotation)
            # Non-square pixels (anamorphic DV/HDV/DVD: sample aspect ratio != 1): output square
            # pixels at the display aspect, as players show it (the width is scaled by the SAR).
            sar = _sample_aspect(vs)
            w, h = (frame.width * sar, frame.height)
            w, h = (h, w) if rotation % 180 else (w, h)
            state["size"] = even_size(w, h, task["short_side"])
        if state["rotator"] is not None:
            frame = state["rotator"](frame)
        w, h = state["size"]
        if frame.width == w and frame.height == h and frame.format.name == "yuv420p":
            return frame
        # One reused, single-threaded converter per input: frame.reformat() builds a new
        # multi-threaded swscale context per frame, 3.7x slower (1.14 vs 0.31 ms per 720p frame).
        if state["reformatter"] is None:
            from av.video.reformatter import VideoReformatter  # noqa: PLC0415

            state["reformatter"] = VideoReformatter()
        return state["reformatter"].reformat(frame, width=w, height=h, format="yuv420p", interpolation="AREA",
                                             threads=1)

    def emit(raw, a: Fraction, b: Fraction) -> None:
        """Source frame ``raw`` shown over [a, b): feed it to each clip for each output frame whose
        interval middle ``start + (k + 1/2)/fps`` falls inside (see the module docstring)."""
        if state["size"] is None:
            transformed(raw)  # fixes the output size before the first encoder opens
        for s, e, span in plan.clips_starting_before(b):
            # Only the first frame can come after a planned start (a stream cut mid-GOP, whose
            # frames before the first keyframe do not decode; B-frame reorder delay): the clip
            # starts at that frame instead of repeating it back to the planned start, and a
            # window that ends before it holds no frame of the video at all.
            if e <= a:
                continue
            active.append(_ClipEncoder(task, max(s, a), e, span, state["size"], out_fps))
        frame = None
        for clip in list(active):
            step = 1 / clip.fps
            while True:
                t = clip.start + (clip.index + Fraction(1, 2)) * step
                if t >= b or t >= clip.end:
                    break
                if frame is None:  # convert once, only when some clip uses this frame
                    frame = transformed(raw)
                clip.add(frame, t)
            if clip.start + (clip.index + Fraction(1, 2)) * step >= clip.end:
                clip.finish()
                active.remove(clip)
                done.append({"clip": clip, "start": clip.start, "end": clip.end, "frames": clip.index})

    prev = None  # (raw frame, start time, duration)
    try:
        stop = False
        packets = 0
        for packet in container.demux(vs):
            if packet.is_corrupt:
                raise _damaged(packet, vs.time_base)
            if not _is_flush(packet):
                packets += 1
            try:
                frames = packet.decode()
            except av.FFmpegError as exc:
                at = f"{float(packet.pts * vs.time_base):.3f}s" if packet.pts is not None else "unknown time"
                raise Reject("decode", f"decode error at {at}: {exc}") from None
            for frame in frames:
                if frame.is_corrupt:
                    raise Reject("decode", f"corrupt frame at {frame.time}s (damaged stream)")
                ftb = frame.time_base or vs.time_base
                if frame.pts is None or ftb is None:
                    t = (prev[1] + prev[2]) if prev else Fraction(0)
                else:
                    t = frame.pts * Fraction(ftb)
                    if t_origin is None:
                        t_origin = t
                    t -= t_origin
                dur = frame.duration * Fraction(ftb) if frame.duration and ftb else default_dur
                if out_fps is None:  # no rate in the headers: trust the first frame's duration
                    out_fps = _fps_fraction(1 / dur)
                if prev is None and not plan.start and t_origin is not None and 0 < t <= dur:
                    # The first frame up to one frame after the stream's start time is a timestamp
                    # artifact (AVI with B-frames: the reorder delay), not a gap: the video starts
                    # here. (A longer gap, e.g. a stream cut mid-GOP, is not padded either: clips
                    # start at the first frame, see emit.)
                    t_origin += t
                    t = Fraction(0)
                if prev is None:
                    prev = (frame, t, dur)
                elif t <= prev[1]:  # non-increasing timestamp: this frame replaces the previous one
                    prev = (frame, prev[1], dur)
                else:
                    emit(prev[0], prev[1], t)
                    prev = (frame, t, dur)
                    if plan.finished(t) and not active:
                        stop = True
                        break
            if stop:
                break
        if prev is not None and not stop:
            # End of stream: the last frame lasts its own duration; open clips end here.
            end = prev[1] + prev[2]
            check_complete(container, vs, None if plan.start else packets, end + (t_origin or 0))
            emit(prev[0], prev[1], end)
            for clip in list(active):
                clip.finish()
                active.remove(clip)
                done.append({"clip": clip, "start": clip.start, "end": min(clip.end, end), "frames": clip.index})
    except av.FFmpegError as exc:
        raise Reject("encode", f"{type(exc).__name__}: {exc}") from None
    if prev is None:
        dur = info.get("duration")
        if plan.start and dur is not None and plan.start >= Fraction(repr(dur)):
            # The seek went past the last frame (MPEG-TS and others): a plan problem, not damage.
            raise Reject("plan", _after_end(float(plan.start), dur))
        raise Reject("decode", "no frame could be decoded")
    size = state["size"]
    for rec in done:
        clip = rec.pop("clip")
        rec["start"], rec["end"] = float(rec["start"]), float(rec["end"])
        rec.update(width=size[0], height=size[1], fps=float(clip.fps), keyframes=sorted(set(clip.keyframes)),
                   path=clip.path, span=clip.span, codec=task["codec"], pix_fmt="yuv420p", gop=task["gop"],
                   bframes=task["bframes"], copy=False, rotation=state["rotation"])
    return done


# ---- stream copy --------------------------------------------------------------------------------

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


def _copy(container, info: dict[str, Any], task: dict[str, Any]) -> list[dict[str, Any]]:
    """Stream copy. Whole-video plans of an MP4 are taken verbatim (one demux-only pass gives frame
    count and keyframes): a single-stream file's bytes go into the tar as they are, a file with
    other tracks is rewritten without them at the box level (:func:`headers.mp4_video_only`, the
    video track byte for byte). Everything else is remuxed GOP by GOP: a clip covers every GOP
    overlapping its planned span.

    Timing is exact integer ticks of the stream time base; a GOP boundary becomes a Fraction once.
    Open-GOP sources: packets that follow a keyframe in decode order but are shown BEFORE it
    (leading B-frames) reference the previous GOP, so they are dropped from the clip that starts
    at that keyframe (they belong to, and are decodable in, the clip before it).
    """
    import av

    from av.stream import Discard

    vs = container.streams.video[0]
    for other in container.streams:
        if other.index != vs.index:
            other.discard = Discard.all  # the demuxer then skips their packets without reading them
    vs_tb = vs.time_base  # a new Fraction on every access: read once
    tb = Fraction(vs_tb)
    origin = vs.start_time  # ticks; None → the first packet's pts
    plan = Plan(task)
    default_dur = max(1, int(round(1 / (float(info["fps"]) * tb)))) if info["fps"] else max(1, round(1 / (25 * tb)))
    facts: dict[str, Any] = {}

    def first_key(packet) -> None:
        if facts:
            return
        rot, pix = _first_key_facts(vs, packet, info, task["path"])
        facts.update(rotation=rot, pix_fmt=pix)
        if rot % 360:
            raise Reject("plan", f"rotation metadata ({rot} degrees) needs a re-encode to come out upright; "
                         "stream copy cannot apply it (use copy=false)")
        if pix:
            info["pix_fmt"] = info["pix_fmt"] or pix

    if plan.mode == "whole" and info.get("iso_bmff"):
        rec = _copy_verbatim(container, vs, info, task, first_key, origin, tb, default_dur)
        if rec is not None and len(container.streams) == 1:
            return [rec]
        if rec is not None:
            # Other tracks (audio, …) must go: keep the video track's boxes and bytes as they are
            # and drop the rest (headers.mp4_video_only), instead of remuxing packet by packet.
            from vidssl.shard.headers import mp4_video_only

            path = os.path.join(task["tmpdir"], f"{task['index']:08d}-0.mp4")
            task["_clips"].append(path)
            if mp4_video_only(task["path"], vs.id, path):
                rec.update(path=path, owned=True)
                return [rec]
            task["_clips"].remove(path)
        try:
            container.seek(0, stream=vs)  # not verbatim after all: remux from the start
        except av.FFmpegError as exc:
            raise Reject("decode", f"cannot read the video again from its start ({exc}); "
                                   "the file may be truncated") from None

    clips: list[dict[str, Any]] = []
    done: list[dict[str, Any]] = []

    def open_clip(s, e, span):
        path = os.path.join(task["tmpdir"], f"{task['index']:08d}-{len(clips) + len(done)}.mp4")
        out = av.open(path, "w", format="mp4", options={"fflags": "+bitexact"})
        try:
            ostream = out.add_stream_from_template(vs)
        except ValueError as exc:  # PyAV: "'mp4' format does not support 'prores' codec"
            out.close()
            _unlink(path)
            raise Reject("plan", f"stream copy: {exc}; use copy=false to re-encode it") from None
        except Exception:
            out.close()
            raise
        clip = {"s": s, "e": e, "span": span, "path": path, "out": out, "ostream": ostream, "offset": None,
                "pts": [], "key_pts": [], "first": None, "last": None}
        task["_clips"].append(clip)
        return clip

    def flush_gop(gop: list, g_start: int, g_end: int) -> None:
        gs, ge = g_start * tb, g_end * tb  # exact seconds from the origin
        for s, e, span in plan.clips_starting_before(ge):
            clips.append(open_clip(s, e, span))
        key_pts = gop[0].pts
        for clip in list(clips):
            if gs >= clip["e"]:
                clip["out"].close()
                clips.remove(clip)
                done.append(clip)
                continue
            if ge <= clip["s"]:
                continue
            if clip["offset"] is None:
                # First GOP of this clip: leading pictures (shown before the keyframe) need the
                # previous GOP, which this clip does not have: leave them out.
                use = [p for p in gop if p.pts >= key_pts]
                clip["offset"] = min(p.dts if p.dts is not None else p.pts for p in use)
                clip["first"] = gs
            else:
                use = gop
            clip["last"] = ge
            off, ost = clip["offset"], clip["ostream"]
            for p in use:
                # A copy of the payload only (the same packet may go to overlapping clips): its
                # duration and keyframe flag must be set again, or the MP4 muxer trims the last
                # frame with its edit list and marks every sample (non-H.264) as a sync sample.
                q = av.Packet(p)
                q.pts = p.pts - off
                q.dts = (p.dts - off) if p.dts is not None else None
                q.duration = p.duration
                q.is_keyframe = p.is_keyframe
                q.time_base = vs_tb
                q.stream = ost
                clip["pts"].append(q.pts)
                if p.is_keyframe:
                    clip["key_pts"].append(q.pts)
                clip["out"].mux(q)

    gop: list = []
    g_start = 0
    last_end = 0
    started = False
    try:
        packets = 0
        for packet in container.demux(vs):
            pts = packet.pts
            if pts is None:
                if packet.size == 0:
                    continue  # the demuxer's end-of-stream marker
                raise Reject("plan", "packets without timestamps: cannot stream copy (use copy=false)")
            if packet.is_corrupt:
                raise _damaged(packet, tb)
            packets += 1
            if origin is None:
                origin = pts
            t = pts - origin
            last_end = max(last_end, t + (packet.duration or default_dur))
            key = packet.is_keyframe
            if key:
                first_key(packet)
                if gop:
                    flush_gop(gop, g_start, t)
                    gop = []
                    if plan.finished(t * tb) and not clips and done:
                        started = False
                        break
                g_start = t
                started = True
            elif not started:
                continue  # leading packets before the first keyframe cannot be decoded on their own
            gop.append(packet)
        else:
            check_complete(container, vs, packets, (last_end + (origin or 0)) * tb)
            if gop:
                flush_gop(gop, g_start, last_end)
        for clip in clips:
            clip["out"].close()
            done.append(clip)
    except av.FFmpegError as exc:
        raise Reject("encode", f"remux failed: {exc}") from None
    out = []
    landed: dict[tuple, str] = {}  # (first, last) GOP bounds → span of the window kept for them
    for clip in sorted(done, key=lambda c: c["s"]):
        if clip["first"] is None:
            out.append({"start": float(clip["s"]), "end": float(clip["s"]), "frames": 0, "path": clip["path"],
                        "span": clip["span"]})
            continue
        bounds = (clip["first"], clip["last"])
        if bounds in landed:
            # GOPs longer than the stride: this window lands on exactly the clip an earlier one
            # gave (same keyframes, same bytes). Keep it once instead of storing copies.
            out.append({"start": float(clip["first"]), "end": float(clip["last"]), "frames": len(clip["pts"]),
                        "path": clip["path"], "span": clip["span"], "duplicate_of": landed[bounds]})
            continue
        landed[bounds] = clip["span"]
        order = sorted(clip["pts"])
        index = {p: i for i, p in enumerate(order)}
        out.append({"start": float(clip["first"]), "end": float(clip["last"]), "frames": len(order),
                    "path": clip["path"], "span": clip["span"], **_copy_facts(info),
                    "keyframes": sorted(index[p] for p in clip["key_pts"])})
    return out


def _copy_facts(info: dict[str, Any]) -> dict[str, Any]:
    return {"width": info["width"], "height": info["height"], "fps": float(info["fps"] or 0.0),
            "codec": info["codec"], "pix_fmt": info["pix_fmt"], "gop": None, "bframes": None, "copy": True,
            "rotation": 0}


def _copy_verbatim(container, vs, info, task, first_key, origin, tb, default_dur) -> dict[str, Any] | None:
    """The whole file as is, when that is exactly what a remux would give: one demux-only pass
    (no decode beyond the first keyframe) collects presentation times and keyframes. Returns None
    (remux instead) when the first packet is not a keyframe, when the demuxer marks packets to
    discard (an edit list trims frames), or when any frame is shown before the first keyframe."""
    pts_list: list[int] = []
    key_pts: list[int] = []
    last_end = 0
    first = True
    for packet in container.demux(vs):
        pts = packet.pts
        if pts is None:
            if packet.size == 0:
                continue
            return None
        if packet.is_corrupt:
            raise _damaged(packet, tb)
        if first:
            if not packet.is_keyframe:
                return None
            first_key(packet)
            first = False
        if packet.is_discard:
            return None
        if packet.is_keyframe:
            key_pts.append(pts)
        pts_list.append(pts)
        last_end = max(last_end, pts + (packet.duration or default_dur))
    if first or min(pts_list) < pts_list[0]:
        return None
    check_complete(container, vs, len(pts_list), None)
    if origin is None:
        origin = pts_list[0]
    order = sorted(pts_list)
    index = {p: i for i, p in enumerate(order)}
    return {"start": float((pts_list[0] - origin) * tb), "end": float((last_end - origin) * tb),
            "frames": len(order), "path": task["path"], "owned": False, "span": "full", **_copy_facts(info),
            "keyframes": sorted(index[p] for p in key_pts)}


# ---- the worker entry point ---------------------------------------------------------------------

def process_input(task: dict[str, Any]) -> dict[str, Any]:
    """Probe, plan and transcode one input. Never raises for bad media: returns error records."""
    result: dict[str, Any] = {"index": task["index"], "samples": [], "errors": [], "skipped": False}
    task["_clips"] = []
    container = None
    try:
        container, iso_bmff = open_input(task["path"], quick=task["copy"])
        info = probe(container)
        info["iso_bmff"] = iso_bmff
        if task["copy"]:
            clips = _copy(container, info, task)  # rejects rotated inputs itself
        else:
            clips = _transcode(container, info, task)
    except Reject as rej:
        _cleanup(task)
        if not task["strict"] and rej.stage == "probe":
            result["skipped"] = True  # a non-video file found while walking a folder
        else:
            result["errors"].append({"stage": rej.stage, "reason": rej.reason})
        return result
    except Exception as exc:  # noqa: BLE001 - any other failure rejects the input, with its reason
        _cleanup(task)
        result["errors"].append({"stage": "encode" if task["_clips"] else "decode",
                                 "reason": f"{type(exc).__name__}: {exc}"})
        return result
    finally:
        if container is not None:
            container.close()
    for rec in sorted(clips, key=lambda r: (r["start"], r["span"])):
        seconds = rec["end"] - rec["start"]
        if rec.get("duplicate_of"):
            _unlink(rec["path"])
            result["errors"].append({
                "stage": "plan", "start": round(rec["start"], 6), "end": round(rec["end"], 6),
                "reason": f"stream copy: window {rec['span']} s lands on the same keyframe-aligned clip as window "
                          f"{rec['duplicate_of']} s (a GOP longer than clip_stride); stored once", "_short": True})
            continue
        if rec["frames"] == 0 or seconds < task["min_seconds"] - 1e-9:
            if rec.get("owned", True):
                _unlink(rec["path"])
            # A window tail shorter than half an output frame holds no frame: a short clip, not an error.
            short = rec["frames"] > 0 or seconds > 0
            if rec["frames"] == 0:
                why = ("no frames inside the span" if seconds <= 0 else
                       f"clip too short to hold one frame ({seconds:.3f}s at {rec.get('fps', 0):g} fps)")
            else:
                why = f"clip shorter than min_seconds ({seconds:.3f}s < {task['min_seconds']}s)"
            result["errors"].append({"stage": "plan", "reason": why, "start": round(rec["start"], 6),
                                     "end": round(rec["end"], 6), "_short": short})
            continue
        key = make_key(task["path"], rec["span"])
        meta = {
            "key": key, "source": printable(task["path"]), "source_codec": info["codec"],
            "source_width": info["width"], "source_height": info["height"],
            "source_fps": round(info["fps"], 6) if info["fps"] else None,
            "source_duration": round(info["duration"], 6) if info["duration"] is not None else None,
            "clip_start": round(rec["start"], 6), "clip_end": round(rec["end"], 6),
            "fps": round(rec["fps"], 6), "frames": rec["frames"], "width": rec["width"], "height": rec["height"],
            "keyframes": rec["keyframes"], "codec": rec["codec"], "pix_fmt": rec["pix_fmt"], "gop": rec["gop"],
            "bframes": rec["bframes"], "copy": rec["copy"], "label": task["label"],
            "label_name": task["label_name"], "extra": task["extra"],
        }
        if rec.get("rotation"):
            meta["source_rotation"] = rec["rotation"]
        # owned=False: the file is the SOURCE itself (verbatim stream copy); the writer must not delete it.
        result["samples"].append({"meta": meta, "file": rec["path"], "bytes": os.path.getsize(rec["path"]),
                                  "owned": rec.get("owned", True)})
    if not result["samples"] and not result["errors"]:
        reason = "no clip planned inside the video"
        start, end, dur = task.get("start"), task.get("end"), info.get("duration")
        if start is not None and dur is not None and start >= dur:
            reason = _after_end(start, dur)
        elif start is not None or end is not None:
            reason = (f"no decodable frame inside the span {start or 0:g}-"
                      f"{'end' if end is None else f'{end:g}'}s")
        result["errors"].append({"stage": "plan", "reason": reason})
    return result


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _cleanup(task: dict[str, Any]) -> None:
    for clip in task.get("_clips", []):
        if isinstance(clip, str):  # a finished file (video-only copy of an MP4)
            _unlink(clip)
        elif isinstance(clip, _ClipEncoder):
            clip.abort()
        else:
            try:
                clip["out"].close()
            except Exception:  # noqa: BLE001
                pass
            _unlink(clip["path"])
