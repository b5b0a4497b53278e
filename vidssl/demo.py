"""``vidssl demo``: the whole pipeline, on data it makes itself, ending in a report.

    vidssl demo [out=DIR] [budget_minutes=M] [config.yaml] [key=value ...]

Stages, in order (``vidssl demo --print-config`` shows every setting):

1. ``footage``: Moving Digits videos + ``labels.csv`` into ``{out}/footage/train`` (``footage``
   settings) and held-out videos into ``{out}/footage/val`` (same settings, ``val_seed``, ``val_videos``);
2. ``shard``: both, through ``labels.csv`` (so samples carry the motion labels), into WebDataset shards
   ``{out}/shards/train`` and ``{out}/shards/val``; ``verify`` checks every shard against its index;
3. ``loader``: the streaming loader reads back ``peek_batches`` SSL batches;
4. ``pretrain``: ``vidssl pretrain`` itself (DeepSpeed engine, one process, gloo on CPU; future
   prediction + temporal contrast) into ``{out}/pretrain``, then ``vidssl export`` writes the backbone;
5. one stage per arm, ``arms/<name>``: ``vidssl finetune`` into ``{out}/arms/<name>``, evaluated on the
   held-out shards (``eval.json``, ``eval_confusion.png``). For each fraction ``f`` of ``label_fractions``
   (named by percent ``p``): ``linear-ssl-p`` / ``linear-random-p`` (linear probe on the pretrained /
   a randomly initialised frozen backbone) and ``full-ssl-p`` / ``full-scratch-p`` (full fine-tuning from
   the pretrained weights / from scratch);
6. ``report``: ``{out}/report.md``, ``{out}/report.json`` and ``{out}/plots/*.png``.

Every finished stage is recorded in ``{out}/demo_state.json`` (with its summary, seconds and the settings
it depends on). A rerun of the same command skips finished stages and resumes the first unfinished one
(pretraining and every arm also resume from their newest checkpoint). A rerun whose settings differ in
something a finished stage depends on is refused (pick another ``out=DIR``); settings that only affect
stages not run yet may change. A failing stage ends the command with one line naming it; the stages before
it stay as they are. The resolved config is saved as ``{out}/config.yaml``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
import traceback
from pathlib import Path
from typing import Any, Callable, NamedTuple

from vidssl.config import Config, ConfigError, dataclass, field, parse_config_args, spec
from vidssl.errors import RuntimeFailure, UserError
from vidssl.fsio import atomic_write_json
from vidssl.footage.digits import DigitsConfig
from vidssl.shard.config import ShardConfig
from vidssl.data.config import DataConfig
from vidssl.models.config import ModelConfig
from vidssl.train.config import EvalSection, FinetuneConfig, FinetuneSection, PretrainConfig, RunConfig, TrainConfig

log = logging.getLogger("vidssl.demo")

#: Stage names up to the arms, then one ``arms/<name>`` stage per arm, then ``report``.
BASE_STAGES = ("footage", "shard", "loader", "pretrain")
UNTIL_CHOICES = ("footage", "shard", "loader", "pretrain", "arms", "report")
STATE_FILE = "demo_state.json"
#: budget_minutes at which the configured step counts are used as they are.
REFERENCE_BUDGET = 15.0
MIN_SCALED_STEPS = 10


def _footage_defaults() -> DigitsConfig:
    # Varied sizes/rates exercise the shard and loader paths; 600 videos (~67 per motion class) give the
    # probes enough to learn from and still fit the 2-core budget.
    return DigitsConfig(videos=600, seed=0, sizes=["64x64", "80x64", "64x48"], fps=[12, 20, 25],
                        seconds=(2.0, 3.0))


def _shard_defaults() -> ShardConfig:
    return ShardConfig(short_side=64, gop=8, shard_samples=50, progress="log")


def _pretrain_defaults() -> PretrainConfig:
    # The same settings as configs/pretrain/demo_cpu.yaml (a test keeps them equal): about 4.5 minutes
    # of DeepSpeed pretraining on 2 CPU cores. data and objectives: PretrainConfig's defaults.
    return PretrainConfig(run=RunConfig(dir="runs/demo/pretrain", progress="bar"),
                          model=ModelConfig(backbone="cnn3d_small", backbone_kwargs={"width": 16}),
                          train=TrainConfig(max_steps=600, warmup_steps=20, checkpoint_every=200, keep_checkpoints=2,
                                            device="cpu"))


def _demo_finetune_data() -> DataConfig:
    return DataConfig(dataset="runs/demo/shards/train", mode="clip", frames=8, stride=2, batch_size=16, crop_size=56,
                      scale=(0.5, 1.0), flip=False, workers=2)


def _linear_defaults() -> FinetuneConfig:
    # The same settings as configs/finetune/demo_linear.yaml (a test keeps them equal).
    return FinetuneConfig(
        run=RunConfig(dir="runs/demo/linear", progress="bar"), data=_demo_finetune_data(),
        model=ModelConfig(backbone="cnn3d_small", backbone_kwargs={"width": 16}),
        finetune=FinetuneSection(mode="linear", pretrained="runs/demo/pretrain"),
        eval=EvalSection(dataset=["runs/demo/shards/val"], views=3, crops=1, eval_resize=64),
        train=TrainConfig(max_steps=300, lr=1e-2, warmup_steps=20, weight_decay=0.0, checkpoint_every=100,
                          keep_checkpoints=2, device="cpu"))


def _full_defaults() -> FinetuneConfig:
    # The same settings as configs/finetune/demo_full.yaml (a test keeps them equal).
    lin = _linear_defaults()
    return lin.replace(run=lin.run.replace(dir="runs/demo/full"),
                       finetune=lin.finetune.replace(mode="full", layer_decay=0.75, label_smoothing=0.1),
                       train=lin.train.replace(lr=1e-3, weight_decay=0.05))


_SET_BY_DEMO = "; run.dir, data.dataset, eval.dataset, finetune.pretrained and finetune.label_fraction are set " \
               "by the demo for each arm, and the backbone (model.backbone, backbone_kwargs, mean, std) is " \
               "pretrain.model's"


@dataclass(kw_only=True)
class DemoConfig(Config):
    """Settings of ``vidssl demo``; each stage gets its own section. The defaults are calibrated to finish
    within about 15 minutes on 2 CPU cores (``budget_minutes`` scales the training steps)."""

    out: str = field(default="runs/demo", metadata=spec(
        help="everything lands here: footage/, shards/, pretrain/, arms/, plots/, report.md, report.json, "
             "config.yaml, demo_state.json; a rerun with the same out resumes"))
    budget_minutes: float = field(default=REFERENCE_BUDGET, metadata=spec(gt=0, help=(
        "time budget in minutes: the step counts of pretraining and of every arm (with their warmup and "
        "checkpoint_every) are scaled by budget_minutes/15 relative to the configured values (at least "
        "10 steps each); the defaults are calibrated for about 15 minutes on 2 CPU cores")))
    footage: DigitsConfig = field(default_factory=_footage_defaults, metadata=spec(
        help="Moving Digits settings of the training videos"))
    val_videos: int = field(default=270, metadata=spec(
        ge=1, help="held-out videos (footage settings, val_seed), the evaluation set of every arm"))
    val_seed: int = field(default=1000, metadata=spec(ge=0, help="seed of the held-out videos"))
    shard: ShardConfig = field(default_factory=_shard_defaults, metadata=spec(
        help="vidssl shard options (sources and output are set by the demo; classes default to footage.motions)"))
    peek_batches: int = field(default=2, metadata=spec(ge=0, help="batches printed by the loader stage"))
    pretrain: PretrainConfig = field(default_factory=_pretrain_defaults, metadata=spec(
        help="vidssl pretrain settings (configs/pretrain/demo_cpu.yaml); run.dir and data.dataset are set by "
             "the demo ({out}/pretrain, {out}/shards/train)"))
    linear: FinetuneConfig = field(default_factory=_linear_defaults, metadata=spec(
        help="vidssl finetune settings of the linear-probe arms (configs/finetune/demo_linear.yaml)" + _SET_BY_DEMO))
    full: FinetuneConfig = field(default_factory=_full_defaults, metadata=spec(
        help="vidssl finetune settings of the full fine-tuning arms (configs/finetune/demo_full.yaml)" + _SET_BY_DEMO))
    label_fractions: list[float] = field(default_factory=lambda: [0.1, 1.0], metadata=spec(
        gt=0, le=1, help="fractions of the training labels each arm is trained with (4 arms per fraction)"))
    until: str = field(default="report", metadata=spec(
        choices=UNTIL_CHOICES, help="the last stage to run (arms: every arm, no report)"))
    export: bool = field(default=True, metadata=spec(help="export the pretrained backbone after pretraining"))

    def validate(self) -> None:
        if self.shard.sources or self.shard.output:
            raise ConfigError(f"{self._key('shard')}.sources/output: set by the demo from out; got "
                              f"sources={self.shard.sources!r} output={self.shard.output!r}")
        if not self.out.strip():
            raise ConfigError(f"{self._key('out')}: got {self.out!r}; expected a folder such as runs/demo")
        if not self.label_fractions:
            raise ConfigError(f"{self._key('label_fractions')}: got an empty list; give at least one fraction "
                              f"in (0, 1], e.g. [0.1, 1.0]")
        names = [percent_name(f) for f in self.label_fractions]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"{self._key('label_fractions')}: got {self.label_fractions!r}; {dupes[0]}% is "
                              f"listed more than once")
        for name in ("linear", "full"):
            mode = getattr(self, name).finetune.mode
            if (name == "full") != (mode == "full"):
                raise ConfigError(f"{self._key(name)}.finetune.mode: got {mode!r}; the {name} arms need "
                                  f"{'full' if name == 'full' else 'linear or attentive'}")


# ---- derived settings ---------------------------------------------------------------------------

def percent_name(fraction: float) -> str:
    """0.1 -> '10', 1.0 -> '100', 0.025 -> '2.5'."""
    return f"{fraction * 100:.6g}"


def scale_train(train: TrainConfig, budget_minutes: float) -> TrainConfig:
    """``train`` with max_steps, warmup_steps and checkpoint_every scaled by ``budget_minutes / 15``.

    Scaling never goes below 10 steps (or the configured count when that is smaller); warmup stays
    below max_steps; a checkpoint interval of 0 (only at the end) stays 0.
    """
    factor = budget_minutes / REFERENCE_BUDGET
    if factor == 1.0:
        return train
    steps = max(int(round(train.max_steps * factor)), min(train.max_steps, MIN_SCALED_STEPS))
    warmup = min(int(round(train.warmup_steps * factor)), max(steps - 1, 0))
    every = train.checkpoint_every
    if every:
        every = min(max(1, int(round(every * factor))), steps)
    return train.replace(max_steps=steps, warmup_steps=warmup, checkpoint_every=every)


def demo_paths(out: str | Path) -> dict[str, Path]:
    o = Path(out)
    return {"out": o, "footage_train": o / "footage" / "train", "footage_val": o / "footage" / "val",
            "shards_train": o / "shards" / "train", "shards_val": o / "shards" / "val",
            "pretrain": o / "pretrain", "arms": o / "arms", "plots": o / "plots",
            "report_md": o / "report.md", "report_json": o / "report.json", "config": o / "config.yaml",
            "state": o / STATE_FILE}


def resolve(cfg: DemoConfig) -> DemoConfig:
    """``cfg`` with the paths the demo sets (pretraining run folder and dataset, kNN shards if enabled)."""
    p = demo_paths(cfg.out)
    pre = cfg.pretrain
    knn = pre.knn
    if knn.every and not (knn.train or knn.val):
        knn = knn.replace(train=str(p["shards_train"]), val=str(p["shards_val"]))
    pre = pre.replace(run=pre.run.replace(dir=str(p["pretrain"])),
                      data=pre.data.replace(dataset=[str(p["shards_train"])]), knn=knn)
    return cfg.replace(pretrain=pre)


def pretrain_config(cfg: DemoConfig) -> PretrainConfig:
    """The config ``vidssl pretrain`` runs with: paths set, steps scaled to the budget."""
    pre = resolve(cfg).pretrain
    return pre.replace(train=scale_train(pre.train, cfg.budget_minutes))


class Arm(NamedTuple):
    name: str      # e.g. linear-ssl-10
    kind: str      # linear | full: which config section
    init: str      # ssl (the pretraining run's weights) | random | scratch
    fraction: float


def arms(cfg: DemoConfig) -> list[Arm]:
    """Every arm, in run order: fractions from the largest down, then linear-ssl, linear-random, full-ssl,
    full-scratch."""
    out = []
    for f in sorted(cfg.label_fractions, reverse=True):
        p = percent_name(f)
        for kind, init in (("linear", "ssl"), ("linear", "random"), ("full", "ssl"), ("full", "scratch")):
            out.append(Arm(name=f"{kind}-{init}-{p}", kind=kind, init=init, fraction=f))
    return out


def arm_config(cfg: DemoConfig, arm: Arm) -> FinetuneConfig:
    """The ``vidssl finetune`` config of one arm: its section with the paths, weights, label fraction and
    backbone set by the demo, steps scaled to the budget."""
    p = demo_paths(cfg.out)
    base: FinetuneConfig = getattr(cfg, arm.kind)
    pm = cfg.pretrain.model
    model = base.model.replace(backbone=pm.backbone, backbone_kwargs=pm.backbone_kwargs, mean=pm.mean, std=pm.std)
    return base.replace(
        run=base.run.replace(dir=str(p["arms"] / arm.name)),
        data=base.data.replace(dataset=[str(p["shards_train"])]),
        eval=base.eval.replace(dataset=[str(p["shards_val"])]),
        model=model,
        finetune=base.finetune.replace(pretrained=str(p["pretrain"]) if arm.init == "ssl" else "none",
                                       label_fraction=arm.fraction),
        train=scale_train(base.train, cfg.budget_minutes))


def stage_names(cfg: DemoConfig) -> list[str]:
    return [*BASE_STAGES, *(f"arms/{a.name}" for a in arms(cfg)), "report"]


def _planned(cfg: DemoConfig) -> list[str]:
    """The stages this invocation runs (``until``)."""
    names = stage_names(cfg)
    if cfg.until == "report":
        return names
    if cfg.until == "arms":
        return names[:-1]
    return names[:BASE_STAGES.index(cfg.until) + 1]


def _drop(d: dict, *keys: str) -> dict:
    d = dict(d)
    for k in keys:
        head, _, rest = k.partition(".")
        if rest and isinstance(d.get(head), dict):
            d[head] = _drop(d[head], rest)
        else:
            d.pop(k, None)
    return d


def stage_inputs(cfg: DemoConfig, stage: str) -> dict:
    """The settings a stage's output depends on (display-only settings such as progress left out)."""
    footage = {"footage": _drop(cfg.footage.to_dict(), "workers"), "val_videos": cfg.val_videos,
               "val_seed": cfg.val_seed}
    if stage == "footage":
        return footage
    shard = {**footage, "shard": _drop(cfg.shard.to_dict(), "workers", "progress", "log_every")}
    if stage in ("shard", "loader"):
        return shard
    pre = {**shard, "pretrain": _drop(pretrain_config(cfg).to_dict(), "run.progress"), "export": cfg.export}
    if stage == "pretrain":
        return pre
    if stage.startswith("arms/"):
        arm = next((a for a in arms(cfg) if a.name == stage[len("arms/"):]), None)
        if arm is None:
            return {}
        base = pre if arm.init == "ssl" else shard
        return {**base, "arm": _drop(arm_config(cfg, arm).to_dict(), "run.progress")}
    return {}  # report: derived from the other stages, redone whenever one of them ran


