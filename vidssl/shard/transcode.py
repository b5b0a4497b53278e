"""Per-input work done in a worker process: probe → plan clips → one decode → one encode pass.

:func:`process_input` takes a plain-dict task and returns a plain-dict result (both pickled
between processes). Encoded clips are written to files in the OUTDIR temp area, never kept in
RAM; the result carries their paths and the ``KEY.json`` metadata. Any failure rejects the
whole input (no partial input ever reaches a shard): the result then has no samples and one
error record with the stage that failed.

Timing model (re-encode): the source is a step function, frame *i* shown over
``[t_i, t_{i+1})``. Output frame *k* of a clip is the source frame shown at
``clip_start + k / fps``. This gives a constant output rate from any input (VFR included)
and an exact frame count known while encoding.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from typing import Any

from vidssl.shard.sources import make_key

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

def open_input(path: str):
    """av.open with a reason on failure (stage read/probe)."""
    import av

    try:
        with open(path, "rb") as fh:  # a clear 'read' error before FFmpeg's generic ones
            head = fh.read(1)
    except IsADirectoryError:
        raise Reject("read", "is a directory") from None
    except OSError as exc:
        raise Reject("read", f"cannot read: {exc.strerror or exc}") from None
    if not head:
        raise Reject("probe", "empty file (0 bytes)")
    try:
        return av.open(path, metadata_errors="ignore")
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
    start = float(vs.start_time * vs.time_base) if vs.start_time is not None and vs.time_base else None
    return {"codec": codec, "width": int(cc.width or 0), "height": int(cc.height or 0),
            "fps": float(rate) if rate else None, "rate": rate, "duration": duration, "start": start,
            "pix_fmt": cc.format.name if cc.format is not None else None, "format": fmt}


# ---- clip planning ------------------------------------------------------------------------------

class Plan:
    """Which clips an input yields. Windows are created lazily (the duration may be unknown)."""

    def __init__(self, task: dict[str, Any]) -> None:
        self.clip_seconds = task["clip_seconds"]
        self.stride = task["clip_stride"] or self.clip_seconds
        self.start = task.get("start")
        self.end = task.get("end")
        self.mode = "window" if self.clip_seconds else ("span" if self.start is not None or self.end is not None
                                                          else "whole")
        self.next_window = 0
        self.emitted_span = False

    def finished(self, t: float) -> bool:
        """True when no clip can start at or after source time ``t``."""
        if self.mode == "whole":
            return False
        if self.mode == "span":
            return self.emitted_span
        return self.end is not None and t >= self.end

    def clips_starting_before(self, t: float) -> list[tuple[float, float, str]]:
        """New clips (start, planned end, span id) whose start is < t."""
        out = []
        if self.mode == "window":
            lo = self.start or 0.0
            while True:
                s = lo + self.next_window * self.stride
                if s >= t or (self.end is not None and s >= self.end):
                    break
                e = s + self.clip_seconds
                if self.end is not None:
                    e = min(e, self.end)
                out.append((s, e, f"{s:.3f}-{e:.3f}"))
                self.next_window += 1
        elif not self.emitted_span:
            s = self.start or 0.0
            if s < t:
                e = self.end if self.end is not None else math.inf
                span = "full" if self.mode == "whole" else f"{s:.3f}-{'end' if self.end is None else f'{e:.3f}'}"
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
    default_dur = 1.0 / float(src_rate) if src_rate else 1.0 / 25
    t_origin = info["start"]
    out_fps: Fraction | None = _fps_fraction(task["fps"]) if task["fps"] else (
        _fps_fraction(src_rate) if src_rate else None)
    active: list[_ClipEncoder] = []
    done: list[dict[str, Any]] = []
    state: dict[str, Any] = {"rotator": None, "size": None, "rotation": 0}

    def transformed(frame):
        if state["size"] is None:
            rotation = int(round(frame.rotation or 0))
            state["rotation"] = rotation
            if rotation % 360:
                state["rotator"] = _Rotator(vs, rotation)
            w, h = (frame.height, frame.width) if rotation % 180 else (frame.width, frame.height)
            state["size"] = even_size(w, h, task["short_side"])
        if state["rotator"] is not None:
            frame = state["rotator"](frame)
        w, h = state["size"]
        if frame.width == w and frame.height == h and frame.format.name == "yuv420p":
            return frame
        return frame.reformat(width=w, height=h, format="yuv420p", interpolation="AREA")

    def emit(raw, a: float, b: float) -> None:
        """Source frame ``raw`` shown over [a, b): feed it to each clip at each output time inside."""
        if state["size"] is None:
            transformed(raw)  # fixes the output size before the first encoder opens
        for s, e, span in plan.clips_starting_before(b):
            active.append(_ClipEncoder(task, s, e, span, state["size"], out_fps))
        frame = None
        for clip in list(active):
            step = 1.0 / float(clip.fps)
            while True:
                t = clip.start + clip.index * step
                if t >= b or t >= clip.end:
                    break
                if frame is None:  # convert once, only when some clip uses this frame
                    frame = transformed(raw)
                clip.add(frame, t)
            if clip.start + clip.index * step >= clip.end:
                clip.finish()
                active.remove(clip)
                done.append({"clip": clip, "start": clip.start, "end": clip.end, "frames": clip.index})

    prev = None  # (raw frame, start time, duration)
    try:
        stop = False
        for packet in container.demux(vs):
            try:
                frames = packet.decode()
            except av.FFmpegError as exc:
                at = f"{float(packet.pts * vs.time_base):.3f}s" if packet.pts is not None else "unknown time"
                raise Reject("decode", f"decode error at {at}: {exc}") from None
            for frame in frames:
                if frame.is_corrupt:
                    raise Reject("decode", f"corrupt frame at {frame.time}s (damaged stream)")
                t = frame.time
                if t is None:
                    t = (prev[1] + prev[2]) if prev else 0.0
                elif t_origin is None:
                    t_origin = t
                t -= t_origin or 0.0
                dur = float(frame.duration * frame.time_base) if frame.duration and frame.time_base else default_dur
                if out_fps is None:  # no rate in the headers: trust the first frame's duration
                    out_fps = _fps_fraction(1.0 / dur)
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
            emit(prev[0], prev[1], end)
            for clip in list(active):
                clip.finish()
                active.remove(clip)
                done.append({"clip": clip, "start": clip.start, "end": min(clip.end, end), "frames": clip.index})
    except av.FFmpegError as exc:
        raise Reject("encode", f"{type(exc).__name__}: {exc}") from None
    if prev is None:
        raise Reject("decode", "no frame could be decoded")
    size = state["size"]
    for rec in done:
        clip = rec.pop("clip")
        rec.update(width=size[0], height=size[1], fps=float(clip.fps), keyframes=sorted(set(clip.keyframes)),
                   path=clip.path, span=clip.span, codec=task["codec"], pix_fmt="yuv420p", gop=task["gop"],
                   bframes=task["bframes"], copy=False, rotation=state["rotation"])
    return done


# ---- stream copy --------------------------------------------------------------------------------

def _copy(container, info: dict[str, Any], task: dict[str, Any]) -> list[dict[str, Any]]:
    """Remux whole GOPs: a clip covers every GOP overlapping its planned span."""
    import av

    vs = container.streams.video[0]
    tb = vs.time_base
    t_origin = info["start"]
    plan = Plan(task)
    default_dur = 1.0 / info["fps"] if info["fps"] else 1.0 / 25
    clips: list[dict[str, Any]] = []
    done: list[dict[str, Any]] = []

    def open_clip(s, e, span):
        path = os.path.join(task["tmpdir"], f"{task['index']:08d}-{len(clips) + len(done)}.mp4")
        out = av.open(path, "w", format="mp4", options={"fflags": "+bitexact"})
        try:
            ostream = out.add_stream_from_template(vs)
        except Exception:
            out.close()
            raise
        clip = {"s": s, "e": e, "span": span, "path": path, "out": out, "ostream": ostream, "offset": None,
                "pts": [], "key_pts": [], "first": None, "last": None}
        task["_clips"].append(clip)
        return clip

    def flush_gop(gop: list, g_start: float, g_end: float) -> None:
        for s, e, span in plan.clips_starting_before(g_end):
            clips.append(open_clip(s, e, span))
        for clip in list(clips):
            if g_start >= clip["e"]:
                clip["out"].close()
                clips.remove(clip)
                done.append(clip)
                continue
            if g_end <= clip["s"]:
                continue
            if clip["offset"] is None:
                clip["offset"] = min(p.dts if p.dts is not None else p.pts for p in gop)
                clip["first"] = g_start
            clip["last"] = g_end
            for p in gop:
                q = av.Packet(p)  # a fresh reference: the same packet may go to overlapping clips
                q.pts = p.pts - clip["offset"]
                q.dts = (p.dts - clip["offset"]) if p.dts is not None else None
                q.time_base = tb
                q.stream = clip["ostream"]
                clip["pts"].append(q.pts)
                if p.is_keyframe:
                    clip["key_pts"].append(q.pts)
                clip["out"].mux(q)

    gop: list = []
    g_start = None
    last_end = 0.0
    try:
        for packet in container.demux(vs):
            if packet.size == 0 and packet.pts is None:
                continue  # the demuxer's end-of-stream marker
            if packet.pts is None:
                raise Reject("plan", "packets without timestamps: cannot stream copy (use copy=false)")
            t = float(packet.pts * tb) - (t_origin or 0.0)
            dur = float(packet.duration * tb) if packet.duration else default_dur
            last_end = max(last_end, t + dur)
            if packet.is_keyframe and gop:
                flush_gop(gop, g_start, t)
                gop = []
            if not gop:
                if not packet.is_keyframe and not done and not any(c["offset"] is not None for c in clips):
                    # Leading frames before the first keyframe cannot be decoded on their own.
                    continue
                g_start = t
            gop.append(packet)
            if plan.finished(t) and not clips and done:
                break
        if gop:
            flush_gop(gop, g_start, last_end)
        for clip in clips:
            clip["out"].close()
            done.append(clip)
    except av.FFmpegError as exc:
        raise Reject("encode", f"remux failed: {exc}") from None
    out = []
    for clip in done:
        if clip["first"] is None:
            out.append({"start": clip["s"], "end": clip["s"], "frames": 0, "path": clip["path"], "span": clip["span"]})
            continue
        order = sorted(clip["pts"])
        index = {p: i for i, p in enumerate(order)}
        out.append({"start": clip["first"], "end": clip["last"], "frames": len(order), "path": clip["path"],
                    "span": clip["span"], "width": info["width"], "height": info["height"],
                    "fps": float(info["fps"] or 0.0), "keyframes": sorted(index[p] for p in clip["key_pts"]),
                    "codec": info["codec"], "pix_fmt": info["pix_fmt"], "gop": None, "bframes": None,
                    "copy": True, "rotation": 0})
    return out


# ---- the worker entry point ---------------------------------------------------------------------

def process_input(task: dict[str, Any]) -> dict[str, Any]:
    """Probe, plan and transcode one input. Never raises for bad media: returns error records."""
    result: dict[str, Any] = {"index": task["index"], "samples": [], "errors": [], "skipped": False}
    task["_clips"] = []
    container = None
    try:
        container = open_input(task["path"])
        info = probe(container)
        if task["copy"]:
            rot = _first_frame_rotation(task["path"])
            if rot % 360:
                raise Reject("plan", f"rotation metadata ({rot} degrees) needs a re-encode to come out "
                             "upright; stream copy cannot apply it (use copy=false)")
            clips = _copy(container, info, task)
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
        if rec["frames"] == 0 or seconds < task["min_seconds"] - 1e-9:
            _unlink(rec["path"])
            why = ("no frames inside the span" if rec["frames"] == 0 else
                   f"clip shorter than min_seconds ({seconds:.3f}s < {task['min_seconds']}s)")
            result["errors"].append({"stage": "plan", "reason": why, "start": round(rec["start"], 6),
                                     "end": round(rec["end"], 6), "_short": rec["frames"] > 0})
            continue
        key = make_key(task["path"], rec["span"])
        meta = {
            "key": key, "source": task["path"], "source_codec": info["codec"],
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
        result["samples"].append({"meta": meta, "file": rec["path"], "bytes": os.path.getsize(rec["path"])})
    if not result["samples"] and not result["errors"]:
        result["errors"].append({"stage": "plan", "reason": "no clip planned inside the video"})
    return result


def _first_frame_rotation(path: str) -> int:
    """Display rotation (counter-clockwise degrees) read from the first decoded frame."""
    import av

    with av.open(path, metadata_errors="ignore") as c:
        for frame in c.decode(video=0):
            return int(round(frame.rotation or 0))
    return 0


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _cleanup(task: dict[str, Any]) -> None:
    for clip in task.get("_clips", []):
        if isinstance(clip, _ClipEncoder):
            clip.abort()
        else:
            try:
                clip["out"].close()
            except Exception:  # noqa: BLE001
                pass
            _unlink(clip["path"])
