"""Label-efficiency subsets (vidssl.data.subset): stratified, seeded, valid datasets, idempotent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vidssl.data.subset import KEYS_FILE, make_subset
from vidssl.errors import UserError
from vidssl.footage.digits import MOTIONS
from vidssl.shard import verify_dataset


def _index(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


def _source_labels(folder: Path) -> dict[str, int]:
    """key -> label of every sample of a dataset, read the way the loader reads shards."""
    from vidssl.data.stream import Sample, read_segment

    out = {}
    for s in _index(folder)["shards"]:
        for _, item in read_segment(str(folder / s["name"]), 0, s["samples"]):
            assert isinstance(item, Sample)
            out[item.key] = item.label
    return out


def _chosen(out: Path) -> dict[str, list[str]]:
    return json.loads((out / KEYS_FILE).read_text())["keys"]


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {s["name"]: (out / s["name"]).read_bytes() for s in _index(out)["shards"]}


def test_stratified_counts(ssl_shards, tmp_path):
    src = _index(ssl_shards)
    third = make_subset(ssl_shards, 1 / 3, 0, tmp_path / "third")
    assert third["samples"] == 9 and third["per_class"] == {c: 1 for c in src["classes"]}
    assert third["source_samples"] == 27 and third["unlabelled_skipped"] == 0 and third["missing_classes"] == []
    assert third["dataset"] == str(tmp_path / "third") and third["reused"] is False
    tiny = make_subset(ssl_shards, 0.01, 0, tmp_path / "tiny")
    assert tiny["samples"] == 9 and min(tiny["per_class"].values()) >= 1
    assert make_subset(ssl_shards, 0.01, 0, tmp_path / "tiny0", min_per_class=2)["samples"] == 18
    full = make_subset(ssl_shards, 1.0, 0, tmp_path / "full")
    assert full["samples"] == 27 and full["per_class"] == {c: 3 for c in src["classes"]}
    # Every labelled sample, in source order, with the source's samples per shard (14 + 13):
    # members are copied byte for byte, so the shards equal the source's.
    out = _index(tmp_path / "full")
    assert [s["samples"] for s in out["shards"]] == [s["samples"] for s in src["shards"]]
    assert [s["sha256"] for s in out["shards"]] == [s["sha256"] for s in src["shards"]]
    keys = _chosen(tmp_path / "third")
    assert set(keys) == set(src["classes"]) and all(len(v) == 1 for v in keys.values())


def test_index_fields(ssl_shards, tmp_path):
    make_subset(ssl_shards, 2 / 3, 3, tmp_path / "sub")
    src, out = _index(ssl_shards), _index(tmp_path / "sub")
    assert out["format"] == "vidssl-shards" and out["version"] == 1
    assert out["classes"] == src["classes"]  # class ids never change
    for s in out["shards"]:
        assert set(s) == {"name", "samples", "bytes", "sha256", "frames", "seconds"}
        assert os.path.getsize(tmp_path / "sub" / s["name"]) == s["bytes"]
    t = out["totals"]
    assert t["samples"] == 18 == sum(s["samples"] for s in out["shards"])
    assert t["frames"] == sum(s["frames"] for s in out["shards"]) and t["shards"] == len(out["shards"])
    sub = out["subset"]
    assert sub["source"] == str(ssl_shards) and sub["fraction"] == pytest.approx(2 / 3) and sub["seed"] == 3
    assert sub["per_class"] == {c: 2 for c in src["classes"]}
    assert (tmp_path / "sub" / "errors.jsonl").read_text() == ""
    keys = _chosen(tmp_path / "sub")
    assert all(v == sorted(v) for v in keys.values())


def test_deterministic_and_seeded(ssl_shards, tmp_path):
    a = make_subset(ssl_shards, 2 / 3, 5, tmp_path / "a")
    b = make_subset(ssl_shards, 2 / 3, 5, tmp_path / "b")
    assert a["per_class"] == b["per_class"]
    assert _chosen(tmp_path / "a") == _chosen(tmp_path / "b")
    assert _shard_bytes(tmp_path / "a") == _shard_bytes(tmp_path / "b")
    make_subset(ssl_shards, 2 / 3, 6, tmp_path / "c")
    assert _chosen(tmp_path / "c") != _chosen(tmp_path / "a")
    # For one seed, a larger fraction keeps a superset of a smaller one.
    make_subset(ssl_shards, 1 / 3, 5, tmp_path / "small")
    for cls, keys in _chosen(tmp_path / "small").items():
        assert set(keys) <= set(_chosen(tmp_path / "a")[cls])


def test_output_verifies_and_loads_with_labels(ssl_shards, tmp_path):
    from vidssl.data import DataConfig, build_loader

    out = tmp_path / "sub"
    make_subset(ssl_shards, 1 / 3, 1, out)
    assert verify_dataset(str(out)) == []
    chosen = _chosen(out)
    classes = _index(out)["classes"]
    expected = {k for keys in chosen.values() for k in keys}
    labels = _source_labels(ssl_shards)
    loader = build_loader(DataConfig(dataset=str(out), mode="clip", frames=4, batch_size=3, workers=0,
                                     crop_size=32, drop_last=False), rank=0, world_size=1)
    got = {}
    for batch in loader:
        for key, label, valid in zip(batch["key"], batch["label"].tolist(), batch["valid"].tolist()):
            if valid:
                got[key] = label
    assert set(got) == expected and len(got) == 9
    assert all(got[k] == labels[k] for k in got)
    assert all(classes[got[k]] == cls for cls, keys in chosen.items() for k in keys)


@pytest.mark.parametrize("bad", [0, -1, 1.5, float("nan"), True, "0.5"])
def test_bad_fraction(ssl_shards, tmp_path, bad):
    with pytest.raises(UserError, match="label_fraction") as exc:
        make_subset(ssl_shards, bad, 0, tmp_path / "sub")
    assert "0 < x <= 1" in str(exc.value)
    assert not (tmp_path / "sub").exists()


def test_bad_arguments(ssl_shards, tmp_path):
    with pytest.raises(UserError, match="seed"):
        make_subset(ssl_shards, 0.5, -1, tmp_path / "sub")
    with pytest.raises(UserError, match="min_per_class"):
        make_subset(ssl_shards, 0.5, 0, tmp_path / "sub", min_per_class=-1)
    with pytest.raises(UserError, match="local dataset"):
        make_subset("https://example.com/shards/digits", 0.5, 0, tmp_path / "sub")
    with pytest.raises(UserError, match="no index.json"):
        make_subset(tmp_path / "nothing", 0.5, 0, tmp_path / "sub")
    with pytest.raises(UserError, match="source dataset itself"):
        make_subset(ssl_shards, 0.5, 0, ssl_shards)


def test_idempotent_and_atomic_replace(ssl_shards, tmp_path):
    out = tmp_path / "sub"
    first = make_subset(ssl_shards, 1 / 3, 0, out)
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = make_subset(ssl_shards, 1 / 3, 0, out)
    assert again["reused"] is True and {**again, "reused": False} == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp  # nothing rewritten
    other = make_subset(ssl_shards, 2 / 3, 0, out)  # something else there: replaced
    assert other["reused"] is False and other["samples"] == 18
    assert _index(out)["subset"]["fraction"] == pytest.approx(2 / 3) and verify_dataset(str(out)) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # no temporary folder left behind
    # A damaged subset (a shard cut short) is not reused but rebuilt.
    shard = out / _index(out)["shards"][0]["name"]
    shard.write_bytes(shard.read_bytes()[:1024])
    assert make_subset(ssl_shards, 2 / 3, 0, out)["reused"] is False and verify_dataset(str(out)) == []
    # A folder that is not a dataset is never deleted.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="neither empty nor a vidssl dataset"):
        make_subset(ssl_shards, 1 / 3, 0, mine)
    assert (mine / "notes.txt").read_text() == "keep me"


def test_unlabelled_and_missing_classes(digits_dir, tmp_path):
    """Unlabelled samples are skipped and counted; a class without samples is reported."""
    from vidssl.shard import ShardConfig, run_shard

    rows = (digits_dir / "labels.csv").read_text().splitlines()
    header, body = rows[0].split(","), [r.split(",") for r in rows[1:]]
    path_col, label_col = header.index("path"), header.index("label")
    labelled = [r for r in body if r[label_col] in ("left", "right")][:4]
    picked = labelled + [r for r in body if r not in labelled][-2:]  # the last two go in unlabelled
    lines = ["path,label"] + [f"{digits_dir / r[path_col]},{r[label_col] if i < 4 else ''}"
                              for i, r in enumerate(picked)]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    classes = sorted(MOTIONS) + ["jump"]
    src = tmp_path / "src"
    run_shard(ShardConfig(sources=[str(tmp_path / "list.csv")], output=str(src), gop=8, shard_samples=4,
                          classes=classes, progress="none", workers=1))
    res = make_subset(src, 0.5, 0, tmp_path / "sub")
    assert res["source_samples"] == 6 and res["unlabelled_skipped"] == 2
    counts = {c: sum(1 for r in picked[:4] if r[label_col] == c) for c in classes}
    assert res["per_class"] == {c: (max(1, (n + 1) // 2) if n else 0) for c, n in counts.items()}
    assert "jump" in res["missing_classes"] and "left" not in res["missing_classes"]
    assert res["missing_classes"] == [c for c in classes if counts[c] == 0]
    out = _index(tmp_path / "sub")
    assert out["classes"] == classes and verify_dataset(str(tmp_path / "sub")) == []
    assert out["subset"]["unlabelled_skipped"] == 2
    all_keys = {k for keys in _chosen(tmp_path / "sub").values() for k in keys}
    labels = _source_labels(tmp_path / "sub")
    assert set(labels) == all_keys and min(labels.values()) >= 0


def test_failure_leaves_previous_subset(ssl_shards, tmp_path, monkeypatch):
    """A crash while writing leaves the old subset under the final name and no temporary folder."""
    from vidssl.shard.writer import ShardWriter

    out = tmp_path / "sub"
    make_subset(ssl_shards, 1 / 3, 0, out)
    before = _shard_bytes(out)
    real_add, calls = ShardWriter.add, []

    def failing_add(self, *args, **kw):
        calls.append(1)
        if len(calls) > 3:
            raise OSError("disk full")
        return real_add(self, *args, **kw)

    monkeypatch.setattr(ShardWriter, "add", failing_add)
    with pytest.raises(OSError, match="disk full"):
        make_subset(ssl_shards, 2 / 3, 0, out)
    assert _shard_bytes(out) == before and _index(out)["subset"]["fraction"] == pytest.approx(1 / 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]