def _first_difference(old: Any, new: Any, key: str = "") -> str | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            d = _first_difference(old.get(k, "<unset>"), new.get(k, "<unset>"), f"{key}.{k}" if key else str(k))
            if d:
                return d
        return None
    if old != new:
        return f"{key}: {old!r} -> {new!r}"
    return None


# ---- stage state --------------------------------------------------------------------------------

def read_state(out: str | Path) -> dict:
    path = demo_paths(out)["state"]
    if not path.is_file():
        return {"version": 1, "stages": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"out: {path} is not readable JSON ({exc}); delete it to start the demo over") from None
    state.setdefault("stages", {})
    return state


def write_state(out: str | Path, state: dict) -> None:
    path = demo_paths(out)["state"]
    atomic_write_json(path, state)


def check_resumable(cfg: DemoConfig, state: dict) -> None:
    """Refuse a rerun whose settings differ in something a finished stage depends on."""
    for name, rec in state.get("stages", {}).items():
        if name == "report" or "inputs" not in rec:
            continue
        if name.startswith("arms/") and name not in stage_names(cfg):
            continue  # an arm of a fraction no longer asked for: kept, not reported
        now = json.loads(json.dumps(stage_inputs(cfg, name)))  # as recorded: tuples become lists
        diff = _first_difference(rec["inputs"], now)
        if diff:
            raise UserError(f"out: {cfg.out} holds the finished stage {name!r}, made with other settings "
                            f"({diff}); use another out=DIR for these settings (or delete {cfg.out} to start "
                            f"over). Settings that only affect stages not run yet may change.")


