"""Can this process decode on the GPU? One clear answer before the loader yields any batch.

``decode_device: cuda`` needs four things; :func:`cuda_decode_problem` checks them in order and says
which one is missing:

1. a GPU visible to this process (``torch.cuda.is_available()``);
2. torchcodec, importable with its FFmpeg libraries;
3. torchcodec and FFmpeg built with CUDA (NVDEC): probed by decoding the dataset's first sample on
   the GPU;
4. a stream NVDEC can decode (:func:`nvdec_problem`: codec, chroma format and bit depth against the
   GPU's generation), checked on the dataset's first sample before the probe and on every sample
   while decoding.

Nothing here runs in DataLoader workers: CUDA is initialised in the main process only.
"""

from __future__ import annotations

import os
import re

__all__ = ["cuda_decode_problem", "nvdec_problem", "first_sample"]


def nvdec_problem(codec: str | None, pix_fmt: str | None, capability: tuple[int, int]) -> str | None:
    """Why NVDEC on a GPU of compute ``capability`` cannot decode a ``codec`` stream in ``pix_fmt``,
    or None when it can. From NVIDIA's Video Codec SDK support matrix: H.264 only as 8-bit 4:2:0;
    HEVC and VP9 from Pascal (6.x), 10/12-bit from Pascal, 4:4:4 HEVC from Turing (7.5); AV1 on
    consumer Ampere (8.6) and Ada (8.9) or newer, but not on the A100 (8.0) nor the H100/H200 (9.0);
    4:2:2 on no GPU before Blackwell (10.x)."""
    codec = (codec or "").lower()
    fmt = (pix_fmt or "yuv420p").lower()
    cc = tuple(capability)
    depth = int(m.group(1)) if (m := re.search(r"p(\d+)(le|be)?$", fmt)) else 8
    chroma = "444" if "444" in fmt or fmt.startswith(("gbr", "rgb", "bgr")) else "422" if "422" in fmt else "420"
    where = f"compute capability {cc[0]}.{cc[1]}"
    if chroma == "422" and cc < (10, 0):
        return f"NVDEC cannot decode 4:2:2 video ({fmt}) before Blackwell ({where})"
    if codec in ("h264", "avc1"):
        if depth > 8:
            return f"NVDEC cannot decode {depth}-bit H.264 ({fmt}) on any GPU"
        if chroma == "444":
            return f"NVDEC cannot decode 4:4:4 H.264 ({fmt})"
        return None
    if codec in ("hevc", "h265"):
        if cc < (6, 0):
            return f"NVDEC decodes HEVC from Pascal (6.0) on ({where})"
        if chroma == "444" and cc < (7, 5):
            return f"NVDEC decodes 4:4:4 HEVC from Turing (7.5) on ({where})"
        return None
    if codec == "vp9":
        if cc < (6, 0):
            return f"NVDEC decodes VP9 from Pascal (6.0) on ({where})"
        if chroma == "444":
            return f"NVDEC cannot decode 4:4:4 VP9 ({fmt})"
        return None
    if codec == "av1":
        if cc < (8, 6) or cc[0] == 9:
            return (f"NVDEC cannot decode AV1 on this GPU ({where}; AV1 needs consumer Ampere 8.6, Ada 8.9 or "
                    "Blackwell; the A100 and H100/H200 have no AV1 decoder): re-shard with codec=h264")
        if chroma == "444" or depth > 10:
            return f"NVDEC cannot decode {fmt} AV1"
        return None
    if codec in ("mpeg4", "mpeg2video", "mpeg1video", "vc1", "mjpeg"):
        return None if chroma == "420" and depth == 8 else f"NVDEC cannot decode {codec} in {fmt}"
    return f"NVDEC cannot decode codec {codec or 'unknown'!r}"


def first_sample(cfg, shard_urls: list[str]):
    """The first readable :class:`~vidssl.data.stream.Sample` of the dataset (None when none is)."""
    from vidssl.data.stream import Sample, read_segment  # noqa: PLC0415

    for url in shard_urls[:3]:
        for _ordinal, item in read_segment(url, 0, 1, lambda o: True, timeout=cfg.read_timeout, retries=cfg.retries):
            if isinstance(item, Sample):
                return item
    return None


def cuda_decode_problem(cfg, shard_urls: list[str]) -> str | None:
    """None when ``decode_device: cuda`` will work for this dataset, else what is missing (one line)."""
    import torch  # noqa: PLC0415

    from vidssl.data.decode import DecodeError, TorchCodecDecoder, torchcodec_available  # noqa: PLC0415

    if not torch.cuda.is_available():
        vis = os.environ.get("CUDA_VISIBLE_DEVICES")
        return ("no GPU is visible to this process (torch.cuda.is_available() is False"
                + (f"; CUDA_VISIBLE_DEVICES={vis!r}" if vis is not None else "")
                + (f"; this torch has no CUDA support (torch {torch.__version__})" if not torch.version.cuda else "")
                + ")")
    why = torchcodec_available()
    if why:
        return why
    sample = first_sample(cfg, shard_urls)
    if sample is None:
        return None  # nothing readable to probe with: the loader's own errors will say why
    cap = torch.cuda.get_device_capability()
    bad = nvdec_problem(sample.meta.get("codec"), sample.meta.get("pix_fmt"), cap)
    if bad:
        return f"{bad} (first sample {sample.key})"
    try:
        TorchCodecDecoder(device="cuda").decode_tensor(sample.data, [0], sample.meta)
    except DecodeError as exc:
        return (f"torchcodec or its FFmpeg was built without CUDA (NVDEC) support: decoding sample {sample.key} "
                f"on the GPU failed ({exc}); install torchcodec's CUDA wheel matching your torch and FFmpeg "
                "libraries with NVDEC (docs/data.md, 'GPU decoding')")
    return None
