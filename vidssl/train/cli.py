"""``vidssl pretrain`` and ``vidssl export``.

Launch (docs/training.md has each one in full)::

    vidssl pretrain configs/pretrain/demo_cpu.yaml train.max_steps=200          # one process
    torchrun --nproc-per-node 2 -m vidssl pretrain CONFIG                       # one node
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29400 --rdzv-id RUN -m vidssl pretrain CONFIG # several nodes
    deepspeed --num_gpus 8 --module vidssl pretrain CONFIG                      # deepspeed launcher
    sbatch --nodes 4 tools/slurm/pretrain.sbatch CONFIG                         # SLURM

``--local_rank``/``--local-rank`` (appended by the deepspeed launcher and torch.distributed.launch)
are accepted before or after the verb.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
from pathlib import Path

from vidssl.errors import UserError
from vidssl.fsio import atomic_write_bytes, atomic_write_text

log = logging.getLogger("vidssl.train")

__all__ = ["register", "run_pretrain", "dry_run", "export_run"]


def register(sub) -> None:
    from vidssl.cli import add_command  # noqa: PLC0415
    from vidssl.models.registry import builtin_backbones  # noqa: PLC0415

    p = add_command(sub, "pretrain", help="self-supervised pretraining with DeepSpeed (CPU, GPUs, nodes, SLURM)",
                    description=__doc__)
    p.add_argument("config", nargs="*", metavar="[config.yaml] [key=value]",
                   help="a YAML file and/or dotted overrides, e.g. train.max_steps=100 run.dir=runs/x")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="validate, build the model and one batch, print parameters, FLOPs per clip and the "
                        "generated DeepSpeed config, then exit")
    p.set_defaults(func=_pretrain_cmd)

    e = add_command(sub, "export", help="write a run's backbone as a consolidated fp32 state dict",
                    description="Consolidate a checkpoint (sharded under ZeRO, bf16 or fp32) into a plain fp32 "
                                "state dict of the backbone (loads with torch.load(weights_only=True)), plus "
                                "FILE.yaml with the model config. torchvision backbones "
                                f"({', '.join(builtin_backbones('vidssl.models.resnet3d'))}) load with "
                                "strict=True into torchvision's model once its classifier is replaced: "
                                "m = r3d_18(); m.fc = torch.nn.Identity(); m.load_state_dict(sd).")
    e.add_argument("run", help="run folder (runs/NAME) or one checkpoint folder")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    e.add_argument("-o", "--output", default=None,
                   help="output file (default RUN/export/backbone-step_XXXXXXXX.pt)")
    e.set_defaults(func=_export_cmd)
    register_finetune(sub)


def _local_rank(args: argparse.Namespace) -> int | None:
    return getattr(args, "local_rank", None)


def _pretrain_cmd(args: argparse.Namespace) -> int:
    from vidssl.train.config import PretrainConfig  # noqa: PLC0415
    from vidssl.train.runner import parse_run_config  # noqa: PLC0415

    cfg = parse_run_config(PretrainConfig, args.config)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    if args.dry_run:
        dry_run(cfg)
        return 0
    summary = run_pretrain(cfg, local_rank=_local_rank(args))
    if summary["rank"] == 0:
        last = summary.get("last") or {}
        losses = " ".join(f"{k}={v:.4f}" for k, v in last.items() if k == "loss" or k.endswith("/loss"))
        print(f"pretrain finished: step {summary['step']}, {losses}; run folder {summary['run']} "
              f"(metrics.jsonl, tb/, checkpoints/, curves.png)")
    return 0


def run_pretrain(cfg, *, local_rank: int | None = None) -> dict:
    """Pretrain (or resume) per ``cfg`` (a :class:`~vidssl.train.config.PretrainConfig`); returns a summary."""
    from vidssl.train.runner import preflight, run_training  # noqa: PLC0415
    from vidssl.train.task import PretrainTask  # noqa: PLC0415

    pre = preflight(cfg)
    monitor = knn_monitor(cfg) if cfg.knn.every else None
    return run_training(cfg, lambda _loader: PretrainTask(cfg.model, cfg.objectives, cfg.train),
                        local_rank=local_rank, pre=pre, name="pretrain", on_step_factory=monitor)


def knn_monitor(cfg):
    """``on_step_factory`` for :func:`run_training`: kNN accuracy every ``knn.every`` steps and at the end,
    logged to metrics.jsonl (``kind: knn``) and TensorBoard (``knn/top1``)."""
    from vidssl.data.index import open_index  # noqa: PLC0415

    kc = cfg.knn
    _check_classes(open_index(kc.train).classes, open_index(kc.val).classes, f"knn.val {kc.val!r}")

    def factory(*, engine, metrics, task):
        import torch  # noqa: PLC0415

        from vidssl.eval.evaluate import extract_features, views_loader_config  # noqa: PLC0415
        from vidssl.eval.knn import knn_accuracy  # noqa: PLC0415
        from vidssl.models.base import clips_to_input  # noqa: PLC0415

        module = engine.module
        backbone = module.backbone
        mean, std = tuple(cfg.model.mean), tuple(cfg.model.std)

        def fn(clips):
            dtype = next(backbone.parameters()).dtype
            return backbone.forward_pooled(clips_to_input(clips, mean, std, dtype=dtype))

        def loader_cfg(ds: str):
            return views_loader_config([ds], frames=cfg.data.frames, stride=cfg.data.stride,
                                       crop_size=cfg.data.crop_size, views=kc.views, crops=1,
                                       batch_size=kc.batch_size, workers=kc.workers,
                                       eval_resize=cfg.data.crop_size)

        def on_step(state) -> None:
            if state.step % kc.every and state.step != cfg.train.max_steps:
                return
            # Loader iterations draw from torch's RNG: fork it so the training RNG (and resume) is untouched.
            with torch.random.fork_rng(devices=[]):
                module.eval()
                try:
                    _, tf, tl = extract_features(fn, loader_cfg(kc.train), engine.device)
                    _, vf, vl = extract_features(fn, loader_cfg(kc.val), engine.device)
                finally:
                    module.train()
            res = knn_accuracy(tf, tl, vf, vl, k=kc.k, temperature=kc.temperature)
            metrics.event({"step": state.step, "kind": "knn", "top1": res["top1"], "top5": res["top5"]})
            log.info("step %d: kNN top-1 %.4f top-5 %.4f (k=%d)", state.step, res["top1"], res["top5"], res["k"])

        return on_step

    return factory


def count_flops(module, batch) -> int:
    """FLOPs of one forward of ``module(batch)`` counted by torch's FlopCounterMode (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    counter = FlopCounterMode(display=False)
    with counter:
        module(batch)
    return int(counter.get_total_flops())


