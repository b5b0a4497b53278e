"""Decoders behind one interface: compressed mp4 bytes + frame numbers → uint8 RGB frames.

Only the frames a plan needs are decoded: needed frames are grouped by the keyframe that
precedes them (from the sample's metadata); each group costs one seek to that keyframe and a
forward decode to the group's last frame. Frame numbers are presentation-order indices, as in
docs/formats.md. On the way, PyAV does not decode the pictures no other picture references (the
non-reference B-frames of H.264) unless the plan keeps them, and stops feeding packets once every
wanted picture is in the decoder (it is drained instead of decoding later pictures to release them).

Safety settings: PyAV decodes with slice threading only (``thread_type="AUTO"`` enables frame
threading, which can mislabel frames) and ``decode_threads`` threads (1 by default: parallelism
comes from DataLoader workers); containers are always closed. decord is unmaintained and can hang
while holding the GIL: see ``_WorkerGuard`` in :mod:`vidssl.data.loader` for the timeout guarantees.
"""

from __future__ import annotations

import bisect
import io
from typing import Sequence

import numpy as np

__all__ = ["Decoder", "PyAVDecoder", "DecordDecoder", "TorchCodecDecoder", "make_decoder", "resolve_backend",
           "full_decode", "DecodeError", "BACKENDS", "decode_counts"]

#: Decoder backends by name; ``auto`` resolves to one of them (see :func:`resolve_backend`).
BACKENDS = ("pyav", "decord", "torchcodec")


#: ``av.open`` options: the stream probe (avformat_find_stream_info) decodes the first frames to learn
#: parameters the decoder finds out by itself anyway (pixel format, delay); skipping that decode
#: makes opening a 228x128 sample 2.5x cheaper (1.05 -> 0.42 ms; a 720p file: 15.5 -> 2.5 ms), about
#: 4% of a 16-frame clip's decode. The option reaches only the probe's own decoder: the stream's
#: decoder keeps ``skip_frame=DEFAULT``, and every frame stays bit-identical (tests/test_data_loader.py).
_PROBE_WITHOUT_DECODING = {"skip_frame": "all"}


class DecodeError(Exception):
    """The video bytes could not be decoded into the requested frames."""


class Decoder:
    """``decode(data, indices, meta)`` → ``(len(indices), H, W, 3)`` uint8, rows in ``indices`` order
    (repeats allowed). ``meta`` is the sample's KEY.json (``fps``, ``keyframes``, ``frames``)."""

    name = "base"

    def decode(self, data: bytes, indices: Sequence[int], meta: dict) -> np.ndarray:
        want = sorted(set(int(i) for i in indices))
        if not want:
            raise DecodeError("no frames requested")
        frames = self._decode_sorted(data, want, meta)
        if len(want) == len(indices) and all(int(a) == b for a, b in zip(indices, want)):
            return frames  # already in order (one window, no repeats): no reordering copy
        pos = {f: i for i, f in enumerate(want)}
        return frames[[pos[int(i)] for i in indices]]

    def _decode_sorted(self, data: bytes, want: list[int], meta: dict) -> np.ndarray:  # (len(want), H, W, 3)
        raise NotImplementedError

    def decode_tensor(self, data: bytes, indices: Sequence[int], meta: dict):
        """Like :meth:`decode`, as a ``(len(indices), C, H, W)`` uint8 torch tensor on the decoder's device."""
        import torch  # noqa: PLC0415

        # PyAV's frames are (N, 3, H, W) in memory (see _FrameSink): the permute makes them a
        # contiguous (N, C, H, W) tensor with no copy; decord's are HWC: a strided view until collated.
        return torch.from_numpy(self.decode(data, indices, meta)).permute(0, 3, 1, 2)


#: Codecs whose FFmpeg decoder may skip non-reference pictures packet by packet without changing any
#: other picture: in H.264 a slice with ``nal_ref_idc == 0`` is, by the standard, never referenced.
#: HEVC's "non-reference" NAL types (TRAIL_N, ...) are only so within their temporal sub-layer, and a
#: stream with several sub-layers (phones record such) may reference them from a higher one, so HEVC is
#: skipped only in clips vidssl re-encoded (one sub-layer); other codecs always decode every picture.
_SKIP_NONREF = {"h264": "always", "hevc": "reencoded"}


