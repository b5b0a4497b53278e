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
    "pretrain.data.batch_size=4", "pretrain.data.workers=0", "pretrain.data.crop_size=32", "pretrain.data.frames=4",
    "pretrain.data.future=2", "pretrain.data.gap_min=2", "pretrain.data.gap_max=6",
    "pretrain.model.backbone_kwargs={width: 8}", "pretrain.run.progress=none", "pretrain.train.plot=false",
    "peek_batches=1", "pretrain.train.max_steps=3", "pretrain.train.warmup_steps=1",
]


def _paths(tmp_path):
    work, data = tmp_path / "run", tmp_path / "shards" / "demo"
    return work, data, [f"workdir={work}", f"pretrain.data.dataset={data}", f"pretrain.run.dir={work / 'pretrain'}"]


def test_demo_runs_every_stage_and_pretrains_through_vidssl_pretrain(tmp_path, capsys):
    work, data, paths = _paths(tmp_path)
    code = cli.main(["demo", *paths, *TINY])
    assert code == 0
    out = capsys.readouterr().out
    assert "demo finished" in out and "backbone" in out

    # The resolved config is saved and loads back to the same object.
    saved = load_config(DemoConfig, work / "config.yaml")
    assert saved.footage.videos == 18 and saved.pretrain.train.max_steps == 3
    assert saved.pretrain.data.dataset == [str(data)]

    # Shards carry the motion labels from the footage's labels.csv.
    index = json.loads((data / "index.json").read_text())
    assert index["totals"]["samples"] == 18 and index["totals"]["rejected"] == 0
    from vidssl.footage.digits import MOTIONS
    assert set(index["classes"]) == set(MOTIONS)

    # Stage 4 is vidssl pretrain: its run folder, DeepSpeed checkpoints and the exported backbone.
    pre = work / "pretrain"
    rows = [json.loads(line) for line in (pre / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["loss"]) and "future/loss" in r and "contrast/loss" in r and "clips_per_s" in r
    assert (pre / "checkpoints" / "step_00000003" / "vidssl.json").is_file()
    assert (pre / "config.yaml").is_file() and list((pre / "tb").iterdir())
    assert list((pre / "export").glob("backbone-step_00000003.pt"))

    # A rerun finds the finished pretraining and does not redo it.
    assert cli.main(["demo", *paths, *TINY]) == 0
    assert len((pre / "metrics.jsonl").read_text().splitlines()) == 3


def test_demo_config_matches_configs_pretrain_demo_cpu_yaml():
    from vidssl.config import load_config as load
    from vidssl.train.config import PretrainConfig

    from pathlib import Path
    yaml_cfg = load(PretrainConfig, Path(__file__).resolve().parents[1] / "configs/pretrain/demo_cpu.yaml").to_dict()
    demo_cfg = DemoConfig().pretrain.to_dict()
    assert yaml_cfg == demo_cfg


def test_demo_rerun_reuses_the_dataset(tmp_path):
    args = [*_paths(tmp_path)[2], *TINY, "pretrain_stage=false"]
    assert cli.main(["demo", *args]) == 0
    ds = tmp_path / "shards" / "demo"
    first = {p.name: p.read_bytes() for p in ds.glob("*.tar")}
    assert first
    assert cli.main(["demo", *args]) == 0  # same footage, same settings: identical shards
    assert {p.name: p.read_bytes() for p in ds.glob("*.tar")} == first


def test_print_config_round_trips(capsys):
    assert cli.main(["demo", "--print-config", "pretrain.train.max_steps=7",
                     "pretrain.objectives.contrast.enabled=false"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    cfg = DemoConfig.from_dict(data)
    assert cfg.pretrain.train.max_steps == 7 and cfg.pretrain.objectives.contrast.enabled is False
    assert cfg.pretrain.data.mode == "ssl" and cfg.footage.videos == DemoConfig().footage.videos


@pytest.mark.parametrize("override,needle", [
    ("shard.output=/tmp/x", "shard.sources/output: set by the demo"),
    ("pretrain.data.dataset=http://host/ds", "pretrain.data.dataset"),
    ("pretrain.data.mode=clip", "pretrain.data.mode: got 'clip'"),
    ("footage.videos=0", "footage.videos: got 0"),
    ("pretrain.model.backbone=nope", "pretrain.model.backbone: got 'nope'"),
])
def test_bad_demo_settings_exit_2_with_the_key(override, needle, capsys):
    assert cli.main(["demo", override]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