def dry_run(cfg) -> dict:
    """Validate, build the model and one batch (in this process), print what a launch would use."""
    import torch  # noqa: PLC0415

    from vidssl.data import build_loader  # noqa: PLC0415
    from vidssl.models.base import clips_to_input  # noqa: PLC0415
    from vidssl.train.runner import preflight, seed_everything  # noqa: PLC0415
    from vidssl.train.task import PretrainTask  # noqa: PLC0415

    pre = preflight(cfg)
    seed_everything(cfg.train.seed)
    task = PretrainTask(cfg.model, cfg.objectives, cfg.train)
    loader = build_loader(cfg.data.replace(workers=0), rank=0, world_size=pre.world_size)
    try:
        loader.set_epoch(0)
        batch = next(iter(loader))
    finally:
        loader.close()
    n_params = sum(p.numel() for p in task.parameters())
    n_train = sum(p.numel() for p in task.parameters() if p.requires_grad)
    n_backbone = sum(p.numel() for p in task.backbone.parameters())
    task.train()
    b = batch["context"].shape[0]
    with torch.no_grad():
        step_fwd = count_flops(task, batch) / b
        x = clips_to_input(batch["context"][:1], cfg.model.mean, cfg.model.std)
        backbone_fwd = count_flops(task.backbone, x)
    out = {
        "batch": {k: list(v.shape) for k, v in batch.items() if isinstance(v, torch.Tensor)},
        "parameters": n_params, "trainable": n_train, "backbone_parameters": n_backbone,
        "backbone_gflops_per_clip": backbone_fwd / 1e9,
        "train_gflops_per_sample": 3 * step_fwd / 1e9,
        "device": pre.device, "world_size": pre.world_size, "resume_from": str(pre.resume_from or "none"),
        "deepspeed": pre.ds_config,
    }
    print(f"batch (per rank): {out['batch']}")
    print(f"parameters: {n_params:,} ({n_train:,} trainable; backbone {cfg.model.backbone} {n_backbone:,})")
    print(f"FLOPs: backbone forward {backbone_fwd / 1e9:.3f} GFLOPs per clip of context shape "
          f"{list(x.shape)}; training ~{3 * step_fwd / 1e9:.3f} GFLOPs per sample (3 x the task's forward over "
          f"all its windows, counted with torch.utils.flop_counter)")
    resume = out["resume_from"]
    if pre.resume_from is not None:
        from vidssl.train.checkpoint import read_meta  # noqa: PLC0415

        saved_world = int(read_meta(pre.resume_from).get("world_size", pre.world_size))
        if saved_world != pre.world_size:  # preflight let it through: train.elastic_resume is on
            resume += f" (elastic: written by {saved_world} ranks, re-partitioned for {pre.world_size})"
            out["resume_elastic_from_world_size"] = saved_world
    print(f"device {pre.device}, world size {pre.world_size}, {pre.samples} samples, resume: {resume}")
    print("generated DeepSpeed config:")
    print(json.dumps(pre.ds_config, indent=2))
    return out


