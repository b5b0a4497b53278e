"""Running models over labelled shards: multi-view classification and frozen features (kNN).

:func:`evaluate_classifier` is the protocol papers use: K evenly spaced clips × 1 or 3 crops per
video, softmax per view, then averaged; every validation sample counted exactly once even when
ranks pad (deduplicated by key), top-1, top-5, mean per-class accuracy, a confusion matrix.
:func:`extract_features` gives L2-normalisable pooled backbone features (mean over views) for the
kNN monitor. Both work in one process or on every rank of a process group (rows are gathered).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch

from vidssl.data.config import DataConfig
from vidssl.fsio import atomic_write_json

log = logging.getLogger("vidssl.eval")

__all__ = ["views_loader_config", "evaluate_classifier", "extract_features", "write_report"]


def views_loader_config(dataset: list[str], *, frames: int, stride: int, crop_size: int, views: int, crops: int,
                        batch_size: int, workers: int, eval_resize: int) -> DataConfig:
    """The loader of multi-view evaluation: fixed (not random) clips and crops, no shuffle, every sample once."""
    return DataConfig(dataset=dataset, mode="views", views=views, eval_crops=crops, frames=frames, stride=stride,
                      augment="eval", crop_size=crop_size, eval_resize=eval_resize, shuffle=False, drop_last=False,
                      batch_size=batch_size, workers=workers, short="loop", seed=0)


def _rank_world() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


@torch.no_grad()
def _run_views(fn: Callable[[torch.Tensor], torch.Tensor], data_cfg: DataConfig, device) -> tuple[list, Any, Any, Any]:
    """Apply ``fn`` (uint8 clips (N, T, C, H, W) → (N, X)) to every view; → keys, (B, V, X) outputs, labels, valid."""
    from vidssl.data import build_loader  # noqa: PLC0415

    rank, world = _rank_world()
    loader = build_loader(data_cfg, rank=rank, world_size=world)
    keys: list[str] = []
    outs, labels, valid = [], [], []
    try:
        loader.set_epoch(0)
        for batch in loader:
            video = batch["video"]  # (B, V, T, C, H, W) uint8
            b, v = video.shape[:2]
            y = fn(video.reshape(b * v, *video.shape[2:]).to(device, non_blocking=True)).float().cpu()
            outs.append(y.reshape(b, v, -1))
            keys.extend(batch["key"])
            labels.append(batch["label"].long())
            valid.append(batch["valid"].bool() if "valid" in batch else torch.ones(b, dtype=torch.bool))
    finally:
        loader.close()
    return keys, torch.cat(outs), torch.cat(labels), torch.cat(valid)


def evaluate_classifier(logits_fn: Callable[[torch.Tensor], torch.Tensor], data_cfg: DataConfig,
                        classes: list[str], device) -> dict[str, Any]:
    """Multi-view accuracy of ``logits_fn`` (uint8 clips → logits) over ``data_cfg`` (see :func:`views_loader_config`)."""
    from vidssl.eval.metrics import classification_report, dedupe, gather_eval_rows, merge_views  # noqa: PLC0415

    keys, logits, labels, valid = _run_views(logits_fn, data_cfg, device)
    probs = merge_views(logits)  # (B, C): softmax per view, then the mean
    keys, probs, labels, valid = gather_eval_rows(keys, probs, labels, valid)
    keys, probs, labels = dedupe(keys, probs, labels, valid)
    report = classification_report(probs, labels, classes)
    report["views"] = int(data_cfg.views) * int(data_cfg.eval_crops)
    report["protocol"] = f"{data_cfg.views} clips x {data_cfg.eval_crops} crops, softmax averaged"
    return report


def extract_features(backbone_fn: Callable[[torch.Tensor], torch.Tensor], data_cfg: DataConfig,
                     device) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Pooled features (mean over views) of every sample, once, in key order: keys, (N, D), labels (N,)."""
    from vidssl.eval.metrics import dedupe, gather_eval_rows  # noqa: PLC0415

    keys, feats, labels, valid = _run_views(backbone_fn, data_cfg, device)
    feats = feats.mean(dim=1)  # (B, D)
    keys, feats, labels, valid = gather_eval_rows(keys, feats, labels, valid)
    return dedupe(keys, feats, labels, valid)


def write_report(report: dict[str, Any], out_dir: Path, name: str = "eval") -> dict[str, str]:
    """``{name}.json`` and ``{name}_confusion.png`` in ``out_dir``."""
    from vidssl.eval.metrics import plot_confusion  # noqa: PLC0415

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    atomic_write_json(path, report)
    png = plot_confusion(report["confusion"], report["classes"], out_dir / f"{name}_confusion.png",
                         title=f"top-1 {report['top1']:.3f}, mean class {report['mean_class_acc']:.3f}")
    return {"json": str(path), "png": str(png)}
