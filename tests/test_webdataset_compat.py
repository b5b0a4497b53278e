"""vidssl shards are plain WebDataset shards: the ``webdataset`` package reads them as vidssl does.

This is the compatibility guarantee behind the ``webdataset`` entry in pyproject.toml: every sample
of ``index.json`` comes out of ``webdataset.WebDataset`` exactly once, under vidssl's key, with
exactly the members vidssl writes (``KEY.json``, ``KEY.mp4``, ``KEY.cls`` when labelled) and the
same bytes vidssl's own reader (:func:`vidssl.data.stream.read_segment`) returns.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest
import webdataset

from vidssl.data.stream import Sample, read_segment
from vidssl.shard import ShardConfig, run_shard

pytestmark = pytest.mark.timeout(300)

# What a vidssl sample's metadata always holds (vidssl's reader needs frames, fps, keyframes).
META_FIELDS = {"key", "frames", "fps", "keyframes", "width", "height", "codec", "source", "label", "label_name"}


@pytest.fixture(scope="module")
def unlabelled_shards(digits_dir, tmp_path_factory) -> Path:
    """Five Moving Digits videos given as plain files (no labels), three samples a shard."""
    videos = sorted((digits_dir / "videos").glob("*.mp4"))[:5]
    out = tmp_path_factory.mktemp("wds") / "plain"
    run_shard(ShardConfig(sources=[str(v) for v in videos], output=str(out), gop=8, shard_samples=3,
                          progress="none", workers=1))
    return out


def _index(outdir: Path) -> dict:
    return json.loads((outdir / "index.json").read_text())


def _urls(outdir: Path) -> list[str]:
    return [str(outdir / s["name"]) for s in _index(outdir)["shards"]]


def wds_samples(outdir: Path, decode: bool = False) -> list[dict]:
    """Every sample of the dataset as plain ``webdataset.WebDataset`` returns it (no shuffling; raw
    bytes unless ``decode``, which applies webdataset's default, non-pickle decoders)."""
    ds = webdataset.WebDataset(_urls(outdir), shardshuffle=False)
    return list(ds.decode() if decode else ds)


def vidssl_samples(outdir: Path) -> list[tuple[str, Sample]]:
    """(shard url, Sample) for every sample, read with vidssl's own streaming reader."""
    out = []
    for url, shard in zip(_urls(outdir), _index(outdir)["shards"]):
        for _, item in read_segment(url, 0, shard["samples"]):
            assert isinstance(item, Sample), item
            out.append((url, item))
    return out


def members(sample: dict) -> dict:
    return {k: v for k, v in sample.items() if not k.startswith("__")}


def check_against_vidssl(outdir: Path, extensions: set[str]) -> list[dict]:
    index = _index(outdir)
    ours = vidssl_samples(outdir)
    theirs = wds_samples(outdir)
    assert len(ours) == index["totals"]["samples"] > 0
    # every sample of index.json exactly once, in shard order, from the shard the index names
    assert Counter(s["__url__"] for s in theirs) == Counter({url: s["samples"] for url, s in
                                                              zip(_urls(outdir), index["shards"])})
    assert [s["__key__"] for s in theirs] == [smp.key for _, smp in ours]
    assert len({s["__key__"] for s in theirs}) == len(theirs)
    for s, (url, smp) in zip(theirs, ours):
        key = s["__key__"]
        assert "." not in key and "/" not in key, key
        assert s["__url__"] == url
        assert set(members(s)) == extensions, key  # exactly the members vidssl writes
        assert isinstance(s["mp4"], bytes) and s["mp4"] == smp.data and s["mp4"][4:8] == b"ftyp"
        meta = json.loads(s["json"])
        assert META_FIELDS <= set(meta), sorted(META_FIELDS - set(meta))
        assert meta["key"] == key
        assert meta["frames"] == smp.meta["frames"] >= 1 and float(meta["fps"]) == smp.meta["fps"] > 0
        assert meta["label"] == smp.label
    return theirs


def test_labelled_shards_read_with_plain_webdataset(ssl_shards, digits_dir):
    theirs = check_against_vidssl(ssl_shards, {"json", "mp4", "cls"})
    classes = _index(ssl_shards)["classes"]
    with open(digits_dir / "labels.csv", newline="") as f:
        truth = {str((digits_dir / row["path"]).resolve()): row["label"] for row in csv.DictReader(f)}
    seen = set()
    for s in theirs:
        label = int(s["cls"].decode("ascii"))
        meta = json.loads(s["json"])
        assert s["cls"] == str(label).encode()  # decimal text, nothing else
        assert 0 <= label < len(classes)
        assert classes[label] == meta["label_name"] == truth[str(Path(meta["source"]).resolve())]
        seen.add(classes[label])
    assert len(seen) > 1
    # webdataset's default decoders: json → dict, cls → int, mp4 left as bytes
    for raw, dec in zip(theirs, wds_samples(ssl_shards, decode=True), strict=True):
        assert dec["__key__"] == raw["__key__"]
        assert dec["cls"] == int(raw["cls"]) and dec["json"] == json.loads(raw["json"]) and dec["mp4"] == raw["mp4"]


def test_unlabelled_shards_read_with_plain_webdataset(unlabelled_shards):
    assert len(_index(unlabelled_shards)["shards"]) == 2  # 3 + 2 samples: the reader crosses a shard
    for s in check_against_vidssl(unlabelled_shards, {"json", "mp4"}):
        assert json.loads(s["json"])["label"] == -1