class PyAVDecoder(Decoder):
    """PyAV (FFmpeg) from memory; seeks to the keyframe preceding each group of needed frames, and
    skips the non-reference pictures the plan does not keep (see :func:`_decoded_frames`).

    ``frames_decoded`` and ``packets_sent`` count, over this decoder's life, the pictures FFmpeg
    returned and the packets it was given: their ratio is the share of pictures actually decoded."""

    name = "pyav"
    #: Skip ahead by seeking only past more than this many frames (see _decode_sorted).
    SEEK_MIN_SKIP = 8

    def __init__(self, threads: int = 1, skip_nonref: bool = True) -> None:
        self.threads = threads
        self.skip_nonref = skip_nonref
        self.frames_decoded = 0
        self.packets_sent = 0

    def _decode_sorted(self, data: bytes, want: list[int], meta: dict) -> np.ndarray:
        frames = self._decode_sorted_once(data, want, meta, self.skip_nonref)
        if frames is None:
            # A wanted frame did not come out with skipping: a stream whose frames do not carry their
            # packets' timestamps, or a frame past the end. Decode every picture (raises if still missing).
            frames = self._decode_sorted_once(data, want, meta, False)
        return frames

    def _decode_sorted_once(self, data: bytes, want: list[int], meta: dict, skip_nonref: bool) -> np.ndarray | None:
        import av  # noqa: PLC0415 - imported in the worker that uses it
        from av.video.reformatter import VideoReformatter  # noqa: PLC0415

        fps = float(meta["fps"])
        keyframes = list(meta.get("keyframes") or [0])
        # Group needed frames: a new group (one seek) starts only when the keyframe preceding a
        # needed frame lies more than SEEK_MIN_SKIP frames after the previous needed frame. A seek
        # flushes the decoder and costs about as much as decoding a few frames, so for small gaps
        # (a T-frame window at stride s crossing a 16-frame GOP boundary) decoding forward is faster.
        groups: list[list[int]] = []
        for f in want:
            k = keyframes[bisect.bisect_right(keyframes, f) - 1]
            if groups and k - groups[-1][-1] <= self.SEEK_MIN_SKIP:
                groups[-1].append(f)
            else:
                groups.append([f])
        out = _FrameSink(want)
        counts = [0, 0]  # pictures decoded, packets sent
        try:
            # Stream-copied clips keep their source's timestamps, which need not sit on a 1/fps grid
            # (variable frame rate): there a frame's number is the rank of its timestamp among all
            # packets' (how the sharder counts them, docs/formats.md), read by one demux-only pass.
            table = _pts_table(av, data) if meta.get("copy") else None
            with av.open(io.BytesIO(data), mode="r", options=_PROBE_WITHOUT_DECODING) as container:
                stream = container.streams.video[0]
                cc = stream.codec_context
                cc.thread_type = "SLICE"  # never FRAME/AUTO: frame threading can mislabel frames
                cc.thread_count = self.threads
                rule = _SKIP_NONREF.get(cc.name)
                skip = skip_nonref and (rule == "always" or (rule == "reencoded" and not meta.get("copy")))
                tb = float(stream.time_base)
                start = stream.start_time or 0
                number = _FrameNumbers(table, fps, tb, start)
                # One colour converter per video, single-threaded: frame.to_ndarray(format=...) makes
                # a new SwsContext per frame with automatic threading (a thread pool per frame),
                # which cost 3-6x the conversion itself on 2 busy cores. Output is bit-identical.
                rgb = VideoReformatter()
                for g, group in enumerate(groups):
                    k = keyframes[bisect.bisect_right(keyframes, group[0]) - 1]
                    # A freshly opened container is at frame 0: no seek needed to start there.
                    seek = g > 0 or k > 0
                    if not self._decode_group(container, stream, group, k, number, out, rgb, seek, skip, counts):
                        # The seek landed after the keyframe, or on a picture that is not one (a
                        # container index marking every sample as a sync sample): decode from the start.
                        self._decode_group(container, stream, group, 0, number, out, rgb, True, skip, counts)
        except av.error.FFmpegError as exc:
            raise DecodeError(f"pyav: {exc}") from None
        finally:
            self.frames_decoded += counts[0]
            self.packets_sent += counts[1]
        missing = [f for f in want if f not in out]
        if missing:
            if skip:
                return None  # the caller decodes again without skipping
            raise DecodeError(f"pyav: frames {missing[:5]} not found (metadata says {meta.get('frames')} frames)")
        return out.frames()

    @staticmethod
    def _decode_group(container, stream, group, k, number, out, rgb, seek, skip, counts) -> bool:
        """Decode ``group`` (sorted frame numbers whose preceding keyframe is ``k``) into ``out``.
        False when the frames cannot be trusted from where the seek landed (the caller then
        decodes from the start)."""
        if seek:
            container.seek(number.pts_of(k), stream=stream, backward=True, any_frame=False)
        # After a seek into the stream, frames count only from the first decoded keyframe on: a
        # container index that marks non-keyframes as sync samples (MPEG-4 Part 2 remuxed to MP4)
        # lets the seek land on a picture predicted from frames the decoder never saw, and the
        # decoder then returns garbage with correct timestamps. (From frame 0, or with no seek at
        # all, frames are taken as they come, exactly as a full decode gives them.)
        keyed = not seek or k == 0
        todo = set(group)
        last = group[-1]
        first = True
        for frame in _decoded_frames(container, stream, number, todo, skip, counts):
            if frame.pts is None:
                raise DecodeError("pyav: a frame without a timestamp")
            idx = number(frame.pts)
            if first:
                first = False
                if idx > group[0]:
                    return False
            if not keyed:
                if not frame.key_frame:
                    if idx >= group[0]:
                        return False  # a wanted frame before any keyframe: not trustworthy
                    continue
                keyed = True
                if idx > group[0]:
                    return False
            if idx in todo:
                out.put(idx, rgb.reformat(frame, format="rgb24", threads=1).to_ndarray())  # (H, W, 3) view
                todo.discard(idx)
            if idx >= last and not todo:
                break
            if idx > last:
                break
        return True


