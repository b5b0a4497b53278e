"""The streaming loader end to end on datasets written by ``vidssl.shard.run_shard``."""

from __future__ import annotations

import collections
import functools
import http.server
import io
import json
import os
import shutil
import tarfile
import threading

import pytest
import torch
from loaderkit import labelled_dataset, same, shard_videos, write_video

from vidssl.config import ConfigError, parse_config_args
from vidssl.data import DataConfig, build_loader
from vidssl.data.decode import full_decode
from vidssl.errors import RuntimeFailure, UserError

av = pytest.importorskip("av")


_write_video = write_video


_shard = shard_videos


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """11 clips of 14..46 frames with labels → 4 uneven shards (3, 3, 3, 2)."""
    return labelled_dataset(tmp_path_factory.mktemp("data"), 11, lambda i: 14 + (i * 5) % 33, ["left", "right", "up"])


def _members(ds):
    """{key: (meta, mp4 bytes)} straight from the tars (test reference)."""
    out = {}
    for name in sorted(os.listdir(ds)):
        if name.endswith(".tar"):
            with tarfile.open(ds / name) as tf:
                for m in tf.getmembers():
                    key, ext = m.name.split(".", 1)
                    out.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return {k: (json.loads(v["json"]), v["mp4"]) for k, v in out.items()}


def cfg(ds, **kw):
    base = dict(dataset=str(ds), batch_size=2, workers=0, frames=4, stride=2, future=2, gap_min=2, gap_max=10,
                crop_size=32, shuffle_buffer=4)
    base.update(kw)
    return DataConfig(**base)


_same = same  # exact batch equality (tests/loaderkit.py)


# ---- batches ----------------------------------------------------------------------------------

