"""The shipped training configs: every pretraining YAML loads and round-trips, the cluster recipes
give a consistent DeepSpeed config for 4 nodes x 8 GPUs, and DeepSpeed JSONs that contradict the
typed config are refused with a message naming both sides."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vidssl import cli
from vidssl.config import ConfigError, parse_config_args
from vidssl.train.config import PretrainConfig
from vidssl.train.engine import build_ds_config

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "configs" / "pretrain"
DEEPSPEED = REPO / "configs" / "deepspeed"

ALL_YAML = sorted(PRETRAIN.glob("*.yaml"))
#: The cluster recipes (and their shared base): 4 nodes x 8 GPUs, bf16, ZeRO-2.
CLUSTER = sorted(PRETRAIN.glob("*k400*.yaml"))
WORLD = 32
#: What the recipes' headers assume: K400 train clips, epochs, warmup fraction.
K400_CLIPS, EPOCHS, WARMUP = 240_000, 200, 0.05


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    # Launches run from the repository root: deepspeed.config paths are relative to it.
    monkeypatch.chdir(REPO)


def _load(path: Path, *overrides: str) -> PretrainConfig:
    return parse_config_args(PretrainConfig, [str(path), *overrides])


def _ds(cfg: PretrainConfig, device: str = "cuda", world: int = WORLD) -> dict:
    return build_ds_config(cfg.train, cfg.deepspeed, micro_batch=cfg.data.batch_size, world_size=world,
                           device=device)


def test_the_recipes_exist():
    names = {p.name for p in ALL_YAML}
    assert {"demo_cpu.yaml", "k400_base.yaml", "r2plus1d_k400.yaml", "vit_s_k400.yaml", "vit_b_k400.yaml"} <= names
    assert {"zero2_bf16.json", "zero3_bf16.json", "README.md"} <= {p.name for p in DEEPSPEED.iterdir()}


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: p.name)
def test_print_config_exits_0_and_round_trips(path, capsys, tmp_path):
    assert cli.main(["pretrain", "--print-config", str(path.relative_to(REPO))]) == 0
    printed = capsys.readouterr().out
    assert printed.strip()
    again = tmp_path / "printed.yaml"
    again.write_text(printed, encoding="utf-8")
    want = _load(path)
    got = _load(again)
    assert got == want
    assert got.to_dict() == want.to_dict() == yaml.safe_load(printed)


@pytest.mark.parametrize("path", CLUSTER, ids=lambda p: p.name)
def test_cluster_recipe_deepspeed_config(path):
    cfg = _load(path)
    ds = _ds(cfg)
    b, accum = cfg.data.batch_size, cfg.train.grad_accum
    assert ds["train_batch_size"] == b * accum * WORLD
    assert ds["train_micro_batch_size_per_gpu"] == b
    assert ds["gradient_accumulation_steps"] == accum
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    zero = ds["zero_optimization"]
    assert zero["stage"] == 2
    assert zero["overlap_comm"] is True
    # the tuning keys of configs/deepspeed/zero2_bf16.json arrived
    assert cfg.deepspeed.config == "configs/deepspeed/zero2_bf16.json"
    tuning = json.loads((REPO / cfg.deepspeed.config).read_text())
    for k, v in tuning["zero_optimization"].items():
        assert zero[k] == v, k
    assert ds["communication_data_type"] == tuning["communication_data_type"]
    assert ds["optimizer"]["params"]["lr"] == cfg.train.lr
    assert ds["gradient_clipping"] == cfg.train.grad_clip > 0
    # other world sizes derive train_batch_size from the real world size
    assert _ds(cfg, world=8)["train_batch_size"] == b * accum * 8


@pytest.mark.parametrize("path", CLUSTER, ids=lambda p: p.name)
def test_cluster_recipe_arithmetic(path):
    """The numbers the headers derive: 200 epochs of K400 at the global batch, 5% warmup, 224 crops of
    16 frames at stride 4, bf16 + ZeRO-2, a GPU loader, checkpoints that are kept."""
    cfg = _load(path)
    d, t = cfg.data, cfg.train
    global_batch = d.batch_size * t.grad_accum * WORLD
    steps_per_epoch = K400_CLIPS // global_batch
    assert t.max_steps == EPOCHS * steps_per_epoch
    assert t.warmup_steps == round(WARMUP * t.max_steps)
    assert t.schedule == "cosine" and t.weight_decay == 0.05 and t.grad_clip > 0
    assert 0 < t.min_lr < t.lr
    assert 500_000 <= t.checkpoint_every * global_batch <= 2_500_000  # ~1-2M clips between checkpoints
    assert t.keep_checkpoints == 3 and t.resume == "auto" and t.device == "cuda"
    assert (d.frames, d.stride, d.crop_size, d.mode) == (16, 4, 224, "ssl")
    assert d.dataset == ["shards/k400-train"]
    assert 8 <= d.workers <= 10 and d.decode_threads >= 1 and d.pin_memory
    assert (cfg.deepspeed.zero_stage, cfg.deepspeed.precision) == (2, "bf16")


@pytest.mark.parametrize("name", ["vit_s_k400.yaml", "vit_b_k400.yaml", "r2plus1d_k400.yaml"])
def test_model_recipes_fit_their_backbone(name):
    from vidssl.models.registry import backbone_options

    cfg = _load(PRETRAIN / name)
    opts = backbone_options(cfg.model.backbone)
    assert set(cfg.model.backbone_kwargs) <= set(opts), "unknown backbone option"
    assert cfg.run.dir != _load(PRETRAIN / "k400_base.yaml").run.dir  # each recipe its own run folder
    fut = cfg.objectives.future
    assert fut.enabled and cfg.objectives.contrast.enabled
    if cfg.model.backbone.startswith("vit"):
        kw = {**opts, **cfg.model.backbone_kwargs}
        assert 0 < kw["drop_path"] < 1
        assert (kw["num_frames"], kw["img_size"]) == (cfg.data.frames, cfg.data.crop_size)
        # tubelets of 2 x 16 x 16: whole time steps for the context and future windows
        assert cfg.data.frames % kw["tubelet"] == 0 and cfg.data.future % kw["tubelet"] == 0
        assert cfg.data.crop_size % kw["patch"] == 0
    else:
        # time is downsampled by 8: the future window is 2 whole steps
        assert cfg.data.future % 8 == 0


def test_deepspeed_jsons_hold_tuning_keys_only():
    generated_only = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                      "gradient_clipping", "optimizer", "scheduler"}
    for path in sorted(DEEPSPEED.glob("*.json")):
        data = json.loads(path.read_text())
        assert isinstance(data, dict), path.name
        assert not generated_only & set(data), path.name
        assert "overlap_comm" not in data.get("zero_optimization", {}), path.name  # deepspeed.overlap_comm sets it


def test_zero3_json_merges_with_zero_stage_3():
    cfg = _load(PRETRAIN / "vit_b_k400.yaml", "deepspeed.zero_stage=3",
                "deepspeed.config=configs/deepspeed/zero3_bf16.json")
    zero = _ds(cfg)["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_prefetch_bucket_size"] > 0
    # ...and the ZeRO-2 file refuses to run at stage 3
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage=2.*deepspeed\.zero_stage"):
        _ds(_load(PRETRAIN / "vit_b_k400.yaml", "deepspeed.zero_stage=3"))


def test_deepspeed_jsons_pass_deepspeed_validation(monkeypatch):
    """DeepSpeed refuses unknown zero_optimization/bf16 keys: check the merged configs with its own models
    (in a subprocess, so that importing deepspeed does not pick an accelerator for this test session)."""
    pytest.importorskip("deepspeed")
    merged = {
        "zero2": _ds(_load(PRETRAIN / "vit_b_k400.yaml")),
        "zero3": _ds(_load(PRETRAIN / "vit_b_k400.yaml", "deepspeed.zero_stage=3",
                           "deepspeed.config=configs/deepspeed/zero3_bf16.json")),
    }
    code = (
        "import json, sys\n"
        "from deepspeed.runtime.zero.config import DeepSpeedZeroConfig\n"
        "from deepspeed.runtime.precision_config import DeepSpeedBF16Config\n"
        "from deepspeed.runtime.config import get_communication_data_type\n"
        "for name, c in json.load(sys.stdin).items():\n"
        "    z = DeepSpeedZeroConfig(**c['zero_optimization'])\n"
        "    DeepSpeedBF16Config(**c['bf16'])\n"
        "    get_communication_data_type(c)\n"
        "    print(name, z.stage)\n"
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], input=json.dumps(merged), capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "zero2 2" in out.stdout and "zero3 3" in out.stdout


@pytest.mark.parametrize("user, names", [
    ({"zero_optimization": {"stage": 3}}, ["zero_optimization.stage=3", "deepspeed.zero_stage"]),
    ({"train_batch_size": 4096}, ["train_batch_size=4096", "data.batch_size"]),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}, ["optimizer.params.lr=0.1", "train.lr"]),
    ({"bf16": {"enabled": False}}, ["bf16.enabled=False", "deepspeed.precision"]),
    ({"gradient_clipping": 5.0}, ["gradient_clipping=5.0", "train.grad_clip"]),
    ({"zero_optimization": {"overlap_comm": False}}, ["zero_optimization.overlap_comm=False",
                                                      "deepspeed.overlap_comm"]),
], ids=["stage", "train_batch_size", "lr", "bf16", "grad_clip", "overlap_comm"])
def test_contradicting_json_is_an_error_naming_both(tmp_path, user, names):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(user))
    cfg = _load(PRETRAIN / "vit_b_k400.yaml", f"deepspeed.config={path}")
    with pytest.raises(ConfigError) as exc:
        _ds(cfg)
    msg = str(exc.value)
    assert str(path) in msg
    for n in names:
        assert n in msg, (n, msg)


def test_contradiction_in_a_combined_json(tmp_path):
    # the brief's example: a JSON that sets both the stage and the batch; whichever comes first is reported
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000},
                                "train_batch_size": 64}))
    with pytest.raises(ConfigError, match=r"zero_optimization\.stage=3 contradicts 2 from deepspeed\.zero_stage"):
        _ds(_load(PRETRAIN / "vit_b_k400.yaml", f"deepspeed.config={path}"))


def test_agreeing_and_auto_values_merge(tmp_path):
    path = tmp_path / "ok.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 32,
                                "zero_optimization": {"stage": 2, "reduce_bucket_size": 1234},
                                "optimizer": {"type": "AdamW", "params": {"lr": 6e-4}},
                                "bf16": {"enabled": True}}))
    cfg = _load(PRETRAIN / "vit_b_k400.yaml", f"deepspeed.config={path}")
    ds = _ds(cfg)
    assert ds["train_batch_size"] == 32 * WORLD
    assert ds["zero_optimization"]["reduce_bucket_size"] == 1234


def test_scheduler_in_json_is_refused(tmp_path):
    path = tmp_path / "sched.json"
    path.write_text(json.dumps({"scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ConfigError, match="scheduler"):
        _ds(_load(PRETRAIN / "vit_b_k400.yaml", f"deepspeed.config={path}"))


def test_fp16_on_cpu_is_an_error():
    cfg = _load(PRETRAIN / "vit_b_k400.yaml", "deepspeed.precision=fp16")
    with pytest.raises(ConfigError, match=r"deepspeed\.precision.*fp16.*CPU"):
        _ds(cfg, device="cpu")
    # on a GPU, fp16 with the bf16 tuning file is a contradiction naming both
    with pytest.raises(ConfigError, match=r"bf16\.enabled=True contradicts False from deepspeed\.precision"):
        _ds(cfg, device="cuda")


def test_missing_deepspeed_json_is_an_error():
    cfg = _load(PRETRAIN / "vit_b_k400.yaml", "deepspeed.config=configs/deepspeed/nope.json")
    with pytest.raises(ConfigError, match="does not exist"):
        _ds(cfg)