# ---- export -------------------------------------------------------------------------------------

def _export_cmd(args: argparse.Namespace) -> int:
    out = export_run(args.run, step=args.step, output=args.output)
    print(f"exported {out['tensors']} tensors ({out['parameters']:,} values) of backbone {out['backbone']} "
          f"from {out['checkpoint']} to {out['file']} (+ {out['config']})")
    return 0


def _find_checkpoint(run: str, step: int | None) -> Path:
    from vidssl.train.checkpoint import META, complete_checkpoints  # noqa: PLC0415

    p = Path(run)
    if (p / META).is_file() and step is None:
        return p
    found = complete_checkpoints(p / "checkpoints") or complete_checkpoints(p)
    if not found:
        raise UserError(f"export: {run!r} holds no complete checkpoint (expected RUN/checkpoints/step_XXXXXXXX)")
    if step is None:
        return found[-1][1]
    for s, d in found:
        if s == step:
            return d
    raise UserError(f"export: no checkpoint at step {step} in {run!r}; available: {', '.join(str(s) for s, _ in found)}")


def export_run(run: str, *, step: int | None = None, output: str | None = None) -> dict:
    """Write the backbone of a run's checkpoint as a flat fp32 state dict + ``FILE.yaml``; returns a summary."""
    import torch  # noqa: PLC0415
    import yaml  # noqa: PLC0415

    from vidssl.train.checkpoint import read_meta  # noqa: PLC0415
    from vidssl.train.engine import consolidated_state_dict  # noqa: PLC0415
    from vidssl.train.runner import git_sha  # noqa: PLC0415

    ckpt = _find_checkpoint(run, step)
    meta = read_meta(ckpt)
    full = consolidated_state_dict(ckpt)
    prefixes = ("model.backbone.", "backbone.")  # pretraining task, fine-tuning classifier
    sd = {}
    for prefix in prefixes:
        sd = {k[len(prefix):]: v.contiguous() for k, v in full.items() if k.startswith(prefix)}
        if sd:
            break
    if not sd:
        raise UserError(f"export: checkpoint {ckpt} holds no backbone weights (keys like model.backbone.*)")
    model_cfg = meta.get("config", {}).get("model", {})
    if output is None:
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
        output = str(run_dir / "export" / f"backbone-{ckpt.name}.pt")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(sd, buf)
    atomic_write_bytes(out, buf.getvalue())
    side = out.with_suffix(".yaml")
    atomic_write_text(side, yaml.safe_dump({
        "model": model_cfg, "source": {"checkpoint": str(ckpt), "step": meta.get("step"),
                                       "precision": meta.get("precision"), "zero_stage": meta.get("zero_stage"),
                                       "git": git_sha()}}, sort_keys=False))
    return {"file": str(out), "config": str(side), "checkpoint": str(ckpt), "tensors": len(sd),
            "parameters": sum(v.numel() for v in sd.values()), "backbone": model_cfg.get("backbone")}


