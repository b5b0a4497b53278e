"""Weighted k-nearest-neighbour classification of frozen features (the DINO kNN monitor).

Both feature sets are L2-normalised, so similarity is the cosine; each query takes its k most
similar training features and every neighbour votes for its label with weight
``exp(sim / temperature)`` (DINO: k = 20, temperature 0.07). A few very close neighbours can
outvote many far ones, unlike a plain majority vote.

Scores are accumulated in float64: ``exp(1 / T)`` overflows float32 below T ≈ 0.0113, float64
only below T ≈ 0.0014.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vidssl.eval.metrics import topk_correct

__all__ = ["knn_classify", "knn_accuracy"]


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 4096,
) -> torch.Tensor:
    """Class scores of each query from its k nearest training features, weighted as in DINO.

    Args:
        train_feats: (N, D) training features (any scale: they are L2-normalised here).
        train_labels: (N,) integer classes in [0, num_classes).
        query_feats: (M, D) features to classify (normalised here too).
        k: neighbours per query; clipped to N.
        temperature: T > 0 in the vote weight ``exp(cos_sim / T)``.
        num_classes: C; default ``max(train_labels) + 1``.
        chunk: queries per similarity block, bounding memory to a (chunk, N) matrix.

    Returns:
        (M, C) float64 scores on ``train_feats``' device: ``scores[m, c]`` is the sum of
        ``exp(sim / T)`` over the neighbours of query m whose label is c (0 when none is).
    """
    if train_feats.ndim != 2 or query_feats.ndim != 2:
        shapes = f"{tuple(train_feats.shape)}, {tuple(query_feats.shape)}"
        raise ValueError(f"features must be (N, D) and (M, D), got {shapes}")
    if train_feats.shape[1] != query_feats.shape[1]:
        raise ValueError(f"feature widths differ: {train_feats.shape[1]} vs {query_feats.shape[1]}")
    n = train_feats.shape[0]
    if n == 0:
        raise ValueError("no training features")
    train_labels = train_labels.reshape(-1).long().to(train_feats.device)  # (N,)
    if train_labels.numel() != n:
        raise ValueError(f"{train_labels.numel()} labels for {n} training features")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if int(train_labels.min()) < 0:
        raise ValueError("labels must be >= 0")
    c = int(train_labels.max()) + 1 if num_classes is None else int(num_classes)
    if int(train_labels.max()) >= c:
        raise ValueError(f"label {int(train_labels.max())} out of range for {c} classes")
    k = max(1, min(int(k), n))
    chunk = max(1, int(chunk))

    train = F.normalize(train_feats.float(), dim=1)  # (N, D)
    out = []
    for start in range(0, query_feats.shape[0], chunk):
        q = F.normalize(query_feats[start : start + chunk].float().to(train.device), dim=1)  # (b, D)
        sim, idx = (q @ train.T).topk(k, dim=1)  # (b, k), (b, k)
        weights = torch.exp(sim.double() / temperature)  # (b, k)
        votes = train_labels[idx]  # (b, k)
        scores = torch.zeros(q.shape[0], c, dtype=torch.float64, device=train.device)  # (b, C)
        out.append(scores.scatter_add_(1, votes, weights))
    if not out:
        return torch.zeros(0, c, dtype=torch.float64, device=train.device)
    return torch.cat(out, dim=0)  # (M, C)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> dict[str, Any]:
    """Top-1 / top-5 kNN accuracy of validation features against a training bank.

    Args:
        train_feats: (N, D), train_labels: (N,): the bank.
        val_feats: (M, D), val_labels: (M,): the queries, M >= 1.
        k, temperature: as in :func:`knn_classify`.

    Returns:
        ``{"top1", "top5", "k", "temperature", "train", "val"}``: accuracies in [0, 1] (top-5 is
        top-min(5, C)), the k actually used (clipped to N), the temperature, N and M. C counts
        the classes of both label sets, so a validation class absent from the bank just scores 0.
    """
    val_labels = val_labels.reshape(-1).long()
    m = val_labels.numel()
    if m == 0 or val_feats.shape[0] != m:
        raise ValueError(f"{val_feats.shape[0]} validation features for {m} labels (need at least one)")
    c = max(int(train_labels.max()), int(val_labels.max())) + 1
    scores = knn_classify(train_feats, train_labels, val_feats, k=k, temperature=temperature, num_classes=c)  # (M, C)
    val_labels = val_labels.to(scores.device)
    return {
        "top1": float(topk_correct(scores, val_labels, 1).double().mean()),
        "top5": float(topk_correct(scores, val_labels, 5).double().mean()),
        "k": max(1, min(int(k), train_feats.shape[0])),
        "temperature": float(temperature),
        "train": int(train_feats.shape[0]),
        "val": m,
    }
