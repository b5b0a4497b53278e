"""``vidssl demo``: the whole pipeline that exists, on data it makes itself.

Stages, each with its own config section (``vidssl demo --print-config`` shows them all):

1. ``footage``: Moving Digits videos + ``labels.csv`` into ``{workdir}/footage``;
2. ``shard``: the footage (through ``labels.csv``, so samples carry the motion labels) into
   WebDataset shards at ``pretrain.data.dataset``, then ``verify`` checks every shard against the index;
3. loader: the streaming loader reads back ``peek_batches`` SSL batches;
4. ``pretrain``: ``vidssl pretrain`` itself (DeepSpeed engine, one process, gloo on CPU; future
   prediction + temporal contrast) into ``pretrain.run.dir``, then ``vidssl export`` writes the
   backbone. A rerun resumes an interrupted pretraining (``pretrain.train.resume=auto``).

The resolved config is saved as ``{workdir}/config.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

from vidssl.config import Config, ConfigError, dataclass, field, parse_config_args, spec
from vidssl.footage.digits import DigitsConfig
from vidssl.shard.config import ShardConfig
from vidssl.train.config import PretrainConfig, RunConfig, TrainConfig

log = logging.getLogger("vidssl.demo")


def _footage_defaults() -> DigitsConfig:
    # Small enough for a first run on 2 cores, varied enough to exercise the shard and loader paths.
    return DigitsConfig(videos=200, seed=0, sizes=["64x64", "80x64", "64x48"], fps=[12, 20, 25],
                        seconds=(2.0, 3.0))


def _shard_defaults() -> ShardConfig:
    return ShardConfig(short_side=64, gop=8, shard_samples=50, progress="log")


def _pretrain_defaults() -> PretrainConfig:
    # The same settings as configs/pretrain/demo_cpu.yaml (a test keeps them equal): about 3 minutes
    # of DeepSpeed pretraining on 2 CPU cores.
    return PretrainConfig(run=RunConfig(dir="runs/demo/pretrain", progress="bar"),
                          train=TrainConfig(max_steps=200, warmup_steps=20, checkpoint_every=100, keep_checkpoints=2,
                                            device="cpu"))


@dataclass(kw_only=True)
class DemoConfig(Config):
    """Settings of ``vidssl demo``; each stage gets its own section."""

    workdir: str = field(default="runs/demo", metadata=spec(help="footage and the demo's config land here"))
    footage: DigitsConfig = field(default_factory=_footage_defaults, metadata=spec(help="Moving Digits"))
    shard: ShardConfig = field(default_factory=_shard_defaults, metadata=spec(
        help="vidssl shard options (sources and output are set by the demo)"))
    peek_batches: int = field(default=2, metadata=spec(ge=0, help="batches printed by the loader stage"))
    pretrain: PretrainConfig = field(default_factory=_pretrain_defaults, metadata=spec(
        help="vidssl pretrain settings; pretrain.data.dataset is also where the shard stage writes"))
    pretrain_stage: bool = field(default=True, metadata=spec(help="run stage 4 (false: stop after the loader)"))
    export: bool = field(default=True, metadata=spec(help="export the pretrained backbone at the end"))

    def validate(self) -> None:
        if self.shard.sources or self.shard.output:
            raise ConfigError(f"{self._key('shard')}.sources/output: set by the demo from workdir and "
                              f"dataset; got sources={self.shard.sources!r} output={self.shard.output!r}")
        ds = self.pretrain.data.dataset
        if len(ds) != 1 or "://" in ds[0]:
            raise ConfigError(f"{self._key('pretrain')}.data.dataset: got {ds!r}; the demo writes its shards there, "
                              f"so it must be one local folder")


def register(sub) -> None:
    from vidssl.cli import add_command

    p = add_command(sub, "demo", help="run the whole pipeline on built-in demo data (Moving Digits)",
                    description=__doc__)
    p.add_argument("config", nargs="*", metavar="[config.yaml] [key=value]",
                   help="a YAML file and/or dotted overrides, e.g. footage.videos=500 pretrain.train.max_steps=400")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


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
    from vidssl.train.runner import git_sha

    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dataset = cfg.pretrain.data.dataset[0]
    Path(dataset).parent.mkdir(parents=True, exist_ok=True)
    saved = cfg.to_dict()
    (workdir / "config.yaml").write_text(
        f"# resolved config of vidssl demo; git {git_sha() or 'unknown'}\n" + cfg.to_yaml(), encoding="utf-8")
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

    # 3. the loader reads a few SSL batches back (in this process).
    out.update(_peek(cfg))

    # 4. vidssl pretrain (DeepSpeed engine, one process, gloo on CPU), then export the backbone.
    if cfg.pretrain_stage:
        out.update(_pretrain(cfg))
    assert saved == cfg.to_dict()  # stages never mutate the config they were given
    last = out.pop("_last_loss", 0.0)
    if not math.isfinite(last):
        raise RuntimeFailure("pretrain stage: the loss became non-finite")
    return out


def _peek(cfg: DemoConfig) -> dict:
    from vidssl.data import build_loader

    if not cfg.peek_batches:
        return {}
    loader = build_loader(cfg.pretrain.data.replace(workers=0), rank=0, world_size=1)
    shown = 0
    try:
        for batch in loader:
            # batch["context"], ["other"]: uint8 (B, T, C, H, W); ["future"]: uint8 (B, F, C, H, W)
            shown += 1
            shapes = ", ".join(f"{k} {tuple(batch[k].shape)}" for k in ("context", "future", "other"))
            names = [loader.classes[i] if 0 <= i < len(loader.classes) else "-" for i in batch["label"][:4].tolist()]
            log.info("stage 3/4 loader: batch %d: %s; labels %s ...", shown, shapes, names)
            if shown >= cfg.peek_batches:
                break
    finally:
        loader.close()
    return {"loader": f"{len(loader)} batches/epoch of {cfg.pretrain.data.batch_size} ssl samples; {shown} shown"}


def _pretrain(cfg: DemoConfig) -> dict:
    from vidssl.train.cli import export_run, run_pretrain

    t = time.perf_counter()
    p = cfg.pretrain
    log.info("stage 4/4 pretrain: vidssl pretrain, %d steps into %s (train.resume=%s)", p.train.max_steps, p.run.dir,
             p.train.resume)
    summary = run_pretrain(p)
    last = summary.get("last") or {}
    out: dict = {}
    parts = [f"{summary['step']} steps ({time.perf_counter() - t:.0f}s)"]
    first = _first_row(Path(p.run.dir) / "metrics.jsonl")
    for name in ("future", "contrast"):
        if f"{name}/loss" in last:
            chance = f", chance {last[name + '/chance']:.2f}" if f"{name}/chance" in last else ""
            acc = f", acc {last[name + '/acc']:.2f}" if f"{name}/acc" in last else ""
            parts.append(f"{name} loss {first.get(name + '/loss', float('nan')):.3f} -> {last[name + '/loss']:.3f}"
                         f"{chance}{acc}")
    out["pretrain"] = "; ".join(parts)
    out["run"] = f"{p.run.dir} (config.yaml, metrics.jsonl, tb/, checkpoints/, curves.png)"
    if cfg.export:
        out["backbone"] = export_run(p.run.dir)["file"]
    out["_last_loss"] = float(last.get("loss", 0.0))
    return out


def _first_row(path: Path) -> dict:
    from vidssl.train.metrics import read_metrics

    rows = read_metrics(path)
    return rows[0] if rows else {}