# ---- fine-tuning and evaluation ---------------------------------------------------------------------

def register_finetune(sub) -> None:
    from vidssl.cli import add_command  # noqa: PLC0415

    p = add_command(sub, "finetune", help="action recognition: linear / attentive probe or full fine-tuning",
                    description="Fine-tune on labelled shards through the same loop, DeepSpeed engine, launchers, "
                                "checkpoints and exact resume as pretraining. finetune.pretrained: a pretraining "
                                "run, an exported file, or none (from scratch). With eval.dataset set, the run ends "
                                "with a multi-view evaluation (eval.json, eval_confusion.png). See docs/finetune.md.")
    p.add_argument("config", nargs="*", metavar="[config.yaml] [key=value]",
                   help="a YAML file and/or dotted overrides, e.g. finetune.mode=full finetune.pretrained=runs/x")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_finetune_cmd)

    e = add_command(sub, "evaluate", help="multi-view evaluation of a fine-tuned run, or kNN accuracy of features",
                    description="vidssl evaluate RUN data=VAL [views=5 crops=3]: top-1/top-5/mean-class accuracy "
                                "of a fine-tuning run's newest checkpoint (K clips x 1|3 crops, softmax averaged, "
                                "each sample counted once), eval.json and a confusion-matrix PNG in the run folder.\n"
                                "vidssl evaluate --knn SOURCE train=TRAIN data=VAL: kNN accuracy (k=20, "
                                "temperature-weighted votes) of frozen, L2-normalised backbone features; SOURCE is a "
                                "pretraining run, an exported backbone file, or none (random init: "
                                "model.backbone=NAME).")
    e.add_argument("source", help="run folder (or exported backbone / none with --knn)")
    e.add_argument("settings", nargs="*", metavar="key=value",
                   help="data=VAL (required), train=TRAIN (--knn), views, crops, batch_size, workers, k, temperature, "
                        "model.backbone (with a source of none), output=DIR")
    e.add_argument("--knn", action="store_true", help="kNN accuracy of frozen features instead of the classifier")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    e.set_defaults(func=_evaluate_cmd)


def _finetune_cmd(args: argparse.Namespace) -> int:
    from vidssl.train.config import FinetuneConfig  # noqa: PLC0415
    from vidssl.train.runner import parse_run_config  # noqa: PLC0415

    cfg = parse_run_config(FinetuneConfig, args.config)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    summary = run_finetune(cfg, local_rank=_local_rank(args))
    if summary["rank"] == 0:
        ev = summary.get("eval")
        tail = (f"; eval top-1 {ev['top1']:.4f}, top-5 {ev['top5']:.4f}, mean class {ev['mean_class_acc']:.4f} "
                f"({ev['samples']} videos)") if ev else ""
        print(f"finetune finished: step {summary['step']} ({summary['loaded']}){tail}; run folder {summary['run']}")
    return 0