def test_ssl_batch_format(dataset):
    loader = build_loader(cfg(dataset), rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 11 // 2
    b = batches[0]
    assert b["context"].shape == (2, 4, 3, 32, 32) and b["context"].dtype == torch.uint8
    assert b["future"].shape == (2, 2, 3, 32, 32) and b["other"].shape == (2, 4, 3, 32, 32)
    fi = b["frame_indices"]
    assert fi["context"].shape == (2, 4) and fi["future"].shape == (2, 2)
    # The future follows the context at the same stride; the other window is gap_min..gap_max away.
    for r in range(2):
        ctx, fut, oth = fi["context"][r].tolist(), fi["future"][r].tolist(), fi["other"][r].tolist()
        meta = _members(dataset)[b["key"][r]][0]
        if ctx[-1] + 2 * 2 < meta["frames"]:
            assert fut == [ctx[-1] + 2, ctx[-1] + 4]
            assert 2 <= abs(oth[0] - ctx[0]) <= 10
    assert b["label"].dtype == torch.int64 and set(b["label"].tolist()) <= {0, 1, 2}
    assert b["dataset"].tolist() == [0, 0] and b["valid"].all()
    assert len(b["key"]) == 2


def test_clip_views_and_none(dataset):
    clip = next(iter(build_loader(cfg(dataset, mode="clip", augment="none"), rank=0, world_size=1)))
    assert clip["video"].shape == (2, 4, 3, 48, 64)  # native size, untouched
    views = next(iter(build_loader(cfg(dataset, mode="views", views=3, augment="eval", eval_crops=3,
                                       eval_resize=40), rank=0, world_size=1)))
    assert views["video"].shape == (2, 9, 4, 3, 32, 32)
    assert views["frame_indices"]["video"].shape == (2, 9, 4)
    # Evenly spaced windows, each repeated for its three crops, deterministic (no randomness).
    starts = views["frame_indices"]["video"][0, ::3, 0].tolist()
    assert starts == sorted(starts) and starts[0] == 0


def test_augmentation_same_params_within_a_clip(dataset):
    # A crop that differs between frames would change the per-frame difference pattern; with a
    # flip-only augmentation we can check exactly: every frame flipped or none.
    c = cfg(dataset, mode="clip", augment="train", scale=(1.0, 1.0), ratio=(1.3333, 1.3334), jitter_p=0.0,
            grayscale_p=0.0, crop_size=48, seed=3)
    raw = cfg(dataset, mode="clip", augment="none", seed=3)
    flipped = same = 0
    for a, b in zip(build_loader(c, rank=0, world_size=1), build_loader(raw, rank=0, world_size=1)):
        assert torch.equal(a["frame_indices"]["video"], b["frame_indices"]["video"])
        for r in range(2):
            x = b["video"][r][..., 8:56].float()  # centre 48x48 of 48x64 ≈ the full-area 4:3 crop
            y = a["video"][r].float()
            d_same = [float((y[t] - torch.nn.functional.interpolate(x[t:t + 1], size=(48, 48), mode="bilinear",
                                                                     antialias=True)[0]).abs().mean()) for t in range(4)]
            d_flip = [float((y[t].flip(-1) - torch.nn.functional.interpolate(
                x[t:t + 1], size=(48, 48), mode="bilinear", antialias=True)[0]).abs().mean()) for t in range(4)]
            is_flip = [df < ds for ds, df in zip(d_same, d_flip)]
            assert len(set(is_flip)) == 1  # the same decision for every frame
            flipped += is_flip[0]
            same += not is_flip[0]
    assert flipped and same  # both outcomes occur over the epoch


def test_ssl_windows_draw_independent_crops(dataset):
    c = cfg(dataset, scale=(0.2, 0.3), jitter_p=0, grayscale_p=0, flip=False, gap_min=0, gap_max=0)
    b = next(iter(build_loader(c, rank=0, world_size=1)))
    # gap 0: other covers the same source frames as context, but its crop is drawn independently.
    assert torch.equal(b["frame_indices"]["context"], b["frame_indices"]["other"])
    assert not torch.equal(b["context"], b["other"])


def test_ssl_windows_share_the_flip(dataset):
    # Full-frame crops, gap 0: other shows the context's frames, so it equals the context when both
    # windows got the same flip and its mirror otherwise. A window mirrored alone would move the other
    # way, and temporal contrast would then teach the model to ignore the direction of motion.
    c = cfg(dataset, scale=(1.0, 1.0), ratio=(1.3333, 1.3334), jitter_p=0, grayscale_p=0, flip=True,
            gap_min=0, gap_max=0, crop_size=48)
    raw = cfg(dataset, augment="none", gap_min=0, gap_max=0)
    flipped = same = 0
    for a, b in zip(build_loader(c, rank=0, world_size=1), build_loader(raw, rank=0, world_size=1)):
        assert torch.equal(a["frame_indices"]["context"], a["frame_indices"]["other"])
        for r in range(a["context"].shape[0]):
            assert torch.equal(a["context"][r], a["other"][r])
            x = b["context"][r][0:1, ..., 8:56].float()  # first frame, centre 4:3 crop at native size
            x = torch.nn.functional.interpolate(x, size=(48, 48), mode="bilinear", antialias=True)[0]
            y = a["context"][r][0].float()
            is_flip = float((y.flip(-1) - x).abs().mean()) < float((y - x).abs().mean())
            flipped += is_flip
            same += not is_flip
    assert flipped and same  # both outcomes occur, and each time both windows agree


# ---- frame exactness ------------------------------------------------------------------------------

def _needs(backend):
    """Skip (with the reason) a torchcodec case where torchcodec or its FFmpeg libraries are missing."""
    if backend == "torchcodec":
        from vidssl.data.decode import torchcodec_available

        why = torchcodec_available()
        if why:
            pytest.skip(why)


BACKENDS = ["pyav", "decord", "torchcodec"]


@pytest.mark.parametrize("stage", ["worker", "main"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_frame_exactness_against_full_decode(dataset, backend, stage):
    _needs(backend)
    ref = {k: full_decode(data) for k, (meta, data) in _members(dataset).items()}
    for k, (meta, _) in _members(dataset).items():
        assert len(ref[k]) == meta["frames"]
    c = cfg(dataset, mode="views", views=3, frames=5, stride=3, augment="none", backend=backend, drop_last=False,
            decode_stage=stage)
    n = 0
    loader = build_loader(c, rank=0, world_size=1)
    assert loader.stats["backend"] == backend and loader.stats["decode_device"] == "cpu"
    for b in loader:
        for r, key in enumerate(b["key"]):
            idx = b["frame_indices"]["video"][r]  # (K, T)
            for v in range(idx.shape[0]):
                want = torch.from_numpy(ref[key][idx[v].numpy()]).permute(0, 3, 1, 2)
                assert torch.equal(b["video"][r, v], want), (backend, key, idx[v].tolist())
                n += 1
    assert n >= 11 * 3


@pytest.mark.parametrize("stage,workers", [("worker", 0), ("worker", 2), ("main", 1)])
def test_loader_stats_count_the_pictures_pyav_read_and_decoded(dataset, stage, workers):
    # vidssl shards have B-frames by default: at stride 2 the ones between the kept frames are read
    # but not decoded, and the stats say so (in the workers and in the main-process stage).
    assert {meta["bframes"] for meta, _ in _members(dataset).values()} == {3}
    c = cfg(dataset, mode="clip", frames=4, stride=2, augment="none", backend="pyav", decode_stage=stage,
            workers=workers, drop_last=False)
    loader = build_loader(c, rank=0, world_size=1)
    n = sum(len(b["key"]) for b in loader)
    s = loader.stats
    assert n >= 11 and 4 * 11 <= s["pictures_decoded"] < s["pictures_read"]
    # decord does not count: both stay 0 rather than claiming anything.
    d = build_loader(c.replace(backend="decord", decode_stage="worker"), rank=0, world_size=1)
    list(d)
    assert (d.stats["pictures_decoded"], d.stats["pictures_read"]) == (0, 0)


@pytest.fixture(scope="module")
def real_datasets(request, tmp_path_factory):
    """The real H.264 sample clips, sharded re-encoded (small short side) and stream-copied."""
    clips = [str(p) for p in request.getfixturevalue("sample_clips")]
    from vidssl.shard import ShardConfig, run_shard

    root = tmp_path_factory.mktemp("real")
    run_shard(ShardConfig(sources=clips, output=str(root / "enc"), shard_samples=2, short_side=64, gop=8, workers=1))
    # Stream copy keeps the sources' B-frames and long GOPs; skip the 720p clip to stay fast.
    small = [c for c in clips if "bigbuckbunny" not in c]
    run_shard(ShardConfig(sources=small, output=str(root / "copy"), shard_samples=2, copy=True, workers=1))
    return root


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["enc", "copy"])
def test_frame_exactness_on_real_clips(real_datasets, backend, kind):
    _needs(backend)
    ds = real_datasets / kind
    members = _members(ds)
    c = cfg(ds, mode="views", views=2, frames=3, stride=7, augment="none", backend=backend, drop_last=False,
            batch_size=1, seed=5)
    seen = set()
    for b in build_loader(c, rank=0, world_size=1):
        key = b["key"][0]
        meta, data = members[key]
        ref = full_decode(data)
        assert len(ref) == meta["frames"]
        idx = b["frame_indices"]["video"][0]  # (K, T)
        for v in range(idx.shape[0]):
            want = torch.from_numpy(ref[idx[v].numpy()]).permute(0, 3, 1, 2)
            assert torch.equal(b["video"][0, v], want), (backend, kind, key, idx[v].tolist())
        seen.add(key)
    assert seen == set(members)


# ---- order, resume ------------------------------------------------------------------------------

def _keys(loader):
    return [b["key"] for b in loader]


def test_epochs_differ_and_seed_repeats(dataset):
    loader = build_loader(cfg(dataset, mode="clip", augment="none"), rank=0, world_size=1)
    e0 = _keys(loader)
    e1 = _keys(loader)  # a finished pass advances the epoch
    assert loader.epoch == 2 and e0 != e1
    loader.set_epoch(0)
    assert _keys(loader) == e0


def test_ranks_equal_batches_no_duplicates(dataset):
    for drop_last in (True, False):
        per_rank = [_keys(build_loader(cfg(dataset, mode="clip", augment="none", batch_size=2, drop_last=drop_last),
                                       rank=r, world_size=3)) for r in range(3)]
        assert len({len(k) for k in per_rank}) == 1
        flat = [k for ks in per_rank for b in ks for k in b]
        if drop_last:
            assert len(flat) == len(set(flat)) == 3 * 2 * (11 // 6)
        else:
            assert set(flat) == set(_members(dataset)) and len(flat) == 12  # one padded repeat


@pytest.mark.parametrize("mode", ["ssl", "views"])
def test_resume_mid_epoch_gives_the_same_batches(dataset, mode):
    c = cfg(dataset, mode=mode, drop_last=False, augment="train" if mode == "ssl" else "eval")
    full = build_loader(c, rank=0, world_size=1)
    full.set_epoch(2)
    ref = list(full)
    for k in (1, 4):
        a = build_loader(c, rank=0, world_size=1)
        a.set_epoch(2)
        it = iter(a)
        for _ in range(k):
            next(it)
        state = a.state_dict()
        assert state["epoch"] == 2 and state["batches"] == k
        b = build_loader(c, rank=0, world_size=1)
        b.load_state_dict(state)
        b.set_epoch(2)  # a training loop calls set_epoch again: the position is kept
        rest = list(b)
        assert len(rest) == len(ref) - k
        for x, y in zip(rest, ref[k:]):
            _same(x, y)


def test_resume_from_a_state_taken_at_the_last_batch(dataset):
    """A checkpoint written inside the loop after the epoch's last batch: the resumed loader does
    not replay that epoch (whether or not the loop calls set_epoch with the saved epoch again)."""
    c = cfg(dataset, mode="clip", augment="none")
    ref = build_loader(c, rank=0, world_size=1)
    ref.set_epoch(1)
    ep1, ep2 = list(ref), list(ref)
    a = build_loader(c, rank=0, world_size=1)
    a.set_epoch(1)
    for _ in a:
        state = a.state_dict()  # the last one is taken after the last batch, before the loop ends
    assert state["epoch"] == 1 and state["batches"] == len(a) == len(ep1)
    b = build_loader(c, rank=0, world_size=1)
    b.load_state_dict(state)
    b.set_epoch(1)  # a training loop resuming in its epoch 1
    assert list(b) == []
    b.set_epoch(2)
    for x, y in zip(list(b), ep2, strict=True):
        _same(x, y)
    d = build_loader(c, rank=0, world_size=1)
    d.load_state_dict(state)
    assert list(d) == [] and d.epoch == 2  # the rest of epoch 1 (nothing), then epoch 2
    for x, y in zip(list(d), ep2, strict=True):
        _same(x, y)


def test_reshard_maps_a_state_from_another_world_size_to_the_same_point_of_the_epoch(dataset):
    """train.elastic_resume: 11 samples, batch 1: 11 batches per rank at world size 1, 5 at 2."""
    c = cfg(dataset, batch_size=1, mode="clip", augment="none")
    one = build_loader(c, rank=0, world_size=1)
    one.set_epoch(2)
    state = dict(one.state_dict(), batches=4)
    two = [build_loader(c, rank=r, world_size=2) for r in range(2)]
    for ld in two:
        ld.load_state_dict(state, reshard=True)
        assert (ld.epoch, ld.state_dict()["batches"], len(ld)) == (2, 1, 5)  # floor(4 / 11 * 5)
        assert ld.state_dict()["world_size"] == 2  # its own settings from now on
    assert [len(_keys(ld)) for ld in two] == [4, 4]
    # A finished epoch stays finished, and the next epoch is this world size's own, exactly.
    for ld in two:
        ld.load_state_dict(dict(state, batches=11), reshard=True)
        assert _keys(ld) == []
        ld.set_epoch(3)
        fresh = build_loader(c, rank=ld.rank, world_size=2)
        fresh.set_epoch(3)
        assert _keys(ld) == _keys(fresh)
    # Back: 3 of 5 batches at world size 2 are 6 of 11 at world size 1; another worker count too.
    back = build_loader(cfg(dataset, batch_size=1, mode="clip", augment="none", workers=2), rank=0, world_size=1)
    back.load_state_dict(two[0].state_dict() | {"epoch": 2, "batches": 3}, reshard=True)
    assert (back.epoch, back.state_dict()["batches"]) == (2, 6) and len(_keys(back)) == 5
    back.close()
    # Everything else still has to match.
    with pytest.raises(UserError, match="seed was 0 when saved and is 1"):
        build_loader(cfg(dataset, batch_size=1, seed=1), rank=0, world_size=2).load_state_dict(state, reshard=True)
    with pytest.raises(UserError, match="batch_size was 1 when saved and is 2"):
        build_loader(cfg(dataset), rank=0, world_size=2).load_state_dict(state, reshard=True)
    with pytest.raises(UserError, match=r"batches 12 outside 0\.\.11 for epoch 2 at world size 1"):
        two[0].load_state_dict(dict(state, batches=12), reshard=True)


def test_resume_does_not_decode_skipped_samples(dataset, monkeypatch):
    from vidssl.data import decode

    c = cfg(dataset, mode="clip", augment="none", shuffle=False)
    a = build_loader(c, rank=0, world_size=1)
    it = iter(a)
    next(it), next(it), next(it)
    calls = []
    orig = decode.PyAVDecoder._decode_sorted
    monkeypatch.setattr(decode.PyAVDecoder, "_decode_sorted",
                        lambda self, data, want, meta: calls.append(meta["key"]) or orig(self, data, want, meta))
    b = build_loader(c, rank=0, world_size=1)
    b.load_state_dict(a.state_dict())
    rest = [k for batch in b for k in batch["key"]]
    assert sorted(calls) == sorted(rest) and len(calls) == 4  # only the 2 remaining batches were decoded


def test_state_from_other_world_size_or_workers_is_refused(dataset):
    a = build_loader(cfg(dataset), rank=0, world_size=1)
    state = a.state_dict()
    with pytest.raises(UserError, match="world_size was 1 when saved and is 2"):
        build_loader(cfg(dataset, batch_size=1), rank=0, world_size=2).load_state_dict(dict(state, batch_size=1))
    with pytest.raises(UserError, match="workers was 1 when saved and is 2"):
        build_loader(cfg(dataset, workers=2), rank=0, world_size=1).load_state_dict(state)
    # Plan settings that change which batches an epoch holds are refused too; a JSON round trip
    # (as checkpoints store it) and an older state without them still load.
    with pytest.raises(UserError, match="data.drop_last was True when saved and is False"):
        build_loader(cfg(dataset, drop_last=False), rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(UserError, match="data.shuffle was True when saved and is False"):
        build_loader(cfg(dataset, shuffle=False), rank=0, world_size=1).load_state_dict(state)
    with pytest.raises(UserError, match="data.shuffle_buffer was 4 when saved and is 8"):
        build_loader(cfg(dataset, shuffle_buffer=8), rank=0, world_size=1).load_state_dict(state)
    build_loader(cfg(dataset), rank=0, world_size=1).load_state_dict(json.loads(json.dumps(state)))
    build_loader(cfg(dataset, shuffle=False), rank=0, world_size=1).load_state_dict(
        {k: v for k, v in state.items() if k != "plan"})


@pytest.mark.parametrize("mode", ["ssl", "clip", "views"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_stage_main_gives_the_same_batches(dataset, backend, mode):
    # The main-process stage (batched augmentation of the whole batch) with any backend gives the
    # worker stage's batches exactly: same frames, same per-clip augmentation.
    _needs(backend)
    a = list(build_loader(cfg(dataset, mode=mode, backend="pyav"), rank=0, world_size=1))
    loader = build_loader(cfg(dataset, mode=mode, decode_stage="main", backend=backend), rank=0, world_size=1)
    b = list(loader)
    assert loader.stats["backend"] == backend
    assert len(a) == len(b)
    for x, y in zip(a, b):
        _same(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_stage_main_resumes_mid_epoch(dataset, backend):
    _needs(backend)
    c = cfg(dataset, decode_stage="main", backend=backend, mode="clip")
    full = list(build_loader(c, rank=0, world_size=1))
    a = build_loader(c, rank=0, world_size=1)
    it = iter(a)
    next(it)
    next(it)
    b = build_loader(c, rank=0, world_size=1)
    b.load_state_dict(a.state_dict())
    rest = list(b)
    assert len(rest) == len(full) - 2
    for x, y in zip(rest, full[2:]):
        _same(x, y)


@pytest.mark.slow
def test_workers_processes_resume_and_equal_ranks(dataset):
    c = cfg(dataset, workers=2, drop_last=False, mode="clip", augment="none", batch_size=1)
    ranks = [list(build_loader(c, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6
    keys = [k for batches in ranks for b in batches for k in b["key"]]
    assert set(keys) == set(_members(dataset))
    # resume in the middle with 2 worker processes (worker roles rotate; order must be exact)
    for k in (1, 2, 3):
        a = build_loader(c, rank=1, world_size=2)
        it = iter(a)
        for _ in range(k):
            next(it)
        b = build_loader(c, rank=1, world_size=2)
        b.load_state_dict(a.state_dict())
        rest = list(b)
        assert [x["key"] for x in rest] == [x["key"] for x in ranks[1][k:]]
        for x, y in zip(rest, ranks[1][k:]):
            _same(x, y)
    # same batches from worker processes with decode_stage=main
    m = list(build_loader(cfg(dataset, workers=2, drop_last=False, mode="clip", augment="none", batch_size=1,
                              decode_stage="main"), rank=0, world_size=2))
    for x, y in zip(m, ranks[0]):
        _same(x, y)


@pytest.mark.slow
def test_persistent_workers_reused_buffers_hold_exact_frames(dataset):
    # Workers persist across epochs and stack batches into a few reused shared-memory buffers. Every
    # batch the trainer keeps must still hold its own frames after the workers reused their buffers
    # for later batches and epochs, and each epoch must equal a fresh loader's.
    members = _members(dataset)
    ref = {k: full_decode(v[1]) for k, v in members.items()}
    c = cfg(dataset, workers=2, prefetch=1, drop_last=False, mode="clip", augment="none", batch_size=2)
    loader = build_loader(c, rank=0, world_size=1)
    kept, pids = [], []
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = list(loader)
        pids.append(sorted(w.pid for w in loader._pool[0]._iterator._workers))
        fresh = build_loader(c, rank=0, world_size=1)
        fresh.set_epoch(epoch)
        for x, y in zip(batches, list(fresh), strict=True):
            _same(x, y)
        fresh.close()
        kept.extend(batches)
    assert pids[0] == pids[1] == pids[2]  # the same worker processes served every epoch
    assert len(kept) == 3 * 6
    for b in kept:
        for r, key in enumerate(b["key"]):
            want = torch.from_numpy(ref[key][b["frame_indices"]["video"][r].numpy()]).permute(0, 3, 1, 2)
            assert torch.equal(b["video"][r], want), key
    loader.close()
    assert loader._pool is None
    assert len(list(loader)) == 6  # closed workers are started again on demand (epoch 3)
    loader.close()


@pytest.mark.slow
def test_ring_buffer_files_follow_changing_frame_sizes_and_are_removed_on_close(real_datasets, monkeypatch):
    # The real clips have different sizes: with batch_size 1 and augment none each batch has its own
    # shape, so the workers' ring buffer files on /dev/shm are made again when a batch needs more room.
    # Every frame equals a full decode, the batches equal the torch shared-memory fallback's, and
    # close() leaves nothing on /dev/shm.
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine: the ring uses torch shared-memory tensors")
    ds = real_datasets / "enc"
    members = _members(ds)
    ref = {k: full_decode(data) for k, (_meta, data) in members.items()}
    before = set(os.listdir("/dev/shm"))
    runs = {}
    for bs in (1, 2):  # 2: rows of different sizes in one batch stay a list, each row its own file
        c = cfg(ds, mode="clip", frames=3, stride=2, augment="none", batch_size=bs, drop_last=False, seed=3,
                workers=2, prefetch=1)
        loader = build_loader(c, rank=0, world_size=1)
        got = []
        for b in loader:
            got.append(b)
            rings = [d for d in set(os.listdir("/dev/shm")) - before if "-ring-" in d]
            assert len(rings) == 1 and os.listdir(os.path.join("/dev/shm", rings[0]))  # the files in use
        for b in got:
            for r, key in enumerate(b["key"]):
                want = torch.from_numpy(ref[key][b["frame_indices"]["video"][r].numpy()]).permute(0, 3, 1, 2)
                assert torch.equal(b["video"][r], want), key
        loader.close()
        assert set(os.listdir("/dev/shm")) - before == set()
        runs[bs] = (c, got)
    assert len({tuple(b["video"].shape) for b in runs[1][1]}) > 1
    assert any(isinstance(b["video"], list) for b in runs[2][1])
    monkeypatch.setenv("VIDSSL_RING_FILES", "0")
    for c, got in runs.values():
        fallback = build_loader(c, rank=0, world_size=1)
        for x, y in zip(list(fallback), got, strict=True):
            _same(x, y)
        assert not [d for d in set(os.listdir("/dev/shm")) - before if "-ring-" in d]
        fallback.close()


def test_pin_memory_loader_runs_without_a_gpu_and_pins_with_one(dataset):
    # GPU configs set pin_memory; on a CPU-only machine the batches come unpinned instead of failing.
    c = cfg(dataset, workers=2, pin_memory=True, mode="clip", augment="none", batch_size=2)
    batches = list(build_loader(c, rank=0, world_size=1))
    assert batches and all(b["video"].is_pinned() == torch.cuda.is_available() for b in batches)
    for x, y in zip(batches, build_loader(c.replace(pin_memory=False), rank=0, world_size=1), strict=True):
        _same(x, y)


@pytest.mark.slow
def test_abandoned_iteration_then_resume_with_persistent_workers(dataset):
    c = cfg(dataset, workers=2, drop_last=False, mode="clip", augment="none", batch_size=1)
    ref = list(build_loader(c, rank=0, world_size=1))
    loader = build_loader(c, rank=0, world_size=1)
    it = iter(loader)
    first = [next(it), next(it)]  # the workers have prefetched more: those batches are discarded
    rest = list(loader)  # a new iteration continues from the consumed position, batch 2
    for x, y in zip(first + rest, ref, strict=True):
        _same(x, y)
    with pytest.raises(RuntimeFailure, match="iterated again"):
        next(it)  # the old iteration cannot continue: its workers served the new one
    loader.close()


# ---- bad data ---------------------------------------------------------------------------------

def _copy(ds, dst):
    shutil.copytree(ds, dst)
    return dst


def test_truncated_and_missing_shards_are_counted_and_budgeted(dataset, tmp_path):
    ds = _copy(dataset, tmp_path / "bad")
    names = sorted(n for n in os.listdir(ds) if n.endswith(".tar"))
    data = (ds / names[1]).read_bytes()
    (ds / names[1]).write_bytes(data[: len(data) // 2])  # truncated mid-shard
    os.remove(ds / names[2])  # missing
    c = cfg(ds, mode="clip", augment="none", drop_last=False, max_error_fraction=0.9)
    loader = build_loader(c, rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 6  # the batch count never changes
    errs = loader.stats["errors"]
    assert errs["missing"] == 3 and 1 <= errs["truncated"] <= 3
    bad = sum((~b["valid"]).sum().item() for b in batches)
    assert bad == errs["missing"] + errs["truncated"] + 1  # + one padding row
    with pytest.raises(RuntimeFailure, match=names[2]) as exc:
        list(build_loader(cfg(ds, mode="clip", augment="none", max_error_fraction=0.1), rank=0, world_size=1))
    assert "max_error_fraction=0.1" in str(exc.value)


def test_error_budget_message_counts_this_epochs_kinds(dataset, tmp_path):
    import dataclasses

    ds = _copy(dataset, tmp_path / "bad")
    os.remove(ds / sorted(n for n in os.listdir(ds) if n.endswith(".tar"))[2])  # 3 samples missing
    c = cfg(ds, mode="clip", augment="none", drop_last=False, max_error_fraction=0.9)
    loader = build_loader(c, rank=0, world_size=1)
    list(loader)
    assert loader.stats["errors"] == {"missing": 3}
    loader.cfg = dataclasses.replace(c, max_error_fraction=0.1)
    with pytest.raises(RuntimeFailure, match=r"failed \(missing [1-3]\)") as exc:
        list(loader)  # epoch 1: the message names this epoch's errors, not the 3 of epoch 0 as well
    assert f"{loader.stats['epoch_errors']} of 12 samples" in str(exc.value)


@pytest.mark.parametrize("workers", [0, 2])
def test_no_usable_sample_in_a_workers_plan_is_one_clear_line(dataset, tmp_path, workers):
    ds = tmp_path / "gone"
    ds.mkdir()
    shutil.copy(dataset / "index.json", ds / "index.json")  # every shard missing: no row to stand in
    loader = build_loader(cfg(ds, mode="clip", augment="none", workers=workers, max_error_fraction=1.0),
                          rank=0, world_size=1)
    with pytest.raises(RuntimeFailure) as exc:
        list(loader)
    msg = str(exc.value)
    assert "\n" not in msg and "Traceback" not in msg  # not torch's worker wrapper: the CLI prints one line
    assert "none of the" in msg and "(missing " in msg and "ds-000000.tar" in msg
    loader.close()


@pytest.mark.parametrize("stage,backend", [("worker", "pyav"), ("main", "pyav"), ("main", "decord"),
                                           ("main", "torchcodec"), ("worker", "torchcodec")])
def test_undecodable_sample_is_skipped(dataset, tmp_path, stage, backend):
    _needs(backend)
    ds = tmp_path / "garbage"
    ds.mkdir()
    shutil.copy(dataset / "index.json", ds / "index.json")
    tars = sorted(n for n in os.listdir(dataset) if n.endswith(".tar"))
    for name in tars:
        with tarfile.open(dataset / name) as src, tarfile.open(ds / name, "w", format=tarfile.USTAR_FORMAT) as dst:
            for i, m in enumerate(src.getmembers()):
                blob = src.extractfile(m).read()
                if name == tars[-1] and i == 1:  # first mp4 of the last shard: garbage
                    blob = b"\0not a video" * 10
                m.size = len(blob)
                dst.addfile(m, io.BytesIO(blob))
    loader = build_loader(cfg(ds, mode="clip", augment="none", max_error_fraction=0.5, drop_last=False,
                              shuffle=False, decode_stage=stage, backend=backend),
                          rank=0, world_size=1)
    batches = list(loader)
    assert loader.stats["errors"] == {"decode": 1}
    assert loader.stats["error_shards"] == {tars[-1]: 1}  # attributed to its shard, whichever stage decoded
    assert sum((~b["valid"]).sum().item() for b in batches) == 2  # + one padding row


def test_short_video_policies(tmp_path):
    paths = []
    for i, n in enumerate([6, 30]):
        p = tmp_path / f"v{i}.mp4"
        _write_video(p, n, seed=i)
        paths.append(p)
    ds = _shard(paths, tmp_path / "ds", shard_samples=2, min_seconds=0.1)
    frames = {meta["frames"]: k for k, (meta, _) in _members(ds).items()}
    n = min(frames)  # the sharder may round 6 frames at 25 fps to 7
    assert n < 9  # shorter than the 5 frames at stride 2 (9 frames) the plan needs
    short_key = frames[n]
    for policy in ("loop", "pad"):
        for workers, stage in ((0, "worker"), (2, "worker"), (0, "main")):
            loader = build_loader(cfg(ds, mode="clip", augment="none", frames=5, stride=2, short=policy,
                                      shuffle=False, workers=workers, decode_stage=stage), rank=0, world_size=1)
            b = next(iter(loader))
            r = b["key"].index(short_key)
            idx = b["frame_indices"]["video"][r].tolist()
            want = [0, 2, 4, 6, 8]
            assert idx == ([i % n for i in want] if policy == "loop" else [min(i, n - 1) for i in want])
            assert b["valid"].all() and loader.stats["short"] == 1 and not loader.stats["errors"]  # counted
            loader.close()
    loader = build_loader(cfg(ds, mode="clip", augment="none", frames=5, stride=2, short="skip",
                              max_error_fraction=0.0), rank=0, world_size=1)
    b = next(iter(loader))
    assert loader.stats["short"] == 1 and b["valid"].tolist().count(False) == 1  # not in the error budget


# ---- HTTP -------------------------------------------------------------------------------------

class _Handler(http.server.SimpleHTTPRequestHandler):
    drop: str | None = None  # shard name whose response is cut in the middle

    def log_message(self, *a):
        pass

    def do_GET(self):
        if self.drop and self.path.endswith(self.drop):
            data = (self.server.root / self.drop).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def http_server(dataset):
    servers = []

    def start(drop=None):
        handler = type("H", (_Handler,), {"drop": drop})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                              functools.partial(handler, directory=str(dataset)))
        srv.root = dataset
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_http_streaming_matches_local(dataset, http_server):
    url = http_server()
    local = list(build_loader(cfg(dataset), rank=0, world_size=1))
    remote = list(build_loader(cfg(url), rank=0, world_size=1))
    assert len(local) == len(remote)
    for x, y in zip(local, remote):
        _same(x, y)


def test_http_dropped_connection_is_skipped_counted_and_budgeted(dataset, http_server):
    names = sorted(n for n in os.listdir(dataset) if n.endswith(".tar"))
    url = http_server(drop=names[1])
    loader = build_loader(cfg(url, mode="clip", augment="none", max_error_fraction=0.9, retries=1), rank=0,
                          world_size=1)
    batches = list(loader)
    assert len(batches) == len(loader)
    assert 1 <= loader.stats["errors"]["read"] <= 3 and set(loader.stats["errors"]) == {"read"}
    assert loader.stats["error_shards"][names[1]] == loader.stats["errors"]["read"]
    with pytest.raises(RuntimeFailure, match=names[1]):
        list(build_loader(cfg(url, mode="clip", augment="none", max_error_fraction=0.05), rank=0, world_size=1))


def test_missing_dataset_and_bad_config_are_clear_errors(tmp_path, dataset):
    with pytest.raises(UserError, match="no index.json"):
        build_loader(cfg(tmp_path / "nope"), rank=0, world_size=1)
    with pytest.raises(ConfigError, match="gap_min: got 9 > gap_max 3"):
        cfg(dataset, gap_min=9, gap_max=3)
    with pytest.raises(ConfigError, match="data.backend: got 'opencv'"):
        parse_config_args(type("T", (), {}) and _Root, ["data.dataset=x", "data.backend=opencv"])
    with pytest.raises(ConfigError, match="decode_stage=main"):
        cfg(dataset, decode_device="cuda")
    with pytest.raises(UserError, match="fewer than world_size"):
        build_loader(cfg(dataset, batch_size=4), rank=0, world_size=4)
    ok = parse_config_args(_Root, ["data.dataset=a,b", "data.weights=[1,0.5]", "data.flip=false"])
    assert ok.data.dataset == ["a", "b"] and ok.data.flip is False


from vidssl.config import Config, dataclass, field  # noqa: E402


@dataclass(kw_only=True)
class _Root(Config):
    data: DataConfig = field(default_factory=lambda: DataConfig(dataset="x"))



# ---- command line ---------------------------------------------------------------------------------

def test_cli_data_peek_and_plan(dataset, tmp_path, capsys):
    """`vidssl data peek/plan` read a dataset with a plain data YAML, with a whole-run YAML (its
    `data:` section, as the demo writes), and report bad values as usage errors (exit 2)."""
    from vidssl import cli

    plain = tmp_path / "data.yaml"
    plain.write_text("frames: 4\nstride: 2\nfuture: 2\ngap_min: 2\ngap_max: 10\ncrop_size: 32\nbatch_size: 2\n")
    whole = tmp_path / "run.yaml"
    whole.write_text("workdir: runs/x\nmodel:\n  backbone: cnn3d_small\ndata:\n  frames: 4\n  stride: 2\n"
                     "  future: 2\n  gap_min: 2\n  gap_max: 10\n  crop_size: 32\n  batch_size: 3\n")
    assert cli.main(["data", "peek", "-n", "1", str(dataset), str(plain), "workers=0"]) == 0
    out = capsys.readouterr().out
    assert "batch 1: context (2, 4, 3, 32, 32)" in out and "read 1 batches (2 clips)" in out
    assert cli.main(["data", "peek", "-n", "1", str(dataset), str(whole), "workers=0"]) == 0
    assert "batch 1: context (3, 4, 3, 32, 32)" in capsys.readouterr().out
    assert cli.main(["data", "plan", "--world-size", "2", str(dataset), str(whole)]) == 0
    assert capsys.readouterr().out.strip()
    assert cli.main(["data", "peek", str(dataset), str(plain), "frames=0"]) == 2
    assert "frames" in capsys.readouterr().err
    assert cli.main(["data", "peek", "--world-size", "0", str(dataset)]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: 3\n")
    assert cli.main(["data", "peek", str(dataset), str(bad)]) == 2
    assert "data: got 3; expected a mapping" in capsys.readouterr().err

# ---- hung decoder ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_hung_decode_kills_worker_and_is_skipped(dataset, monkeypatch):
    """A decode that never returns (as decord can, holding the GIL) is cut by the worker watchdog;
    the loader restarts workers from its position and yields every planned batch."""
    import time as _time

    from vidssl.data import decode

    victim = sorted(_members(dataset))[4]
    orig = decode.PyAVDecoder._decode_sorted

    def slow(self, data, want, meta):
        if meta["key"] == victim:
            _time.sleep(600)
        return orig(self, data, want, meta)

    monkeypatch.setattr(decode.PyAVDecoder, "_decode_sorted", slow)
    c = cfg(dataset, workers=2, mode="clip", augment="none", decode_timeout=1.0, max_error_fraction=0.5,
            drop_last=False)
    loader = build_loader(c, rank=0, world_size=1)
    batches = list(loader)
    assert len(batches) == len(loader)
    assert loader.stats["errors"] == {"timeout": 1} and loader.stats["restarts"] == 1
    keys = collections.Counter(k for b in batches for k, v in zip(b["key"], b["valid"]) if v)
    assert victim not in keys and len(keys) == 10