class DemoStageFailed(RuntimeFailure):
    """A stage raised; the message names it and says how to resume."""

    def __init__(self, message: str, *, user_error: bool) -> None:
        super().__init__(message)
        self.user_error = user_error


# ---- CLI ----------------------------------------------------------------------------------------

def register(sub) -> None:
    from vidssl.cli import add_command

    p = add_command(sub, "demo", help="run the whole pipeline on built-in demo data (Moving Digits) and write a report",
                    description=__doc__)
    p.add_argument("config", nargs="*", metavar="[config.yaml] [key=value]",
                   help="a YAML file and/or dotted overrides, e.g. out=runs/demo2 budget_minutes=5 "
                        "footage.videos=900 pretrain.train.max_steps=400")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    cfg = parse_config_args(DemoConfig, args.config)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    try:
        result = run_demo(cfg)
    except DemoStageFailed as exc:
        if getattr(args, "verbose", 0) > 0 and exc.__cause__ is not None:
            traceback.print_exception(exc.__cause__)
        print(f"vidssl {exc}", file=sys.stderr)
        return 2 if exc.user_error else 1
    print()
    print(format_summary(result))
    return 0


def format_summary(result: dict) -> str:
    lines = [f"demo finished (stages run: {', '.join(result['ran']) or 'none, all were done'}):"]
    for name, rec in result["stages"].items():
        lines.append(f"  {name:<22} {rec.get('seconds', 0):>7.1f}s  {rec.get('summary', {}).get('text', '')}")
    report = result.get("report")
    if report:
        from vidssl.demo_report import summary_table  # noqa: PLC0415

        lines += ["", summary_table(report), "", f"report: {result['report_md']}"]
    return "\n".join(lines)