def _check_classes(train: list[str], other: list[str], where: str) -> None:
    if list(train) != list(other):
        only_t = sorted(set(train) - set(other))
        only_o = sorted(set(other) - set(train))
        raise UserError(f"{where}: its class list differs from the training shards' (only in training: "
                        f"{only_t[:5] or 'none'}; only in {where}: {only_o[:5] or 'none'}; or another order); "
                        f"shard both with the same label set")


def _launch_rank() -> int:
    import os  # noqa: PLC0415

    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def _subset_dataset(cfg, run_dir: Path) -> tuple[str, dict]:
    """The label-fraction subset of the training shards, made once (rank 0) inside the run folder."""
    import time  # noqa: PLC0415

    from vidssl.data.subset import make_subset  # noqa: PLC0415

    out = run_dir / "train_subset"
    if len(cfg.data.dataset) != 1:
        raise UserError("finetune.label_fraction: needs exactly one training dataset")
    if _launch_rank() == 0:
        summary = make_subset(cfg.data.dataset[0], cfg.finetune.label_fraction, cfg.train.seed, out)
        (run_dir / "label_subset.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    else:
        t = time.monotonic()
        while not (run_dir / "label_subset.json").is_file():
            if time.monotonic() - t > 1800:
                raise UserError(f"finetune.label_fraction: rank 0 did not write {out} within 30 minutes")
            time.sleep(1)
        summary = json.loads((run_dir / "label_subset.json").read_text(encoding="utf-8"))
    if summary.get("missing_classes"):
        log.warning("label subset: no training sample of class(es) %s", ", ".join(summary["missing_classes"]))
    return str(out), summary


def run_finetune(cfg, *, local_rank: int | None = None) -> dict:
    """Fine-tune (or resume) per a :class:`~vidssl.train.config.FinetuneConfig`; evaluate at the end if asked."""
    from vidssl.data.index import open_index  # noqa: PLC0415
    from vidssl.eval.evaluate import evaluate_classifier, views_loader_config, write_report  # noqa: PLC0415
    from vidssl.train.finetune import FinetuneTask  # noqa: PLC0415
    from vidssl.train.runner import preflight, run_training  # noqa: PLC0415

    pre = preflight(cfg)
    classes = pre.classes
    if not classes:
        raise UserError(f"data.dataset: {cfg.data.dataset} has no class list (index.json 'classes' is empty); "
                        f"fine-tuning needs labelled shards (vidssl shard from a manifest with a label column)")
    for d in cfg.data.dataset[1:]:
        _check_classes(classes, open_index(d).classes, f"data.dataset {d!r}")
    for d in cfg.eval.dataset:
        _check_classes(classes, open_index(d).classes, f"eval.dataset {d!r}")
    run_dir = Path(cfg.run.dir)
    run_cfg, subset = cfg, None
    if cfg.finetune.label_fraction < 1.0:
        run_dir.mkdir(parents=True, exist_ok=True)
        ds, subset = _subset_dataset(cfg, run_dir)
        run_cfg = cfg.replace(data=cfg.data.replace(dataset=[ds]).to_dict())
    holder: dict = {}

    def build(_loader):
        holder["task"] = FinetuneTask(cfg, len(classes))
        return holder["task"]

    summary = run_training(run_cfg, build, local_rank=local_rank, pre=pre, name="finetune")
    summary["loaded"] = holder["task"].loaded if "task" in holder else "?"
    summary["subset"] = subset
    if cfg.eval.dataset:
        engine = summary["engine"]
        task = engine.module
        task.eval()
        data_cfg = views_loader_config(cfg.eval.dataset, frames=cfg.data.frames, stride=cfg.data.stride,
                                       crop_size=cfg.data.crop_size, views=cfg.eval.views, crops=cfg.eval.crops,
                                       batch_size=cfg.eval.batch_size, workers=cfg.eval.workers,
                                       eval_resize=cfg.eval.eval_resize)
        report = evaluate_classifier(task.logits, data_cfg, classes, engine.device)
        report["step"] = summary["step"]
        if summary["rank"] == 0:
            write_report(report, run_dir)
            with (run_dir / "metrics.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": summary["step"], "kind": "eval", "top1": report["top1"],
                                    "top5": report["top5"], "mean_class_acc": report["mean_class_acc"]}) + "\n")
        summary["eval"] = report
    return summary


