"""Test-time metrics: multi-view merging, one row per sample across ranks, reports, confusion plots.

The protocol matches VideoMAE / V-JEPA so numbers compare with papers: each test video is seen as
V = K temporal clips × 1 or 3 spatial crops, each view is soft-maxed on its own and the V
probability vectors are averaged (:func:`merge_views`). Unlike VideoMAE's merge (which divides by
``views - 1``), a single view (1×1) is fine here.

When the sampler pads the last batches so every rank runs the same number of steps, some samples
are seen twice. Rows carry a ``valid`` flag (False on padding) and a key (the sample's id);
:func:`gather_eval_rows` brings every rank's rows to every rank and :func:`dedupe` keeps each
sample exactly once, in key order, so the report does not depend on the world size.

All functions are pure: tensors in, plain Python (or CPU tensors) out.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = [
    "merge_views",
    "dedupe",
    "gather_eval_rows",
    "topk_correct",
    "classification_report",
    "plot_confusion",
]


def merge_views(logits: torch.Tensor) -> torch.Tensor:
    """Multi-view test: softmax over classes per view, then the mean over views.

    Args:
        logits: (B, V, C) raw scores of B samples, V views each (V = clips × crops, V >= 1).

    Returns:
        (B, C) float32 class probabilities (each row sums to 1). Averaging probabilities, not
        logits, is what VideoMAE and V-JEPA report; the two differ whenever views disagree.
    """
    if logits.ndim != 3:
        raise ValueError(f"merge_views expects logits of shape (B, V, C), got {tuple(logits.shape)}")
    if logits.shape[1] < 1 or logits.shape[2] < 1:
        raise ValueError(f"merge_views needs at least one view and one class, got {tuple(logits.shape)}")
    probs = torch.softmax(logits.float(), dim=-1)  # (B, V, C)
    return probs.mean(dim=1)  # (B, C)


def _as_bool_valid(valid: torch.Tensor | None, n: int) -> torch.Tensor:
    """(n,) bool CPU tensor: ``valid`` checked for length, or all True when None."""
    if valid is None:
        return torch.ones(n, dtype=torch.bool)
    valid = torch.as_tensor(valid).detach().cpu().reshape(-1).bool()
    if valid.numel() != n:
        raise ValueError(f"valid has {valid.numel()} entries for {n} rows")
    return valid


def _check_rows(keys: Sequence[str], probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.ndim != 2:
        raise ValueError(f"probs must be (N, C), got {tuple(probs.shape)}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be (N,), got {tuple(labels.shape)}")
    if not (len(keys) == probs.shape[0] == labels.shape[0]):
        raise ValueError(f"row counts differ: {len(keys)} keys, {probs.shape[0]} probs, {labels.shape[0]} labels")


def dedupe(
    keys: Sequence[str],
    probs: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Each sample exactly once: drop padding rows, keep the first row per key, sort by key.

    Args:
        keys: N sample ids (e.g. the video's path in the dataset); repeated when a sample was
            seen more than once (padding, or the same row gathered from several ranks).
        probs: (N, C) merged class probabilities (or any per-row scores).
        labels: (N,) integer true classes.
        valid: (N,) bool, False on rows the sampler added as padding; None = all valid.

    Returns:
        ``(keys, probs, labels)`` with M <= N unique keys in sorted order: a list of M str,
        (M, C) and (M,) CPU tensors. Rows are taken in input order, so the first valid row of a
        key wins (padded repeats are the same clips, hence the same probabilities).

    Raises:
        ValueError: if the same key has two different labels among its valid rows (the error
            names the key), or if the lengths disagree.
    """
    keys = [str(k) for k in keys]
    probs = probs.detach().cpu()
    labels = labels.detach().cpu()
    _check_rows(keys, probs, labels)
    valid_t = _as_bool_valid(valid, len(keys))

    first: dict[str, int] = {}  # key -> index of its first valid row
    for i, key in enumerate(keys):
        if not valid_t[i]:
            continue
        j = first.setdefault(key, i)
        if j != i and int(labels[j]) != int(labels[i]):
            raise ValueError(f"sample {key!r} appears with two labels: {int(labels[j])} and {int(labels[i])}")

    order = [first[k] for k in sorted(first)]  # row indices in key order
    index = torch.tensor(order, dtype=torch.long)
    return sorted(first), probs[index], labels[index]


