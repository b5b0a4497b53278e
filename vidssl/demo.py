"""``vidssl demo``: the whole pipeline that exists, on data it makes itself.

Stages, each with its own config section (``vidssl demo --print-config`` shows them all):

1. ``footage``: Moving Digits videos + ``labels.csv`` into ``{workdir}/footage``;
2. ``shard``: the footage (through ``labels.csv``, so samples carry the motion labels) into
   WebDataset shards at ``data.dataset``, then ``verify`` checks every shard against the index;
3. ``data``: the streaming loader reads back ``peek_batches`` SSL batches;
4. ``model`` + ``objectives``: ``ssl_steps`` self-supervised training steps (future prediction +
   temporal contrast) with plain PyTorch on CPU, logged to ``{workdir}/metrics.jsonl``. This checks
   that the objectives learn on real batches; it is not the DeepSpeed pretraining command.

Every stage's output lands under ``workdir`` or ``data.dataset``; the resolved config is saved as
``{workdir}/config.yaml``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

from vidssl.config import Config, ConfigError, dataclass, field, parse_config_args, spec
from vidssl.data.config import DataConfig
from vidssl.footage.digits import DigitsConfig
from vidssl.models.config import ContrastConfig, FutureConfig, ModelConfig, ObjectivesConfig
from vidssl.shard.config import ShardConfig

log = logging.getLogger("vidssl.demo")


def _footage_defaults() -> DigitsConfig:
    # Small enough for a first run on 2 cores, varied enough to exercise the shard and loader paths.
    return DigitsConfig(videos=200, seed=0, sizes=["64x64", "80x64", "64x48"], fps=[12, 20, 25],
                        seconds=(2.0, 3.0))


def _shard_defaults() -> ShardConfig:
    return ShardConfig(short_side=64, gop=8, shard_samples=50, progress="log")


def _data_defaults() -> DataConfig:
    return DataConfig(dataset="shards/demo-digits", mode="ssl", frames=8, stride=1, future=4, gap_min=4, gap_max=16, batch_size=16,
                      crop_size=56, scale=(0.5, 1.0), flip=False, workers=2)


def _objectives_defaults() -> ObjectivesConfig:
    return ObjectivesConfig(future=FutureConfig(target="latent", loss="infonce", predictor_dim=64,
                                                predictor_heads=4, proj_dim=64),
                            contrast=ContrastConfig(proj_dim=64, proj_hidden=128))


@dataclass(kw_only=True)
class DemoConfig(Config):
    """Settings of ``vidssl demo``; each stage gets its own section."""

    workdir: str = field(default="runs/demo", metadata=spec(help="footage, metrics and config land here"))
    footage: DigitsConfig = field(default_factory=_footage_defaults, metadata=spec(help="Moving Digits"))
    shard: ShardConfig = field(default_factory=_shard_defaults, metadata=spec(
        help="vidssl shard options (sources and output are set by the demo)"))
    data: DataConfig = field(default_factory=_data_defaults, metadata=spec(
        help="loader options; data.dataset is also where the shard stage writes"))
    peek_batches: int = field(default=2, metadata=spec(ge=0, help="batches printed by the loader stage"))
    model: ModelConfig = field(default_factory=ModelConfig, metadata=spec(help="backbone"))
    objectives: ObjectivesConfig = field(default_factory=_objectives_defaults, metadata=spec(
        help="self-supervised objectives"))
    ssl_steps: int = field(default=40, metadata=spec(ge=0, help="SSL training steps on CPU (0: skip the stage)"))
    lr: float = field(default=1e-3, metadata=spec(gt=0, help="AdamW learning rate of the SSL stage"))

    def validate(self) -> None:
        if self.shard.sources or self.shard.output:
            raise ConfigError(f"{self._key('shard')}.sources/output: set by the demo from workdir and "
                              f"dataset; got sources={self.shard.sources!r} output={self.shard.output!r}")
        ds = self.data.dataset
        if len(ds) != 1 or "://" in ds[0]:
            raise ConfigError(f"{self._key('data')}.dataset: got {ds!r}; the demo writes its shards there, so "
                              f"it must be one local folder")
        if self.data.mode != "ssl" and self.ssl_steps:
            raise ConfigError(f"{self._key('data')}.mode: got {self.data.mode!r}; the SSL stage needs 'ssl' "
                              f"(or set ssl_steps=0)")


def register(sub) -> None:
    from vidssl.cli import add_command

    p = add_command(sub, "demo", help="run the whole pipeline on built-in demo data (Moving Digits)",
                    description=__doc__)
    p.add_argument("config", nargs="*", metavar="[config.yaml] [key=value]",
                   help="a YAML file and/or dotted overrides, e.g. footage.videos=500 ssl_steps=100")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def _git_sha() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run(args: argparse.Namespace) -> int:
    cfg = parse_config_args(DemoConfig, args.config)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    summary = run_demo(cfg)
    print()
    print("demo finished:")
    for k, v in summary.items():
        print(f"  {k:<16} {v}")
    return 0


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; returns a summary (paths and the key numbers of each stage)."""
    from vidssl.errors import RuntimeFailure
    from vidssl.footage.digits import generate_digits
    from vidssl.shard import run_shard, verify_dataset

    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dataset = cfg.data.dataset[0]
    Path(dataset).parent.mkdir(parents=True, exist_ok=True)
    saved = cfg.to_dict()
    (workdir / "config.yaml").write_text(
        f"# resolved config of vidssl demo; git {_git_sha() or 'unknown'}\n" + cfg.to_yaml(), encoding="utf-8")
    out: dict = {"workdir": str(workdir), "config": str(workdir / "config.yaml")}

    # 1. footage -> {workdir}/footage/{videos/*.mp4, labels.csv}
    t = time.perf_counter()
    footage = workdir / "footage"
    labels = generate_digits(cfg.footage, footage) / "labels.csv"
    out["footage"] = f"{cfg.footage.videos} videos in {footage} ({time.perf_counter() - t:.1f}s)"
    log.info("stage 1/4 footage: %s", out["footage"])

    # 2. shards: the labels.csv manifest gives every sample its motion label and extra columns.
    t = time.perf_counter()
    shard_cfg = cfg.shard.replace(sources=[str(labels)], output=dataset, overwrite=True)
    res = run_shard(shard_cfg)
    problems = verify_dataset(dataset)
    if problems:
        raise RuntimeFailure(f"verify found {len(problems)} problem(s) in {dataset}: {problems[0]}")
    out["dataset"] = (f"{res['samples']} samples in {res['shards']} shards at {dataset}, "
                      f"{res['rejected']} rejected, verified ({time.perf_counter() - t:.1f}s)")
    log.info("stage 2/4 shard: %s", out["dataset"])

    # 3 + 4: the loader feeds batches; the SSL stage trains on them.
    out.update(_loader_and_ssl(cfg, cfg.data, workdir))
    saved_again = cfg.to_dict()
    assert saved == saved_again  # stages never mutate the config they were given
    if cfg.ssl_steps and not math.isfinite(out.get("_last_loss", 0.0)):
        raise RuntimeFailure("SSL stage: the loss became non-finite")
    out.pop("_last_loss", None)
    return out


