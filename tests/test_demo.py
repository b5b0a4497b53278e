"""`vidssl demo`: the README's first command, end to end on tiny settings."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from vidssl import cli
from vidssl.config import load_config
from vidssl.demo import DemoConfig

TINY = [
    "footage.videos=18", "footage.seconds=[1.5,2.0]", "footage.workers=1",
    "shard.workers=1", "shard.shard_samples=8",
    "data.batch_size=4", "data.workers=0", "data.crop_size=32", "data.frames=4", "data.future=2",
    "data.gap_min=2", "data.gap_max=6",
    "model.backbone_kwargs={width: 8}",
    "peek_batches=1", "ssl_steps=3",
]


def test_demo_runs_every_stage(tmp_path, capsys):
    work, data = tmp_path / "run", tmp_path / "shards" / "demo"
    code = cli.main(["demo", f"workdir={work}", f"data.dataset={data}", *TINY])
    assert code == 0
    out = capsys.readouterr().out
    assert "demo finished" in out

    # The resolved config is saved and loads back to the same object.
    saved = load_config(DemoConfig, work / "config.yaml")
    assert saved.footage.videos == 18 and saved.ssl_steps == 3
    assert saved.data.dataset == [str(data)]

    # Shards carry the motion labels from the footage's labels.csv.
    index = json.loads((data / "index.json").read_text())
    assert index["totals"]["samples"] == 18 and index["totals"]["rejected"] == 0
    from vidssl.footage.digits import MOTIONS
    assert set(index["classes"]) == set(MOTIONS)

    rows = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["loss"]) and "future/loss" in r and "contrast/loss" in r


def test_demo_rerun_reuses_the_dataset(tmp_path):
    args = [f"workdir={tmp_path / 'run'}", f"data.dataset={tmp_path / 'ds'}", *TINY, "ssl_steps=0"]
    assert cli.main(["demo", *args]) == 0
    first = {p.name: p.read_bytes() for p in (tmp_path / "ds").glob("*.tar")}
    assert cli.main(["demo", *args]) == 0  # same footage, same settings: identical shards
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds").glob("*.tar")} == first


def test_print_config_round_trips(capsys):
    assert cli.main(["demo", "--print-config", "ssl_steps=7", "objectives.contrast.enabled=false"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    cfg = DemoConfig.from_dict(data)
    assert cfg.ssl_steps == 7 and cfg.objectives.contrast.enabled is False
    assert cfg.data.mode == "ssl" and cfg.footage.videos == DemoConfig().footage.videos


@pytest.mark.parametrize("override,needle", [
    ("shard.output=/tmp/x", "shard.sources/output: set by the demo"),
    ("data.dataset=http://host/ds", "data.dataset"),
    ("data.mode=clip", "data.mode: got 'clip'"),
    ("footage.videos=0", "footage.videos: got 0"),
    ("model.backbone=nope", "model.backbone: got 'nope'"),
])
def test_bad_demo_settings_exit_2_with_the_key(override, needle, capsys):
    assert cli.main(["demo", override]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