def gather_eval_rows(
    keys: Sequence[str],
    probs: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor | None = None,
) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every rank's evaluation rows, on every rank (then call :func:`dedupe`).

    Uses ``torch.distributed.all_gather_object`` when a process group is initialised with world
    size > 1 (a collective: every rank must call it); otherwise returns its own rows. Rows are
    concatenated in rank order; tensors travel as CPU tensors (object gathers pickle them).

    Args:
        keys: N_r sample ids of this rank.
        probs: (N_r, C) class probabilities of this rank.
        labels: (N_r,) true classes.
        valid: (N_r,) bool padding mask, None = all valid.

    Returns:
        ``(keys, probs, labels, valid)``: a list of N str, (N, C), (N,), (N,) bool CPU tensors with
        N = sum of N_r over ranks (N = N_r without a process group).
    """
    keys = [str(k) for k in keys]
    probs = probs.detach().cpu()
    labels = labels.detach().cpu()
    _check_rows(keys, probs, labels)
    valid_t = _as_bool_valid(valid, len(keys))

    import torch.distributed as dist  # noqa: PLC0415

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return keys, probs, labels, valid_t

    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (keys, probs, labels, valid_t))
    out_keys = [k for part in parts for k in part[0]]
    return (
        out_keys,
        torch.cat([p[1] for p in parts], dim=0),  # (N, C)
        torch.cat([p[2] for p in parts], dim=0),  # (N,)
        torch.cat([p[3] for p in parts], dim=0),  # (N,)
    )


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) bool: whether the true label is among the k highest scores (k clipped to C).

    Args:
        scores: (N, C) probabilities or any scores (higher = more likely).
        labels: (N,) integer true classes.
        k: how many top classes count (k >= 1).
    """
    k = max(1, min(int(k), scores.shape[1]))
    top = scores.topk(k, dim=1).indices  # (N, k)
    return (top == labels.reshape(-1, 1).to(top.device)).any(dim=1)


def classification_report(
    probs: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """Accuracy figures of one deduplicated evaluation, JSON-ready.

    Args:
        probs: (N, C) class probabilities (one row per sample, e.g. from :func:`dedupe`).
        labels: (N,) integer true classes in [0, C).
        class_names: C names, index i naming class i.

    Returns:
        A dict with

        - ``samples``: N;
        - ``top1``, ``top5``: fractions in [0, 1]; ``top5`` is top-k with ``k = min(5, C)``, and
          ``top5_k`` says which k was used;
        - ``mean_class_acc``: the mean, over classes that have samples, of per-class recall;
        - ``per_class``: ``{name: {"samples": n, "acc": recall}}`` for every class (``acc`` is None
          when the class has no samples);
        - ``confusion``: C×C list of lists of int, rows = true class, columns = predicted (top-1);
        - ``classes``: the class names in index order;
        - ``missing_classes``: names of classes with no samples.
    """
    probs = probs.detach().cpu()
    labels = labels.detach().cpu().reshape(-1).long()
    names = [str(n) for n in class_names]
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs (N, C) and labels (N,) disagree: {tuple(probs.shape)} vs {tuple(labels.shape)}")
    n, c = probs.shape
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} classes")
    if len(set(names)) != c:
        raise ValueError("class names must be unique")
    if n == 0:
        raise ValueError("no samples to report on")
    if int(labels.min()) < 0 or int(labels.max()) >= c:
        raise ValueError(f"labels must lie in [0, {c}), got [{int(labels.min())}, {int(labels.max())}]")

    pred = probs.argmax(dim=1)  # (N,)
    confusion = torch.bincount(labels * c + pred, minlength=c * c).reshape(c, c)  # (C, C) true x pred
    per_class_n = confusion.sum(dim=1)  # (C,)
    per_class_hit = confusion.diagonal()  # (C,)
    k5 = min(5, c)

    per_class: dict[str, dict[str, Any]] = {}
    recalls = []
    for i, name in enumerate(names):
        count = int(per_class_n[i])
        acc = float(per_class_hit[i]) / count if count else None
        if acc is not None:
            recalls.append(acc)
        per_class[name] = {"samples": count, "acc": acc}

    return {
        "samples": n,
        "top1": float((pred == labels).float().mean()),
        "top5": float(topk_correct(probs, labels, k5).float().mean()),
        "top5_k": k5,
        "mean_class_acc": sum(recalls) / len(recalls),
        "per_class": per_class,
        "confusion": confusion.tolist(),
        "classes": names,
        "missing_classes": [name for i, name in enumerate(names) if int(per_class_n[i]) == 0],
    }