def _settings(items: list[str], allowed: dict[str, type]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise UserError(f"evaluate: unexpected argument {item!r}; allowed: {', '.join(f'{k}=...' for k in allowed)}")
        try:
            out[key] = allowed[key](value)
        except ValueError:
            raise UserError(f"evaluate: {key}: got {value!r}; expected {allowed[key].__name__}") from None
    return out


def _evaluate_cmd(args: argparse.Namespace) -> int:
    if args.knn:
        res = knn_evaluate(args.source, **_settings(args.settings, {
            "data": str, "train": str, "views": int, "batch_size": int, "workers": int, "k": int,
            "temperature": float, "model.backbone": str, "output": str, "frames": int, "stride": int,
            "crop_size": int}))
        print(f"kNN (k={res['k']}, T={res['temperature']}): top-1 {res['top1']:.4f}, top-5 {res['top5']:.4f} "
              f"({res['train']} train / {res['val']} val videos); written to {res['file']}")
        return 0
    res = evaluate_run(args.source, step=args.step, **_settings(args.settings, {
        "data": str, "views": int, "crops": int, "batch_size": int, "workers": int, "output": str}))
    print(f"evaluate: top-1 {res['top1']:.4f}, top-5 {res['top5']:.4f}, mean class {res['mean_class_acc']:.4f} "
          f"over {res['samples']} videos ({res['protocol']}); {res['files']['json']}, {res['files']['png']}")
    return 0


def evaluate_run(run: str, *, data: str | None = None, step: int | None = None, views: int | None = None,
                 crops: int | None = None, batch_size: int | None = None, workers: int | None = None,
                 output: str | None = None) -> dict:
    """Multi-view evaluation of a fine-tuning run's checkpoint on ``data`` (default: its eval.dataset)."""
    import torch  # noqa: PLC0415

    from vidssl.data.index import open_index  # noqa: PLC0415
    from vidssl.eval.evaluate import evaluate_classifier, views_loader_config, write_report  # noqa: PLC0415
    from vidssl.train.checkpoint import read_meta  # noqa: PLC0415
    from vidssl.train.config import FinetuneConfig  # noqa: PLC0415
    from vidssl.train.engine import consolidated_state_dict  # noqa: PLC0415
    from vidssl.train.finetune import FinetuneTask  # noqa: PLC0415

    ckpt = _find_checkpoint(run, step)
    meta = read_meta(ckpt)
    if "finetune" not in meta.get("config", {}):
        raise UserError(f"evaluate: {run!r} is not a fine-tuning run; for a pretraining run or a backbone file "
                        f"use --knn")
    cfg = FinetuneConfig.from_dict(meta["config"])
    ev = cfg.eval
    dataset = [data] if data else list(ev.dataset)
    if not dataset:
        raise UserError("evaluate: data=VAL is required (the run has no eval.dataset)")
    train_classes = open_index(cfg.data.dataset[0]).classes if Path(cfg.data.dataset[0]).exists() else None
    val_classes = open_index(dataset[0]).classes
    classes = train_classes or val_classes
    _check_classes(classes, val_classes, f"data {dataset[0]!r}")
    task = FinetuneTask(cfg.replace(finetune=cfg.finetune.replace(pretrained="none").to_dict()), len(classes))
    task.load_state_dict(consolidated_state_dict(ckpt), strict=True)
    task.eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    task.to(device)
    data_cfg = views_loader_config(dataset, frames=cfg.data.frames, stride=cfg.data.stride,
                                   crop_size=cfg.data.crop_size, views=views or ev.views, crops=crops or ev.crops,
                                   batch_size=batch_size or ev.batch_size,
                                   workers=ev.workers if workers is None else workers, eval_resize=ev.eval_resize)
    report = evaluate_classifier(task.logits, data_cfg, classes, device)
    report.update({"checkpoint": str(ckpt), "step": meta.get("step"), "dataset": dataset})
    out_dir = Path(output) if output else (ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent)
    report["files"] = write_report(report, out_dir)
    return report


def knn_evaluate(source: str, *, data: str | None = None, train: str | None = None, views: int = 1,
                 batch_size: int = 16, workers: int = 2, k: int = 20, temperature: float = 0.07,
                 output: str | None = None, frames: int | None = None, stride: int | None = None,
                 crop_size: int | None = None, **kw) -> dict:
    """kNN accuracy of a frozen backbone (pretraining run, exported file, or ``none``) on train/val shards."""
    import torch  # noqa: PLC0415

    from vidssl.data.index import open_index  # noqa: PLC0415
    from vidssl.eval.evaluate import extract_features, views_loader_config  # noqa: PLC0415
    from vidssl.eval.knn import knn_accuracy  # noqa: PLC0415
    from vidssl.models import build_backbone_from_config  # noqa: PLC0415
    from vidssl.models.base import clips_to_input  # noqa: PLC0415
    from vidssl.train.finetune import load_pretrained_backbone  # noqa: PLC0415

    if not data or not train:
        raise UserError("evaluate --knn: train=TRAIN_SHARDS and data=VAL_SHARDS are both required")
    model_cfg, data_defaults = _source_model(source, kw.get("model.backbone"))
    backbone = build_backbone_from_config(model_cfg)
    loaded = load_pretrained_backbone(backbone, source, model_cfg)
    backbone.eval()
    frames = frames or data_defaults.get("frames", 8)
    stride = stride or data_defaults.get("stride", 1)
    crop_size = crop_size or data_defaults.get("crop_size", 112)
    _check_classes(open_index(train).classes, open_index(data).classes, f"data {data!r}")

    def fn(clips: torch.Tensor) -> torch.Tensor:
        return backbone.forward_pooled(clips_to_input(clips, model_cfg.mean, model_cfg.std))

    def feats(ds: str):
        cfg = views_loader_config([ds], frames=frames, stride=stride, crop_size=crop_size, views=views, crops=1,
                                  batch_size=batch_size, workers=workers, eval_resize=max(crop_size, 8))
        return extract_features(fn, cfg, torch.device("cpu"))

    _, tf, tl = feats(train)
    _, vf, vl = feats(data)
    res = knn_accuracy(tf, tl, vf, vl, k=k, temperature=temperature)
    res.update({"source": source, "weights": loaded, "backbone": model_cfg.backbone})
    out_dir = Path(output) if output else (Path(source) if Path(source).is_dir() else Path("."))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "knn.json"
    path.write_text(json.dumps(res, indent=1), encoding="utf-8")
    res["file"] = str(path)
    return res


def _source_model(source: str, backbone: str | None):
    """(ModelConfig, data settings) of a knn source: a run's config, an export's sidecar, or defaults."""
    import yaml  # noqa: PLC0415

    from vidssl.models.config import ModelConfig  # noqa: PLC0415
    from vidssl.train.checkpoint import read_meta  # noqa: PLC0415

    p = Path(source)
    if source.strip().lower() == "none":
        return ModelConfig(backbone=backbone or "cnn3d_small"), {}
    if p.is_file():
        side = p.with_suffix(".yaml")
        model = (yaml.safe_load(side.read_text(encoding="utf-8")) or {}).get("model", {}) if side.is_file() else {}
        if backbone:
            model = {**model, "backbone": backbone}
        return ModelConfig.from_dict(model, _path="model"), {}
    meta = read_meta(_find_checkpoint(source, None))
    conf = meta.get("config", {})
    return ModelConfig.from_dict(conf.get("model", {}), _path="model"), conf.get("data", {})
