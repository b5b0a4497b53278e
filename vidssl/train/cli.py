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
import json
import logging
from pathlib import Path

from vidssl.errors import UserError

log = logging.getLogger("vidssl.train")

__all__ = ["register", "run_pretrain", "dry_run", "export_run"]


def register(sub) -> None:
    from vidssl.cli import add_command  # noqa: PLC0415

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
                                "FILE.yaml with the model config. torchvision backbones (r3d_18, r2plus1d_18, "
                                "mc3_18) load with strict=True into torchvision's model once its classifier is "
                                "replaced: m = r3d_18(); m.fc = torch.nn.Identity(); m.load_state_dict(sd).")
    e.add_argument("run", help="run folder (runs/NAME) or one checkpoint folder")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    e.add_argument("-o", "--output", default=None,
                   help="output file (default RUN/export/backbone-step_XXXXXXXX.pt)")
    e.set_defaults(func=_export_cmd)


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
    return run_training(cfg, lambda _loader: PretrainTask(cfg.model, cfg.objectives, cfg.train),
                        local_rank=local_rank, pre=pre, name="pretrain")


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
    print(f"device {pre.device}, world size {pre.world_size}, {pre.samples} samples, resume: {out['resume_from']}")
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
    from vidssl.train.checkpoint import META, complete_checkpoints, tag_for  # noqa: PLC0415

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
    tmp = out.with_name(out.name + ".tmp")
    torch.save(sd, tmp)
    tmp.replace(out)
    side = out.with_suffix(".yaml")
    side.write_text(yaml.safe_dump({
        "model": model_cfg, "source": {"checkpoint": str(ckpt), "step": meta.get("step"),
                                       "precision": meta.get("precision"), "zero_stage": meta.get("zero_stage"),
                                       "git": git_sha()}}, sort_keys=False), encoding="utf-8")
    return {"file": str(out), "config": str(side), "checkpoint": str(ckpt), "tensors": len(sd),
            "parameters": sum(v.numel() for v in sd.values()), "backbone": model_cfg.get("backbone")}