#: Counts are written in the cells up to this many classes.
ANNOTATE_MAX = 30
#: Every class name is a tick label up to this many classes; above, ticks are class indices.
NAMES_MAX = 100


def _short(name: str, limit: int = 28) -> str:
    """``name`` cut in the middle to ``limit`` characters (class names often differ at the end)."""
    if len(name) <= limit:
        return name
    head = (limit - 1) // 2
    return name[:head] + "…" + name[len(name) - (limit - 1 - head):]


def plot_confusion(
    confusion: Any,
    class_names: Sequence[str],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Write a confusion matrix as a PNG (matplotlib, Agg, no pyplot state) and return its path.

    Colours are row-normalised (each true class's row sums to 1, so rare classes are as readable
    as frequent ones); counts are written in the cells when C <= 30. Class names (cut in the
    middle past 28 characters) label the axes up to 100 classes, x labels rotated 45° (90° past
    20 classes); above that the ticks are class indices. The figure grows with C up to a 20-inch matrix
    (2,350 × 2,250 px at 100 dpi); a few hundred classes are fine.

    Args:
        confusion: C×C counts (list of lists, array or tensor), rows = true, columns = predicted.
        class_names: C names.
        path: output PNG; its folder is created.
        title: figure title; default "confusion matrix (row-normalised), N samples, top-1 x%".
    """
    import numpy as np  # noqa: PLC0415
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    counts = np.asarray(confusion.tolist() if hasattr(confusion, "tolist") else confusion, dtype=np.int64)
    c = len(class_names)
    if counts.shape != (c, c):
        raise ValueError(f"confusion of shape {counts.shape} for {c} class names")
    rows = counts.sum(axis=1, keepdims=True)  # (C, 1)
    norm = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=np.float64), where=rows > 0)  # (C, C)

    side = float(min(20.0, max(4.0, 2.0 + 0.25 * c)))  # inches of the matrix itself
    cell = 72.0 * side / max(c, 1)  # points per cell
    # Constrained layout (unlike tight_layout) makes room for rotated labels and the colour bar.
    fig = Figure(figsize=(side + 3.5, side + 2.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest", aspect="equal")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")

    if c <= NAMES_MAX:
        labels = [_short(n) for n in map(str, class_names)]
        size = max(4.0, min(10.0, 0.7 * cell))
        ax.set_xticks(range(c))
        ax.set_yticks(range(c))
        steep = c > 20  # vertical names cannot overlap: each gets one cell's width
        ax.set_xticklabels(labels, rotation=90 if steep else 45, ha="right", va="center" if steep else "top",
                           rotation_mode="anchor", fontsize=size)
        ax.set_yticklabels(labels, fontsize=size)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    else:
        step = max(1, int(math.ceil(c / 20 / 10)) * 10)  # about 20 index ticks: 0, 10, 20... or 0, 20...
        ticks = list(range(0, c, step))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
        ax.tick_params(labelsize=8)
        ax.set_xlabel("predicted (class index)")
        ax.set_ylabel("true (class index)")

    if c <= ANNOTATE_MAX:
        size = max(5.0, min(10.0, 0.4 * cell))
        for i in range(c):
            for j in range(c):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=size,
                            color="white" if norm[i, j] > 0.5 else "black")

    total = int(counts.sum())
    acc = float(np.trace(counts)) / total if total else 0.0
    ax.set_title(title or f"confusion matrix (row-normalised), {total} samples, top-1 {100 * acc:.1f}%")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
