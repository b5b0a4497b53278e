"""Stream-copy facts read from headers instead of decoding a frame.

Stream copy needs two facts that FFmpeg only reports on decoded frames: the display rotation
(the display matrix the MP4 demuxer derives from the ``mvhd``/``tkhd`` matrices, or an H.264
display-orientation SEI) and the pixel format the decoder would output. Decoding one 1080p
keyframe costs ~25 ms, more than the rest of a stream copy, so for the common case (an MP4 with
identity matrices holding 8-bit 4:2:0 H.264 in ``avcC`` form) these are read from the boxes, the
SPS and the first keyframe's NAL units. Every function answers ``None`` when it cannot be SURE of
the answer FFmpeg's decoder would give, and the caller then decodes as before: the shortcut never
changes a result, it only skips work (tests compare both paths).
"""

from __future__ import annotations

import os
import struct
from itertools import accumulate

# ISO-BMFF matrix {a, b, u, c, d, v, x, y, w}: 16.16 fixed point except u, v, w (2.30).
_IDENTITY = (1 << 16, 0, 0, 0, 1 << 16, 0, 0, 0, 1 << 30)
# Profiles whose SPS carries chroma_format_idc / bit depths (H.264 7.3.2.1.1).
_HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}
_SEI_DISPLAY_ORIENTATION = 47
_AVCOL_RANGE_JPEG = 2


def _children(fh, start: int, end: int):
    """(type, payload offset, box end) of the boxes in [start, end); stops at a malformed header."""
    pos = start
    while pos + 8 <= end:
        fh.seek(pos)
        head = fh.read(16)
        if len(head) < 8:
            return
        size, kind = struct.unpack(">I4s", head[:8])
        hdr = 8
        if size == 1:
            if len(head) < 16:
                return
            size = struct.unpack(">Q", head[8:16])[0]
            hdr = 16
        elif size == 0:
            size = end - pos  # extends to the end of its parent
        if size < hdr or pos + size > end:
            return
        yield kind, pos + hdr, pos + size
        pos += size