def _decoded_frames(container, stream, number, wanted: set[int], skip: bool, counts: list[int]):
    """The stream's decoded frames from the container's position on, as ``container.decode(stream)``
    gives them, except with ``skip``: each packet whose frame is not in ``wanted`` goes to the decoder
    with ``skip_frame=NONREF`` (FFmpeg then drops it if no other picture references it, and decodes it
    otherwise), and once every wanted frame's packet has been sent the decoder is drained instead of
    fed more packets (the reorder delay of B-frames holds the last pictures back until then).

    Every frame that comes out is decoded exactly as without skipping: a reference picture is never
    skipped, and a dropped picture is one nothing reads (tests/test_data_augment.py checks bit equality).
    ``counts`` accumulates [pictures returned, packets sent]."""
    cc = stream.codec_context
    pending = set(wanted)  # wanted frames whose packet has not been sent yet
    try:
        for packet in container.demux(stream):
            if skip:
                if packet.pts is None:
                    cc.skip_frame = "DEFAULT"  # cannot tell which frame it holds: decode it
                else:
                    idx = number(packet.pts)
                    cc.skip_frame = "DEFAULT" if idx in pending else "NONREF"
                    pending.discard(idx)
            counts[1] += packet.size > 0
            for frame in cc.decode(packet):
                counts[0] += 1
                yield frame
            if skip and not pending:
                cc.skip_frame = "DEFAULT"
                for frame in cc.decode(None):  # drain; a later seek flushes the decoder for reuse
                    counts[0] += 1
                    yield frame
                return
    finally:
        cc.skip_frame = "DEFAULT"


def decode_counts(decoder) -> tuple[int, int]:
    """(pictures decoded, pictures read) so far by ``decoder``: counted by the PyAV decoder only
    (others give (0, 0)). Their ratio is the share of the read pictures actually decoded."""
    return getattr(decoder, "frames_decoded", 0), getattr(decoder, "packets_sent", 0)


