"""decode_device=cuda: one clear error before any batch naming what is missing (simulated on this CPU
machine), the CPU fallback, the NVDEC support table; and, where a GPU exists, frames and a smoke run."""

from __future__ import annotations

import logging

import pytest
import torch

from vidssl.data import DataConfig, build_loader
from vidssl.data import cuda as cuda_mod
from vidssl.data import decode as decode_mod
from vidssl.data.cuda import nvdec_problem
from vidssl.data.stream import Sample
from vidssl.errors import UserError

HAVE_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def shards(ssl_shards):
    return ssl_shards


def cfg(ds, **kw):
    base = dict(dataset=str(ds), batch_size=2, workers=0, frames=4, stride=2, future=2, gap_min=2, gap_max=8,
                crop_size=32, mode="clip", decode_stage="main", decode_device="cuda", seed=1)
    base.update(kw)
    return DataConfig(**base)


def _pretend_gpu(monkeypatch, capability=(9, 0)):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)


@pytest.mark.skipif(HAVE_CUDA, reason="this machine has a GPU: the no-GPU message cannot be seen")
def test_no_gpu_is_one_clear_error_before_any_batch(shards):
    with pytest.raises(UserError) as exc:
        build_loader(cfg(shards), rank=0, world_size=1)
    msg = str(exc.value)
    assert msg.startswith("data.decode_device=cuda: no GPU is visible to this process")
    assert "decode_fallback=cpu" in msg  # says how to go on


def test_torchcodec_missing_is_named(shards, monkeypatch):
    _pretend_gpu(monkeypatch)
    monkeypatch.setattr(decode_mod, "torchcodec_available", lambda: "torchcodec is not installed (pip install torchcodec)")
    with pytest.raises(UserError, match="cuda: torchcodec is not installed"):
        build_loader(cfg(shards), rank=0, world_size=1)


def test_torchcodec_unimportable_reports_why(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchcodec", None)  # import torchcodec → ImportError
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    assert "torchcodec" in decode_mod.torchcodec_available()


def test_torchcodec_or_ffmpeg_without_cuda_is_named(shards, monkeypatch):
    # torchcodec is importable; decoding the first sample on "cuda" fails as it does with a CPU-only
    # torchcodec or an FFmpeg without NVDEC.
    _pretend_gpu(monkeypatch)
    monkeypatch.setattr(decode_mod, "torchcodec_available", lambda: None)

    def no_cuda(self, data, indices, meta):
        raise decode_mod.DecodeError("torchcodec: Unsupported device: cuda")

    monkeypatch.setattr(decode_mod.TorchCodecDecoder, "decode_tensor", no_cuda)
    with pytest.raises(UserError, match="built without CUDA .NVDEC. support: decoding sample .* Unsupported device"):
        build_loader(cfg(shards), rank=0, world_size=1)


@pytest.mark.parametrize("codec,pix_fmt,cap,words", [
    ("av1", "yuv420p", (9, 0), "cannot decode AV1 on this GPU"),
    ("h264", "yuv444p", (9, 0), "4:4:4 H.264"),
    ("h264", "yuv420p10le", (9, 0), "10-bit H.264"),
])
def test_codec_nvdec_cannot_decode_is_named(shards, monkeypatch, codec, pix_fmt, cap, words):
    _pretend_gpu(monkeypatch, cap)
    monkeypatch.setattr(decode_mod, "torchcodec_available", lambda: None)
    real = cuda_mod.first_sample

    def first(c, urls):
        s = real(c, urls)
        return Sample(s.key, {**s.meta, "codec": codec, "pix_fmt": pix_fmt}, s.data, s.label)

    monkeypatch.setattr(cuda_mod, "first_sample", first)
    with pytest.raises(UserError, match=words):
        build_loader(cfg(shards), rank=0, world_size=1)


def test_fallback_to_cpu_warns_loudly_and_gives_the_cpu_batches(shards, caplog, monkeypatch):
    monkeypatch.setattr(cuda_mod, "cuda_decode_problem", lambda c, urls: "no GPU is visible to this process")
    with caplog.at_level(logging.WARNING, logger="vidssl.data"):
        loader = build_loader(cfg(shards, decode_fallback="cpu"), rank=0, world_size=1)
    assert "FALLING BACK TO CPU DECODING" in caplog.text and "no GPU is visible" in caplog.text
    assert loader.stats["decode_device"] == "cpu" and loader.stats["backend"] == "pyav"
    got = list(loader)
    want = list(build_loader(cfg(shards, decode_device="cpu"), rank=0, world_size=1))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a["key"] == b["key"] and torch.equal(a["video"], b["video"])


def test_nvdec_support_table():
    assert nvdec_problem("h264", "yuv420p", (8, 0)) is None
    assert nvdec_problem("hevc", "yuv420p10le", (9, 0)) is None
    assert "Pascal" in nvdec_problem("hevc", "yuv420p", (5, 2))
    assert nvdec_problem("av1", "yuv420p", (8, 6)) is None  # consumer Ampere decodes AV1
    assert "A100" in nvdec_problem("av1", "yuv420p", (8, 0))
    assert "4:2:2" in nvdec_problem("h264", "yuv422p", (9, 0))
    assert "4:4:4 HEVC from Turing" in nvdec_problem("hevc", "yuv444p", (7, 0))
    assert nvdec_problem("hevc", "yuv444p", (8, 0)) is None
    assert "codec 'prores'" in nvdec_problem("prores", "yuv422p10le", (10, 0))


def test_cpu_only_backends_on_cuda_are_config_errors(tmp_path):
    from vidssl.config import ConfigError

    with pytest.raises(ConfigError, match="backend: got 'pyav' with decode_device 'cuda'"):
        DataConfig(dataset="x", decode_stage="main", decode_device="cuda", backend="pyav")


# ---- on a GPU ---------------------------------------------------------------------------------------

@pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA GPU on this machine: NVDEC frames and throughput are checked "
                                          "on a GPU machine only")
def test_nvdec_frames_match_cpu_and_batches_stay_on_the_gpu(shards):
    from vidssl.data.decode import TorchCodecDecoder, full_decode
    from vidssl.data.cuda import first_sample
    from vidssl.data.index import open_index

    ix = open_index(str(shards))
    s = first_sample(cfg(shards), [u for _, u, n in ix.shards if n])
    ref = torch.from_numpy(full_decode(s.data)).permute(0, 3, 1, 2)  # (N, C, H, W)
    idx = list(range(0, len(ref), 3))
    got = TorchCodecDecoder(device="cuda").decode_tensor(s.data, idx, s.meta)
    assert got.is_cuda and got.shape == ref[idx].shape
    # NVDEC's YUV→RGB conversion differs from swscale's by a few levels (rounding, matrix): tolerance.
    diff = (got.cpu().int() - ref[idx].int()).abs().float()
    assert diff.mean() < 3.0 and diff.max() <= 40, (diff.mean().item(), diff.max().item())
    loader = build_loader(cfg(shards, mode="ssl", augment="train"), rank=0, world_size=1)
    assert loader.stats["decode_device"] == "cuda" and loader.stats["backend"] == "torchcodec"
    n = 0
    for b in loader:
        assert b["context"].is_cuda and b["context"].dtype == torch.uint8
        n += 1
    assert n == len(loader)
