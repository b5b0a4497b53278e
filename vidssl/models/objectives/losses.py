"""Loss functions shared by the objectives."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["info_nce"]


def info_nce(queries: torch.Tensor, keys: torch.Tensor, positives: torch.Tensor,
             temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE: each query must pick its positive among all keys.

    Args:
        queries: ``(M, E)``; keys: ``(K, E)`` (normalise both first for cosine similarity).
        positives: int64 ``(M,)``, index into ``keys`` of each query's positive; every other key
            is a negative.
        temperature: logits are ``queries @ keys.T / temperature``.

    Returns:
        ``(loss, accuracy)``: the mean over queries of ``-log softmax(logits)[positive]``, and the
        fraction of queries whose highest-scoring key is the positive (both scalars; accuracy
        detached). Chance loss is ``log K``. Computed in float32 even under bf16 autocast.
    """
    t = temperature
    if not isinstance(t, torch.Tensor):  # a tensor (a learned temperature) keeps its graph
        t = float(t)
        if not (t > 0.0 and math.isfinite(t)):  # 0 gives inf/nan logits, < 0 rewards the negatives
            raise ValueError(f"temperature: got {temperature!r}; allowed: a finite number > 0")
    # Autocast would cast the matmul back to bf16/fp16: switch it off for the logits and softmax.
    with torch.autocast(queries.device.type, enabled=False):
        logits = queries.float() @ keys.float().t() / t  # (M, K)
        loss = F.cross_entropy(logits, positives)
    acc = (logits.detach().argmax(dim=1) == positives).float().mean()
    return loss, acc