def _pts_table(av, data: bytes) -> list[int] | None:
    """Sorted presentation timestamps of every video packet (demux only, no decode), or None when
    they cannot number the frames (a packet without a timestamp, or two with the same one)."""
    with av.open(io.BytesIO(data), mode="r", options=_PROBE_WITHOUT_DECODING) as container:
        stream = container.streams.video[0]
        pts = []
        for packet in container.demux(stream):
            if packet.pts is None:
                if packet.size == 0:
                    continue  # the demuxer's end-of-stream marker
                return None
            pts.append(packet.pts)
    pts.sort()
    return pts if len(set(pts)) == len(pts) else None


class _FrameNumbers:
    """Frame number (0-based, presentation order) of a decoded frame's timestamp, and back.

    With a timestamp table (stream-copied clips): the rank of the timestamp among the packets'.
    Otherwise (re-encoded clips, constant frame rate by construction): ``(pts - start) · tb · fps``.
    """

    def __init__(self, table: list[int] | None, fps: float, tb: float, start: int) -> None:
        self.fps, self.tb, self.start = fps, tb, start
        self.table = table
        self.rank = {p: i for i, p in enumerate(table)} if table else None

    def __call__(self, pts: int) -> int:
        if self.rank is not None:
            idx = self.rank.get(pts)
            if idx is None:
                raise DecodeError(f"pyav: a frame with timestamp {pts} that no packet has")
            return idx
        return int(round((pts - self.start) * self.tb * self.fps))

    def pts_of(self, idx: int) -> int:
        if self.table is not None and 0 <= idx < len(self.table):
            return self.table[idx]
        return self.start + int(round(idx / self.fps / self.tb))


class _FrameSink:
    """Collects decoded frames straight into one (N, 3, H, W) uint8 array, in ``want`` order.

    ``to_ndarray()`` of an rgb24 frame is a view of the frame's buffer; copying it here, transposed,
    is the only copy a frame gets before the batch: the loader's tensors are (..., C, H, W), so the
    HWC → CHW transpose happens once, here, instead of a stacking copy here and a transposing copy
    when the batch is collated."""

    def __init__(self, want: list[int]) -> None:
        self.pos = {f: i for i, f in enumerate(want)}
        self.got: set[int] = set()
        self.buf: np.ndarray | None = None

    def put(self, idx: int, rgb: np.ndarray) -> None:
        if self.buf is None:
            h, w = rgb.shape[:2]
            self.buf = np.empty((len(self.pos), 3, h, w), dtype=np.uint8)
        self.buf[self.pos[idx]] = rgb.transpose(2, 0, 1)
        self.got.add(idx)

    def __contains__(self, idx: int) -> bool:
        return idx in self.got

    def frames(self) -> np.ndarray:
        """(N, H, W, 3) uint8, the Decoder interface's layout, as a view of the (N, 3, H, W) array."""
        return self.buf.transpose(0, 2, 3, 1)


class DecordDecoder(Decoder):
    """decord from memory (``get_batch`` seeks by itself); cross-checked against PyAV in tests."""

    name = "decord"

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads

    def _decode_sorted(self, data: bytes, want: list[int], meta: dict) -> np.ndarray:
        import decord  # noqa: PLC0415

        # Measured on the sample clips: decord returns wrong frames after seeking in stream-copied
        # sources (B-frames, open GOPs); it is exact on re-encoded fixed-GOP clips, with B-frames
        # (closed GOPs) or without. Stream copies go to PyAV rather than returning a wrong frame.
        if meta.get("copy"):
            return PyAVDecoder(self.threads)._decode_sorted(data, want, meta)

        try:
            vr = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=self.threads)
        except (decord.DECORDError, RuntimeError):  # (RuntimeError: "Error reading ...")
            # decord's own FFmpeg build lacks some decoders the sharder can write (AV1: "cannot find
            # video stream"): PyAV, the reference, decodes those; a truly broken video fails there too.
            return PyAVDecoder(self.threads)._decode_sorted(data, want, meta)
        try:
            n = len(vr)
            if want[-1] >= n:
                raise DecodeError(f"decord: frame {want[-1]} requested; the video has {n} frames")
            return vr.get_batch(want).asnumpy()  # (len(want), H, W, 3) uint8
        except decord.DECORDError as exc:
            raise DecodeError(f"decord: {exc}") from None
        finally:
            del vr