def mp4_display_matrix_is_identity(path: str, track_id: int) -> bool | None:
    """True when the movie (``mvhd``) and track (``tkhd`` of ``track_id``) matrices are both the
    identity, i.e. FFmpeg attaches no display matrix and frames come out with rotation 0.
    False when either is not; None when the boxes cannot be read unambiguously."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            moov = [(a, b) for kind, a, b in _children(fh, 0, size) if kind == b"moov"]
            if len(moov) != 1:
                return None
            movie = None
            tracks = []
            for kind, a, b in list(_children(fh, *moov[0])):
                if kind == b"mvhd":
                    if movie is not None:
                        return None
                    fh.seek(a)
                    body = fh.read(min(b - a, 120))
                    off = 36 if body[:1] == b"\0" else 48  # after version/flags, times, rate, volume
                    if len(body) < off + 36:
                        return None
                    movie = struct.unpack(">9i", body[off:off + 36])
                elif kind == b"trak":
                    for sub, c, d in _children(fh, a, b):
                        if sub == b"tkhd":
                            fh.seek(c)
                            body = fh.read(min(d - c, 120))
                            v1 = body[:1] == b"\1"
                            id_off, m_off = (20, 52) if v1 else (12, 40)
                            if len(body) < m_off + 36:
                                return None
                            tracks.append((struct.unpack(">I", body[id_off:id_off + 4])[0],
                                           struct.unpack(">9i", body[m_off:m_off + 36])))
                            break
            mine = [m for tid, m in tracks if tid == track_id]
            if movie is None or len(mine) != 1:
                return None
            return movie == _IDENTITY and mine[0] == _IDENTITY
    except (OSError, struct.error):
        return None


def _unescape(nal: bytes) -> bytes:
    """RBSP from a NAL unit payload: drop the emulation-prevention 0x03 in every 0x00 0x00 0x03."""
    if b"\0\0\3" not in nal:
        return nal
    out = bytearray()
    i = 0
    while True:
        j = nal.find(b"\0\0\3", i)
        if j < 0:
            out += nal[i:]
            return bytes(out)
        out += nal[i:j + 2]
        i = j + 3


class _Bits:
    """MSB-first bit reader with Exp-Golomb codes (H.264 7.2); raises IndexError past the end."""

    def __init__(self, data: bytes) -> None:
        self.value = int.from_bytes(data, "big")
        self.left = len(data) * 8

    def u(self, n: int) -> int:
        if n > self.left:
            raise IndexError("bitstream ended")
        self.left -= n
        return (self.value >> self.left) & ((1 << n) - 1)

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise IndexError("bad Exp-Golomb code")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k % 2 else -(k // 2)


def _skip_scaling_list(bits: _Bits, size: int) -> None:
    last = nxt = 8
    for _ in range(size):
        if nxt:
            nxt = (last + bits.se() + 256) % 256
        last = nxt or last


def h264_sps_format(sps_nal: bytes) -> tuple[int, int, int, int | None]:
    """(chroma_format_idc, luma bit depth, chroma bit depth, video_full_range_flag or None when the
    VUI does not signal it) from an SPS NAL unit (header byte included)."""
    bits = _Bits(_unescape(sps_nal[1:]))
    profile = bits.u(8)
    bits.u(16)  # constraint flags, level
    bits.ue()  # seq_parameter_set_id
    chroma, depth_y, depth_c = 1, 8, 8
    if profile in _HIGH_PROFILES:
        chroma = bits.ue()
        if chroma == 3:
            bits.u(1)  # separate_colour_plane_flag
        depth_y, depth_c = bits.ue() + 8, bits.ue() + 8
        bits.u(1)  # qpprime_y_zero_transform_bypass_flag
        if bits.u(1):  # seq_scaling_matrix_present_flag
            for i in range(8 if chroma != 3 else 12):
                if bits.u(1):
                    _skip_scaling_list(bits, 16 if i < 6 else 64)
    bits.ue()  # log2_max_frame_num_minus4
    poc_type = bits.ue()
    if poc_type == 0:
        bits.ue()
    elif poc_type == 1:
        bits.u(1)
        bits.se()
        bits.se()
        for _ in range(bits.ue()):
            bits.se()
    bits.ue()  # max_num_ref_frames
    bits.u(1)  # gaps_in_frame_num_value_allowed_flag
    bits.ue()  # pic_width_in_mbs_minus1
    bits.ue()  # pic_height_in_map_units_minus1
    if not bits.u(1):  # frame_mbs_only_flag
        bits.u(1)
    bits.u(1)  # direct_8x8_inference_flag
    if bits.u(1):  # frame_cropping_flag
        for _ in range(4):
            bits.ue()
    full_range = None
    if bits.u(1):  # vui_parameters_present_flag
        if bits.u(1) and bits.u(8) == 255:  # aspect_ratio_info_present_flag, aspect_ratio_idc
            bits.u(32)  # sar_width, sar_height
        if bits.u(1):  # overscan_info_present_flag
            bits.u(1)
        if bits.u(1):  # video_signal_type_present_flag
            bits.u(3)  # video_format
            full_range = bits.u(1)
    return chroma, depth_y, depth_c, full_range


def avcc_parameter_sets(extradata: bytes | None) -> tuple[int, list[bytes]] | None:
    """(NAL length size, SPS NAL units) of an ``avcC`` record; None when it is not one (Annex B)."""
    if not extradata or len(extradata) < 7 or extradata[0] != 1:
        return None
    length_size = (extradata[4] & 3) + 1
    n_sps = extradata[5] & 0x1F
    pos, sps = 6, []
    for _ in range(n_sps):
        if pos + 2 > len(extradata):
            return None
        n = struct.unpack(">H", extradata[pos:pos + 2])[0]
        nal = extradata[pos + 2:pos + 2 + n]
        if len(nal) != n or not nal or nal[0] & 0x1F != 7:
            return None
        sps.append(nal)
        pos += 2 + n
    return length_size, sps


def avcc_nal_units(data: bytes, length_size: int) -> list[bytes] | None:
    """NAL units of one length-prefixed (``avcC``-style) access unit; None when malformed."""
    out, pos = [], 0
    while pos < len(data):
        if pos + length_size > len(data):
            return None
        n = int.from_bytes(data[pos:pos + length_size], "big")
        pos += length_size
        if n == 0 or pos + n > len(data):
            return None
        out.append(data[pos:pos + n])
        pos += n
    return out


def _sei_number(rbsp: bytes, pos: int) -> tuple[int, int]:
    """An SEI payload type or size: a run of 0xFF bytes (255 each) plus a final byte; (value, next pos)."""
    value = 0
    while rbsp[pos] == 0xFF:
        value += 255
        pos += 1
    return value + rbsp[pos], pos + 1


def _has_display_orientation_sei(sei_nal: bytes) -> bool:
    """True when an SEI NAL unit carries a display-orientation message (payload type 47)."""
    rbsp = _unescape(sei_nal[1:])
    pos = 0
    while pos < len(rbsp) and rbsp[pos:] != b"\x80":  # rbsp_trailing_bits end the messages
        ptype, pos = _sei_number(rbsp, pos)
        psize, pos = _sei_number(rbsp, pos)
        if ptype == _SEI_DISPLAY_ORIENTATION:
            return True
        pos += psize
    return False


def h264_orientation_sei(extradata: bytes | None, keyframe: bytes) -> bool | None:
    """Whether the first keyframe (``avcC``-style, length-prefixed NAL units) carries an H.264
    display-orientation SEI (which the decoder turns into a frame rotation); None when unsure."""
    try:
        avcc = avcc_parameter_sets(extradata)
        if avcc is None:
            return None
        nals = avcc_nal_units(keyframe, avcc[0])
        if nals is None:
            return None
        return any(nal[0] & 0x1F == 6 and _has_display_orientation_sei(nal) for nal in nals)
    except IndexError:
        return None


def h264_pix_fmt(extradata: bytes | None, color_range: int, keyframe: bytes) -> str | None:
    """Pixel format FFmpeg's H.264 decoder gives for this stream when it is surely ``yuv420p``
    (8-bit 4:2:0, limited range, one SPS in ``avcC`` and none in-band in the first keyframe);
    None for everything else (high bit depth, other chroma formats, full range, unparsable):
    decode to find out."""
    try:
        avcc = avcc_parameter_sets(extradata)
        if avcc is None or len(avcc[1]) != 1:
            return None
        nals = avcc_nal_units(keyframe, avcc[0])
        if nals is None or any(nal[0] & 0x1F in (7, 15) for nal in nals):
            return None  # an in-band SPS (or subset SPS) would override the avcC one
        chroma, depth_y, depth_c, full_range = h264_sps_format(avcc[1][0])
    except IndexError:
        return None
    # FFmpeg's H.264 decoder outputs yuvj420p for full-range 4:2:0 (from the VUI, else the
    # container's colour range): leave that and every other case to a real decode.
    if chroma != 1 or depth_y != 8 or depth_c != 8 or full_range or color_range == _AVCOL_RANGE_JPEG:
        return None
    return "yuv420p"


# ---- whole-file stream copy without the other tracks --------------------------------------------

def _box_children(buf: bytes, start: int, end: int):
    """(type, box start, payload start, box end) of the boxes in buf[start:end]; raises ValueError
    on a malformed header."""
    pos = start
    while pos < end:
        if pos + 8 > end:
            raise ValueError("truncated box header")
        size, kind = struct.unpack_from(">I4s", buf, pos)
        hdr = 8
        if size == 1:
            size = struct.unpack_from(">Q", buf, pos + 8)[0]
            hdr = 16
        elif size == 0:
            size = end - pos
        if size < hdr or pos + size > end:
            raise ValueError(f"bad size of box {kind!r}")
        yield kind, pos, pos + hdr, pos + size
        pos += size


def _only(buf: bytes, start: int, end: int, kind: bytes) -> tuple[int, int, int]:
    found = [(s, p, e) for k, s, p, e in _box_children(buf, start, end) if k == kind]
    if len(found) != 1:
        raise ValueError(f"expected one {kind!r} box, found {len(found)}")
    return found[0]


def _table(buf: bytes, offset: int, n: int, code: str) -> list[int]:
    """``n`` big-endian unsigned integers (``code`` I: 32-bit, Q: 64-bit) at ``offset``."""
    return list(struct.unpack_from(f">{n}{code}", buf, offset))


def mp4_video_only(path: str, track_id: int, out_path: str) -> bool:
    """Write ``out_path``: the MP4 ``path`` with only track ``track_id`` (ftyp + moov + mdat).

    The track's boxes are kept byte for byte (timestamps, edit list, sample table, codec
    configuration), so its packets, and what they decode to, are exactly the source's; only the
    chunk offsets change, to point into a new ``mdat`` that holds just this track's chunks, and
    the movie duration becomes the track's. This replaces a packet-by-packet remux (~5 ms for a
    short 720p clip with audio) with a few box edits and range copies. Returns False, writing
    nothing, for anything it does not handle (fragmented files, external data references,
    compact sample sizes, offsets past 4 GiB in a 32-bit table, unreadable boxes): remux then.
    """
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            top = list(_children(fh, 0, size))
            kinds = [k for k, _, _ in top]
            if kinds[:1] != [b"ftyp"] or kinds.count(b"moov") != 1 or b"moof" in kinds:
                return False
            _, a, b = top[0]
            fh.seek(a - 8)
            ftyp = fh.read(b - a + 8)
            if struct.unpack(">I", ftyp[:4])[0] != len(ftyp):
                return False  # a 64-bit or open-ended ftyp: not worth handling
            _, a, b = top[kinds.index(b"moov")]
            fh.seek(a)
            moov = fh.read(b - a)
        if len(moov) != b - a:
            return False
        children = list(_box_children(moov, 0, len(moov)))
        if any(k == b"mvex" for k, *_ in children):
            return False
        mvhd = [c for c in children if c[0] == b"mvhd"]
        traks = []
        for k, s, p, e in children:
            if k == b"trak":
                _, tp, _ = _only(moov, p, e, b"tkhd")
                v1 = moov[tp] == 1
                tid = struct.unpack_from(">I", moov, tp + (20 if v1 else 12))[0]
                if tid == track_id:
                    dur = (struct.unpack_from(">Q", moov, tp + 28)[0] if v1
                           else struct.unpack_from(">I", moov, tp + 20)[0])
                    traks.append((s, p, e, dur))
        if len(mvhd) != 1 or len(traks) != 1:
            return False
        t_start, t_pay, t_end, t_dur = traks[0]
        _, mp, me = _only(moov, t_pay, t_end, b"mdia")
        _, np_, ne = _only(moov, mp, me, b"minf")
        _, dp, de = _only(moov, np_, ne, b"dinf")
        _, rp, re_ = _only(moov, dp, de, b"dref")
        for _, _, ep, _ in _box_children(moov, rp + 8, re_):
            if not moov[ep + 3] & 1:  # flag 1: the samples are in this file
                return False
        _, sp, se = _only(moov, np_, ne, b"stbl")
        kinds = {k: (p, e) for k, _, p, e in _box_children(moov, sp, se)}
        if b"stsz" not in kinds or b"stsc" not in kinds or (b"stco" in kinds) == (b"co64" in kinds):
            return False
        # Sample table (ISO 14496-12 8.7): stsz sample sizes, stsc runs of samples per chunk,
        # stco/co64 chunk offsets. Plain lists: numpy's import alone costs a worker ~0.14 s.
        p, e = kinds[b"stsz"]
        const, count = struct.unpack_from(">II", moov, p + 4)
        sizes = [const] * count if const else _table(moov, p + 12, count, "I")
        wide = b"co64" in kinds
        cp, ce = kinds[b"co64" if wide else b"stco"]
        n_chunks = struct.unpack_from(">I", moov, cp + 4)[0]
        offsets = _table(moov, cp + 8, n_chunks, "Q" if wide else "I")
        p, e = kinds[b"stsc"]
        n_runs = struct.unpack_from(">I", moov, p + 4)[0]
        runs = _table(moov, p + 8, 3 * n_runs, "I")
        firsts = runs[0::3]
        if n_chunks == 0 or n_runs == 0 or firsts[0] != 1 or any(b <= a for a, b in zip(firsts, firsts[1:])):
            return False
        per_chunk: list[int] = []
        for i in range(n_runs):
            upto = min(firsts[i + 1] - 1 if i + 1 < n_runs else n_chunks, n_chunks)
            per_chunk += [runs[3 * i + 1]] * max(0, upto - len(per_chunk))
        if len(per_chunk) != n_chunks or min(per_chunk) <= 0 or sum(per_chunk) != count:
            return False
        bounds = [0, *accumulate(per_chunk)]
        chunk_bytes = [sum(sizes[bounds[i]:bounds[i + 1]]) for i in range(n_chunks)]
        if any(o + n > size for o, n in zip(offsets, chunk_bytes)):
            return False
        # New layout: ftyp, moov (same size as the kept boxes), mdat with the chunks in order.
        kept = [moov[s:e] for k, s, _, e in children if k != b"trak" or s == t_start]
        body = b"".join(kept)
        payload = sum(chunk_bytes)
        mdat_hdr = (struct.pack(">I4s", 8 + payload, b"mdat") if 8 + payload < 1 << 32 else
                    struct.pack(">I4sQ", 1, b"mdat", 16 + payload))
        base = len(ftyp) + 8 + len(body) + len(mdat_hdr)
        new_offsets = [base + o for o in accumulate(chunk_bytes, initial=0)][:n_chunks]
        if not wide and new_offsets[-1] >= 1 << 32:
            return False
        new_moov = bytearray(struct.pack(">I4s", 8 + len(body), b"moov") + body)
        # Where the kept trak and mvhd landed in new_moov: shift their source positions.
        shift, trak_at, mvhd_at = 8, None, None
        for k, s, _, e in children:
            if k == b"trak" and s != t_start:
                shift -= e - s
                continue
            if s == t_start:
                trak_at = s + shift
            if k == b"mvhd":
                mvhd_at = s + shift
        assert trak_at is not None and mvhd_at is not None
        table = cp + 8 - t_start + trak_at  # chunk offset entries inside new_moov
        new_moov[table:table + (8 if wide else 4) * n_chunks] = struct.pack(
            f">{n_chunks}{'Q' if wide else 'I'}", *new_offsets)
        # The movie lasts as long as this track now (it may have been the audio's length).
        mv_pay = mvhd_at + (mvhd[0][2] - mvhd[0][1])
        if new_moov[mv_pay] == 1:
            struct.pack_into(">Q", new_moov, mv_pay + 24, t_dur)
        elif t_dur < 1 << 32:
            struct.pack_into(">I", new_moov, mv_pay + 16, t_dur)
        else:
            return False
        # Source ranges, merged where chunks are adjacent.
        ranges: list[list[int]] = []
        for off, n in zip(offsets, chunk_bytes):
            if ranges and ranges[-1][0] + ranges[-1][1] == off:
                ranges[-1][1] += n
            else:
                ranges.append([off, n])
        with open(path, "rb", buffering=0) as src, open(out_path, "wb") as out:
            out.write(ftyp)
            out.write(new_moov)
            out.write(mdat_hdr)
            for off, n in ranges:
                data = os.pread(src.fileno(), n, off)
                if len(data) != n:
                    raise ValueError("source shrank while copying")
                out.write(data)
        return True
    except (OSError, ValueError, struct.error, IndexError):
        try:
            os.unlink(out_path)
        except OSError:
            pass
        return False