def _loader_and_ssl(cfg: DemoConfig, data_cfg: DataConfig, workdir: Path) -> dict:
    import torch

    from vidssl.data import build_loader
    from vidssl.models import SSLModel

    out: dict = {}
    torch.manual_seed(cfg.data.seed)
    loader = build_loader(data_cfg, rank=0, world_size=1)
    t = time.perf_counter()
    shown = 0
    model = opt = None
    metrics_path = workdir / "metrics.jsonl"
    first = last = None
    step = 0
    epoch = 0
    with metrics_path.open("w", encoding="utf-8") as metrics:
        while shown < cfg.peek_batches or step < cfg.ssl_steps:
            loader.set_epoch(epoch)
            for batch in loader:
                # batch["context"], ["other"]: uint8 (B, T, C, H, W); ["future"]: uint8 (B, F, C, H, W)
                if shown < cfg.peek_batches:
                    shown += 1
                    shapes = ", ".join(f"{k} {tuple(batch[k].shape)}" for k in ("context", "future", "other"))
                    names = [loader.classes[i] if 0 <= i < len(loader.classes) else "-"
                             for i in batch["label"][:4].tolist()]
                    log.info("stage 3/4 loader: batch %d: %s; labels %s ...", shown, shapes, names)
                if step >= cfg.ssl_steps:
                    if shown >= cfg.peek_batches:
                        break
                    continue
                if model is None:
                    model = SSLModel(cfg.model, cfg.objectives)
                    opt = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr, weight_decay=0.05)
                    model.train()
                t_step = time.perf_counter()
                losses = model(batch)
                opt.zero_grad(set_to_none=True)
                losses["loss"].backward()
                opt.step()
                model.on_after_step()
                step += 1
                row = {"step": step, "epoch": epoch, "time": round(time.perf_counter() - t_step, 4)}
                row.update({k: round(float(v.detach()), 5) for k, v in losses.items()})
                metrics.write(json.dumps(row) + "\n")
                last = row
                first = first or row
                if step == 1 or step % 10 == 0 or step == cfg.ssl_steps:
                    log.info("stage 4/4 ssl: step %d/%d %s", step, cfg.ssl_steps,
                             " ".join(f"{k}={v:.3f}" for k, v in row.items()
                                      if k not in ("step", "epoch", "time")))
            epoch += 1
            if epoch > 1000:  # a dataset too small for even one batch would otherwise spin
                break
    out["loader"] = f"{len(loader)} batches/epoch of {data_cfg.batch_size} ssl samples; read {shown} shown"
    if first is not None and last is not None:
        parts = [f"{step} steps in {time.perf_counter() - t:.1f}s"]
        for name in ("future", "contrast"):
            if f"{name}/loss" in last:
                chance = f", chance {last[name + '/chance']:.2f}" if f"{name}/chance" in last else ""
                acc = f", acc {last[name + '/acc']:.2f}" if f"{name}/acc" in last else ""
                parts.append(f"{name} loss {first[name + '/loss']:.3f} -> {last[name + '/loss']:.3f}{chance}{acc}")
        out["ssl"] = "; ".join(parts)
        out["metrics"] = str(metrics_path)
        out["_last_loss"] = last["loss"]
    return out