class TorchCodecDecoder(Decoder):
    """torchcodec (FFmpeg through torch): on the CPU, or on an NVIDIA GPU's video decoder (NVDEC) with
    ``device="cuda"``, where frames stay on the GPU. Needs the FFmpeg shared libraries (4 to 8) on the
    system; :mod:`vidssl.data.cuda` checks the CUDA side before a loader starts.

    Frames are numbered by presentation order from a scan of the whole stream (``seek_mode="exact"``),
    the same numbering PyAV's decoder uses here (including stream-copied, variable-frame-rate clips),
    and equal PyAV's frames bit for bit on the CPU (tests/test_data_loader.py)."""

    name = "torchcodec"

    def __init__(self, threads: int = 1, device: str = "cpu") -> None:
        self.threads, self.device = threads, device

    def decode_tensor(self, data: bytes, indices: Sequence[int], meta: dict):
        import torch  # noqa: PLC0415
        from torchcodec.decoders import VideoDecoder  # noqa: PLC0415

        want = sorted(set(int(i) for i in indices))
        if not want:
            raise DecodeError("no frames requested")
        try:
            dec = VideoDecoder(data, device=self.device, seek_mode="exact",
                               num_ffmpeg_threads=self.threads if self.device == "cpu" else 1)
            n = len(dec)
            if want[-1] >= n:
                raise DecodeError(f"torchcodec: frame {want[-1]} requested; the video has {n} frames")
            frames = dec.get_frames_at(indices=want).data  # (len(want), C, H, W) uint8 on self.device
        except DecodeError:
            raise
        except (RuntimeError, ValueError, IndexError) as exc:
            raise DecodeError(f"torchcodec: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from None
        if len(want) == len(indices) and all(int(a) == b for a, b in zip(indices, want)):
            return frames
        pos = {f: i for i, f in enumerate(want)}
        return frames[torch.tensor([pos[int(i)] for i in indices], device=frames.device)]

    def _decode_sorted(self, data: bytes, want: list[int], meta: dict) -> np.ndarray:
        return self.decode_tensor(data, want, meta).permute(0, 2, 3, 1).cpu().numpy()


def torchcodec_available() -> str | None:
    """None when torchcodec imports and finds its FFmpeg libraries, else why not (one line)."""
    try:
        import torchcodec.decoders  # noqa: F401, PLC0415
    except ImportError as exc:
        if "torchcodec" in str(exc) and "No module named" in str(exc):
            return "torchcodec is not installed (pip install torchcodec)"
        return f"torchcodec cannot load ({_first_line(exc)})"
    except (RuntimeError, OSError) as exc:
        return (f"torchcodec cannot load its FFmpeg libraries ({_first_line(exc)}); install FFmpeg 4-8 "
                "shared libraries (Debian/Ubuntu: apt-get install ffmpeg)")
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def resolve_backend(backend: str, device: str = "cpu") -> str:
    """The backend ``backend`` (``auto`` or one of :data:`BACKENDS`) means on ``device``.

    ``auto``: torchcodec on ``cuda`` (the only GPU decoder); PyAV on the CPU, measured fastest there
    for the short fixed-GOP clips vidssl shards hold (docs/benchmarks.md, "decoder backends")."""
    if backend == "auto":
        return "torchcodec" if device == "cuda" else "pyav"
    return backend


def make_decoder(backend: str, threads: int = 1, device: str = "cpu") -> Decoder:
    backend = resolve_backend(backend, device)
    if device == "cuda" and backend != "torchcodec":
        raise ValueError(f"backend {backend!r} decodes on the CPU only; on cuda: torchcodec (or auto)")
    if backend == "pyav":
        return PyAVDecoder(threads)
    if backend == "decord":
        return DecordDecoder(threads)
    if backend == "torchcodec":
        return TorchCodecDecoder(threads, device)
    raise ValueError(f"backend {backend!r}; allowed: auto, {', '.join(BACKENDS)}")


def full_decode(data: bytes) -> np.ndarray:
    """Reference: every frame of the video, decoded by PyAV from the start, no seeking, one thread.
    (N, H, W, 3) uint8."""
    import av  # noqa: PLC0415

    with av.open(io.BytesIO(data), mode="r") as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        return np.stack([f.to_ndarray(format="rgb24", threads=1) for f in container.decode(stream)])