# ---- the pipeline -------------------------------------------------------------------------------

def run_demo(cfg: DemoConfig) -> dict:
    """Run (or resume) every stage up to ``cfg.until``; returns {"stages", "ran", "report", "report_md"}."""
    from vidssl.train.runner import git_sha

    cfg = resolve(cfg)
    paths = demo_paths(cfg.out)
    state = read_state(cfg.out)
    check_resumable(cfg, state)
    paths["out"].mkdir(parents=True, exist_ok=True)
    paths["config"].write_text(f"# resolved config of vidssl demo; git {git_sha() or 'unknown'}\n" + cfg.to_yaml(),
                               encoding="utf-8")
    state["config"] = str(paths["config"])
    names = stage_names(cfg)
    total = len(names)
    ran: list[str] = []
    for i, name in enumerate(_planned(cfg), 1):
        rec = state["stages"].get(name)
        if rec and rec.get("done") and not (name == "report" and ran):
            log.info("stage %d/%d %s: done earlier (%s), skipped", i, total, name, paths["state"])
            continue
        log.info("stage %d/%d %s: started", i, total, name)
        t0 = time.perf_counter()
        try:
            summary = _run_stage(cfg, name, state)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one line naming the stage, the cause kept for -v
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if not isinstance(exc, (UserError, RuntimeFailure)):
                reason = f"{type(exc).__name__}: {reason}"
            state["last_failure"] = {"stage": name, "error": reason, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            write_state(cfg.out, state)
            raise DemoStageFailed(f"demo: stage {name} failed: {reason}; the stages before it are kept in "
                                  f"{cfg.out}; rerun the same command to resume",
                                  user_error=isinstance(exc, UserError)) from exc
        seconds = time.perf_counter() - t0
        state["stages"][name] = {"done": True, "seconds": round(seconds, 2), "summary": summary,
                                 "inputs": stage_inputs(cfg, name),
                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        state.pop("last_failure", None)
        write_state(cfg.out, state)
        ran.append(name)
        log.info("stage %d/%d %s: done in %.1fs: %s", i, total, name, seconds, summary.get("text", ""))
    report = None
    if "report" in state["stages"] and cfg.until == "report":
        report = json.loads(paths["report_json"].read_text(encoding="utf-8"))
    shown = {n: state["stages"][n] for n in names if n in state["stages"]}
    return {"stages": shown, "ran": ran, "report": report, "report_md": str(paths["report_md"]), "out": cfg.out}


def _run_stage(cfg: DemoConfig, name: str, state: dict) -> dict:
    stages: dict[str, Callable[[DemoConfig], dict]] = {
        "footage": _stage_footage, "shard": _stage_shard, "loader": _stage_loader, "pretrain": _stage_pretrain}
    if name in stages:
        return stages[name](cfg)
    if name.startswith("arms/"):
        arm = next(a for a in arms(cfg) if a.name == name[len("arms/"):])
        return _stage_arm(cfg, arm)
    if name == "report":
        from vidssl.demo_report import write_demo_report  # noqa: PLC0415

        rep = write_demo_report(cfg, state)
        return {"text": f"{demo_paths(cfg.out)['report_md']} ({len(rep['arms'])} arms, "
                        f"{sum(1 for t in rep['targets'] if t['met'])}/{len(rep['targets'])} targets met)"}
    raise AssertionError(name)


def _stage_footage(cfg: DemoConfig) -> dict:
    from vidssl.footage.digits import generate_digits_logged

    p = demo_paths(cfg.out)
    _, t_train = generate_digits_logged(cfg.footage, p["footage_train"])
    val = cfg.footage.replace(videos=cfg.val_videos, seed=cfg.val_seed)
    _, t_val = generate_digits_logged(val, p["footage_val"])
    return {"train_videos": cfg.footage.videos, "val_videos": cfg.val_videos,
            "text": f"{cfg.footage.videos} training videos in {p['footage_train']} ({t_train:.0f}s), "
                    f"{cfg.val_videos} held-out videos (seed {cfg.val_seed}) in {p['footage_val']} ({t_val:.0f}s)"}


def _stage_shard(cfg: DemoConfig) -> dict:
    from vidssl.shard import run_shard, verify_dataset

    p = demo_paths(cfg.out)
    classes = cfg.shard.classes if cfg.shard.classes is not None else list(cfg.footage.motions)
    out: dict = {}
    texts = []
    for split in ("train", "val"):
        labels = p[f"footage_{split}"] / "labels.csv"
        dataset = p[f"shards_{split}"]
        dataset.parent.mkdir(parents=True, exist_ok=True)
        res = run_shard(cfg.shard.replace(sources=[str(labels)], output=str(dataset), overwrite=True,
                                          classes=classes))
        problems = verify_dataset(str(dataset))
        if problems:
            raise RuntimeFailure(f"verify found {len(problems)} problem(s) in {dataset}: {problems[0]}")
        out[split] = {"samples": res["samples"], "shards": res["shards"], "rejected": res["rejected"]}
        texts.append(f"{split}: {res['samples']} samples in {res['shards']} shards at {dataset}, "
                     f"{res['rejected']} rejected")
    out["text"] = "; ".join(texts) + "; verified"
    return out


def _stage_loader(cfg: DemoConfig) -> dict:
    from vidssl.data import build_loader

    if not cfg.peek_batches:
        return {"text": "peek_batches=0: nothing read"}
    loader = build_loader(cfg.pretrain.data.replace(workers=0), rank=0, world_size=1)
    shown = 0
    try:
        for batch in loader:
            # batch["context"], ["other"]: uint8 (B, T, C, H, W); ["future"]: uint8 (B, F, C, H, W)
            shown += 1
            shapes = ", ".join(f"{k} {tuple(batch[k].shape)}" for k in ("context", "future", "other"))
            names = [loader.classes[i] if 0 <= i < len(loader.classes) else "-" for i in batch["label"][:4].tolist()]
            log.info("loader: batch %d: %s; labels %s ...", shown, shapes, names)
            if shown >= cfg.peek_batches:
                break
    finally:
        loader.close()
    return {"batches_per_epoch": len(loader), "shown": shown,
            "text": f"{len(loader)} batches/epoch of {cfg.pretrain.data.batch_size} ssl samples; {shown} shown"}


def _stage_pretrain(cfg: DemoConfig) -> dict:
    from vidssl.train import cli as train_cli
    from vidssl.train.metrics import read_metrics

    p = pretrain_config(cfg)
    log.info("vidssl pretrain: %d steps into %s (train.resume=%s)", p.train.max_steps, p.run.dir, p.train.resume)
    summary = train_cli.run_pretrain(p)
    last = summary.get("last") or {}
    rows = [r for r in read_metrics(Path(p.run.dir) / "metrics.jsonl") if "loss" in r]
    first = rows[0] if rows else {}
    if not math.isfinite(float(last.get("loss", 0.0))):
        raise RuntimeFailure("the pretraining loss became non-finite")
    out: dict = {"steps": summary["step"], "run": p.run.dir,
                 "first": {k: v for k, v in first.items() if k == "loss" or k.endswith(("/loss", "/chance"))},
                 "last": {k: v for k, v in last.items() if k == "loss" or k.endswith(("/loss", "/chance", "/acc"))}}
    parts = [f"{summary['step']} steps in {p.run.dir}"]
    for name in ("future", "contrast"):
        if f"{name}/loss" in last:
            chance = f", chance {last[name + '/chance']:.2f}" if f"{name}/chance" in last else ""
            parts.append(f"{name} loss {first.get(name + '/loss', float('nan')):.3f} -> "
                         f"{last[name + '/loss']:.3f}{chance}")
    if cfg.export:
        out["backbone"] = train_cli.export_run(p.run.dir)["file"]
        parts.append(f"backbone {out['backbone']}")
    out["text"] = "; ".join(parts)
    return out


def _stage_arm(cfg: DemoConfig, arm: Arm) -> dict:
    from vidssl.train import cli as train_cli

    fc = arm_config(cfg, arm)
    log.info("vidssl finetune %s: %s, %s weights, %s%% of the labels, %d steps into %s", arm.name,
             fc.finetune.mode, "pretrained" if arm.init == "ssl" else "random", percent_name(arm.fraction),
             fc.train.max_steps, fc.run.dir)
    summary = train_cli.run_finetune(fc)
    ev = summary.get("eval")
    if not ev:
        raise RuntimeFailure(f"{fc.run.dir}: the run ended without an evaluation")
    subset = summary.get("subset") or {}
    return {"name": arm.name, "kind": arm.kind, "init": arm.init, "label_fraction": arm.fraction,
            "steps": summary["step"], "run": fc.run.dir, "top1": ev["top1"], "top5": ev["top5"],
            "mean_class_acc": ev["mean_class_acc"], "samples": ev.get("samples"),
            "train_samples": subset.get("samples"),
            "text": f"top-1 {ev['top1']:.3f}, top-5 {ev['top5']:.3f} on {ev.get('samples')} held-out videos "
                    f"after {summary['step']} steps"}
