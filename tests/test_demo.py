"""`vidssl demo`: the README's first command, end to end on tiny settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from vidssl import cli
from vidssl.config import load_config
from vidssl.demo import DemoConfig, arms, percent_name, read_state, scale_train, stage_names
from vidssl.train.config import FinetuneConfig, PretrainConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "footage.videos=18", "val_videos=9", "footage.seconds=[1.5,2.0]", "footage.workers=1",
    "shard.workers=1", "shard.shard_samples=8",
    "pretrain.data.batch_size=4", "pretrain.data.workers=0", "pretrain.data.crop_size=32", "pretrain.data.frames=4",
    "pretrain.data.future=2", "pretrain.data.gap_min=2", "pretrain.data.gap_max=6",
    "pretrain.model.backbone_kwargs={width: 8}", "pretrain.run.progress=none", "pretrain.train.plot=false",
    "peek_batches=1", "pretrain.train.max_steps=3", "pretrain.train.warmup_steps=1",
] + [f"{s}.{kv}" for s in ("linear", "full") for kv in (
    "data.batch_size=4", "data.workers=0", "data.crop_size=32", "data.frames=4", "eval.views=1", "eval.workers=0",
    "eval.eval_resize=32", "train.max_steps=2", "train.warmup_steps=1", "run.progress=none", "train.plot=false")]

ARM_NAMES = ["linear-ssl-100", "linear-random-100", "full-ssl-100", "full-scratch-100",
             "linear-ssl-10", "linear-random-10", "full-ssl-10", "full-scratch-10"]


@pytest.fixture(scope="module")
def failed_then_resumed(tmp_path_factory):
    """One tiny demo whose 3rd arm fails, then the same command again (unpatched): both results."""
    import vidssl.train.cli as train_cli

    out = tmp_path_factory.mktemp("demo") / "run"
    args = ["demo", f"out={out}", *TINY]
    real = train_cli.run_finetune
    calls: list[str] = []

    def failing(cfg, **kw):
        calls.append(Path(cfg.run.dir).name)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real(cfg, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_cli, "run_finetune", failing)
        first_code = cli.main(args)
    state_after_failure = read_state(out)
    first_calls = list(calls)
    calls.clear()

    def counting(cfg, **kw):
        calls.append(Path(cfg.run.dir).name)
        return real(cfg, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_cli, "run_finetune", counting)
        second_code = cli.main(args)
    return {"out": out, "args": args, "first_code": first_code, "first_calls": first_calls,
            "state_after_failure": state_after_failure, "second_code": second_code, "second_calls": list(calls)}


@pytest.mark.slow  # one tiny demo shared by three tests: about 2 minutes on 2 busy cores
def test_a_failing_stage_names_itself_and_a_rerun_resumes_there(failed_then_resumed, capsys):
    r = failed_then_resumed
    assert r["first_code"] == 1
    assert r["first_calls"] == ARM_NAMES[:3]
    st = r["state_after_failure"]
    done = [n for n, rec in st["stages"].items() if rec.get("done")]
    assert done == ["footage", "shard", "loader", "pretrain", "arms/linear-ssl-100", "arms/linear-random-100"]
    assert st["last_failure"]["stage"] == "arms/full-ssl-100" and "injected failure" in st["last_failure"]["error"]
    # The rerun runs only the arms that were not finished, then the report.
    assert r["second_code"] == 0
    assert r["second_calls"] == ARM_NAMES[2:]
    final = read_state(r["out"])
    assert "last_failure" not in final
    assert list(final["stages"]) == ["footage", "shard", "loader", "pretrain", *(f"arms/{a}" for a in ARM_NAMES[:2]),
                                     *(f"arms/{a}" for a in ARM_NAMES[2:]), "report"]
    # The pretraining ran once: 3 steps, not redone by the rerun.
    rows = [json.loads(line) for line in (r["out"] / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2, 3]


def test_the_failure_message_names_the_stage(tmp_path, monkeypatch, capsys):
    import vidssl.train.cli as train_cli

    def boom(cfg, **kw):
        raise RuntimeError("no disk")

    monkeypatch.setattr(train_cli, "run_pretrain", boom)
    out = tmp_path / "run"
    assert cli.main(["demo", f"out={out}", *TINY, "until=pretrain"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"vidssl demo: stage pretrain failed: RuntimeError: no disk; the stages before it are kept in "
                   f"{out}; rerun the same command to resume")
    assert [n for n in read_state(out)["stages"]] == ["footage", "shard", "loader"]


@pytest.mark.slow
def test_full_tiny_demo_writes_the_report(failed_then_resumed, capsys):
    out = failed_then_resumed["out"]
    rep = json.loads((out / "report.json").read_text())
    assert [a["name"] for a in rep["arms"]] == ARM_NAMES
    for a in rep["arms"]:
        ev = json.loads((out / "arms" / a["name"] / "eval.json").read_text())
        assert ev["samples"] == 9 and a["top1"] == ev["top1"] and 0 <= a["top1"] <= 1
        assert a["steps"] == 2 and a["seconds"] > 0
    by = {a["name"]: a for a in rep["arms"]}
    assert by["linear-ssl-10"]["train_samples"] == 9 and by["linear-ssl-100"]["train_samples"] == 18  # >= 1/class
    assert by["linear-ssl-10"]["settings"]["pretrained"] == str(out / "pretrain")
    assert by["full-scratch-10"]["settings"]["pretrained"] == "none"
    # Targets: computed from the arms, each with its measured values and whether it was met.
    targets = {t["name"]: t for t in rep["targets"]}
    assert set(targets) == {"ssl_linear_vs_random", "ssl_finetune_vs_scratch", "ssl_linear_absolute"}
    t = targets["ssl_linear_vs_random"]
    assert t["met"] == (by["linear-ssl-100"]["top1"] >= by["linear-random-100"]["top1"] + 0.25 - 1e-9)
    t = targets["ssl_finetune_vs_scratch"]
    assert t["met"] == (by["full-ssl-10"]["top1"] >= by["full-scratch-10"]["top1"] + 0.10 - 1e-9)
    assert targets["ssl_linear_absolute"]["met"] == (by["linear-ssl-100"]["top1"] >= 0.60 - 1e-9)
    assert rep["pretrain"]["steps"] == 3 and math.isfinite(rep["pretrain"]["last"]["loss"])
    assert set(rep["stages"]) == set(stage_names(DemoConfig.from_dict({}))) - {"report"}
    assert rep["total_seconds"] > 0 and rep["settings"]["footage"]["videos"] == 18
    for name in ("accuracy", "pretrain_curves", "confusion"):
        assert (out / "plots" / f"{name}.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "## Targets" in md and "SSL >= random-init + 25 points" in md and "plots/accuracy.png" in md
    assert all(a in md for a in ARM_NAMES)
    assert ("**met**" in md) or ("**missed**" in md)
    # The resolved config loads back, with the paths the demo set.
    saved = load_config(DemoConfig, out / "config.yaml")
    assert saved.pretrain.data.dataset == [str(out / "shards" / "train")]
    assert saved.pretrain.run.dir == str(out / "pretrain")
    # The held-out shards are another set of videos (another seed), same classes.
    tr = json.loads((out / "shards" / "train" / "index.json").read_text())
    va = json.loads((out / "shards" / "val" / "index.json").read_text())
    from vidssl.footage.digits import MOTIONS
    assert tr["classes"] == va["classes"] == list(MOTIONS)
    assert tr["totals"]["samples"] == 18 and va["totals"]["samples"] == 9
    assert (out / "pretrain" / "export").is_dir() and list((out / "pretrain" / "export").glob("backbone-*.pt"))


@pytest.mark.slow
def test_a_finished_demo_reruns_nothing_and_prints_the_table(failed_then_resumed, monkeypatch, capsys):
    import vidssl.train.cli as train_cli

    def never(cfg, **kw):
        raise AssertionError("nothing should train")

    monkeypatch.setattr(train_cli, "run_finetune", never)
    monkeypatch.setattr(train_cli, "run_pretrain", never)
    assert cli.main(failed_then_resumed["args"]) == 0
    out = capsys.readouterr().out
    assert "stages run: none" in out and "linear-ssl-100" in out and "report.md" in out
    assert ("MET" in out) or ("MISSED" in out)


def test_changed_settings_of_a_finished_stage_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["demo", f"out={out}", *TINY, "until=footage"]
    assert cli.main(base) == 0
    # A setting of a stage not run yet may change ...
    assert cli.main([*base, "pretrain.train.max_steps=5", "budget_minutes=3"]) == 0
    # ... one the finished footage depends on may not.
    assert cli.main([*base, "val_seed=7"]) == 2
    err = capsys.readouterr().err
    assert "finished stage 'footage'" in err and "val_seed: 1000 -> 7" in err and "another out=DIR" in err


def test_until_loader_stops_there_and_a_rerun_skips_the_finished_stages(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["demo", f"out={out}", *TINY, "until=loader"]
    assert cli.main(args) == 0
    st = read_state(out)
    assert list(st["stages"]) == ["footage", "shard", "loader"]
    assert all(rec["seconds"] >= 0 and rec["summary"]["text"] for rec in st["stages"].values())
    ds = out / "shards" / "train"
    first = {p.name: p.read_bytes() for p in ds.glob("*.tar")}
    assert first and not (out / "pretrain").exists()
    capsys.readouterr()
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert "stage 1/13 footage: done earlier" in err and "stage 3/13 loader: done earlier" in err
    assert "started" not in err
    assert {p.name: p.read_bytes() for p in ds.glob("*.tar")} == first


def test_budget_minutes_scales_the_steps():
    t = TrainConfig(max_steps=300, warmup_steps=20, checkpoint_every=100)
    assert scale_train(t, 15) == t
    half = scale_train(t, 7.5)
    assert (half.max_steps, half.warmup_steps, half.checkpoint_every) == (150, 10, 50)
    double = scale_train(t, 30)
    assert (double.max_steps, double.warmup_steps, double.checkpoint_every) == (600, 40, 200)
    tiny = scale_train(t, 0.1)  # at least 10 steps, warmup below them
    assert tiny.max_steps == 10 and tiny.warmup_steps < 10 and 1 <= tiny.checkpoint_every <= 10
    assert scale_train(TrainConfig(max_steps=3, warmup_steps=1), 1).max_steps == 3  # never more than configured
    assert scale_train(TrainConfig(max_steps=100, checkpoint_every=0), 5).checkpoint_every == 0
    # The demo applies it to pretraining and every arm.
    from vidssl.demo import arm_config, pretrain_config
    cfg = DemoConfig.from_dict({"budget_minutes": 5})
    assert pretrain_config(cfg).train.max_steps == round(cfg.pretrain.train.max_steps / 3)
    assert {arm_config(cfg, a).train.max_steps for a in arms(cfg)} == {100}


def test_arms_are_named_by_percent_and_set_by_the_demo(tmp_path):
    cfg = DemoConfig.from_dict({"out": str(tmp_path), "label_fractions": [0.025, 1.0]})
    assert [a.name for a in arms(cfg)] == ["linear-ssl-100", "linear-random-100", "full-ssl-100", "full-scratch-100",
                                           "linear-ssl-2.5", "linear-random-2.5", "full-ssl-2.5", "full-scratch-2.5"]
    assert percent_name(0.1) == "10" and percent_name(1.0) == "100"
    from vidssl.demo import arm_config
    a = arm_config(cfg, arms(cfg)[-1])
    assert a.run.dir == str(tmp_path / "arms" / "full-scratch-2.5") and a.finetune.label_fraction == 0.025
    assert a.data.dataset == [str(tmp_path / "shards" / "train")] and a.eval.dataset == [str(tmp_path / "shards" / "val")]
    assert a.finetune.mode == "full" and a.finetune.pretrained == "none"
    assert arm_config(cfg, arms(cfg)[0]).finetune.pretrained == str(tmp_path / "pretrain")


def test_demo_config_matches_configs_pretrain_demo_cpu_yaml():
    yaml_cfg = load_config(PretrainConfig, ROOT / "configs/pretrain/demo_cpu.yaml").to_dict()
    assert yaml_cfg == DemoConfig().pretrain.to_dict()


@pytest.mark.parametrize("section,path", [("linear", "configs/finetune/demo_linear.yaml"),
                                          ("full", "configs/finetune/demo_full.yaml")])
def test_demo_arm_sections_match_configs_finetune(section, path):
    yaml_cfg = load_config(FinetuneConfig, ROOT / path).to_dict()
    assert yaml_cfg == getattr(DemoConfig(), section).to_dict()


def test_print_config_round_trips(capsys):
    assert cli.main(["demo", "--print-config", "pretrain.train.max_steps=7", "budget_minutes=5", "out=/tmp/x",
                     "pretrain.objectives.future.enabled=true"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    cfg = DemoConfig.from_dict(data)
    assert cfg.pretrain.train.max_steps == 7 and cfg.pretrain.objectives.future.enabled is True
    assert cfg.pretrain.data.mode == "ssl" and cfg.footage.videos == DemoConfig().footage.videos == 600
    assert cfg.out == "/tmp/x" and cfg.budget_minutes == 5 and cfg.label_fractions == [0.1, 1.0]
    assert cfg.val_videos == 270 and cfg.val_seed == 1000 and cfg.until == "report"


@pytest.mark.parametrize("override,needle", [
    ("shard.output=/tmp/x", "shard.sources/output: set by the demo"),
    ("pretrain.data.mode=clip", "pretrain.data.mode: got 'clip'"),
    ("footage.videos=0", "footage.videos: got 0"),
    ("pretrain.model.backbone=nope", "pretrain.model.backbone: got 'nope'"),
    ("label_fractions=[0.1,1.5]", "label_fractions: got 1.5"),
    ("label_fractions=[0,1]", "label_fractions: got 0"),
    ("label_fractions=[]", "label_fractions: got an empty list"),
    ("label_fractions=[0.1,0.1]", "label_fractions: got [0.1, 0.1]"),
    ("budget_minutes=0", "budget_minutes: got 0"),
    ("budget_minutes=-3", "budget_minutes: got -3"),
    ("until=pretrain_stage", "until: got 'pretrain_stage'"),
    ("full.finetune.mode=linear", "full.finetune.mode: got 'linear'"),
    ("workdir=runs/x", "workdir: unknown key"),
])
def test_bad_demo_settings_exit_2_with_the_key(override, needle, capsys):
    assert cli.main(["demo", override]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err


def test_targets_compare_float32_accuracies_at_the_exact_threshold():
    from vidssl.demo_report import compute_targets

    import numpy as np
    f32 = lambda hits, n: float(np.float32(hits / n))  # noqa: E731 - evaluation reports float32 accuracies
    rows = [{"name": "linear-ssl-100", "top1": f32(195, 270)}, {"name": "linear-random-100", "top1": f32(51, 270)},
            {"name": "full-ssl-10", "top1": f32(226, 270)}, {"name": "full-scratch-10", "top1": f32(199, 270)}]
    t = {x["name"]: x for x in compute_targets(rows, [0.1, 1.0])}
    assert t["ssl_finetune_vs_scratch"]["met"] is True  # 27 of 270 videos more: exactly 10 points
    assert t["ssl_linear_vs_random"]["met"] is True and t["ssl_linear_absolute"]["met"] is True
    rows[2]["top1"] = f32(225, 270)  # one video fewer: 9.6 points
    assert {x["name"]: x for x in compute_targets(rows, [0.1, 1.0])}["ssl_finetune_vs_scratch"]["met"] is False
    assert compute_targets(rows[:1], [0.1, 1.0])[1]["met"] is None  # arms missing: not judged
