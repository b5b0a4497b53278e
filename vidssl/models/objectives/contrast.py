"""Temporal contrast (``objectives.contrast``): two windows of the same video attract, all others repel.

Both windows (``context`` and ``other``, a second window of the same video at a random temporal
offset) are encoded by the backbone, pooled over time and space ``(B, D)``, projected by an MLP
and L2-normalised ``(B, E)``. InfoNCE: each context embedding must pick its own video's other
window among the other windows of **every clip in the global batch** (gathered across ranks with
gradient, :func:`~vidssl.models.distributed.gather_with_grad`), and — with ``symmetric`` — the
other way round. Chance loss is ``log(W*B)``; ``acc`` is the positive-retrieval accuracy.

``negatives: batch+reversed`` adds, for the context → other direction, every other window played
backwards: the same frames with the opposite motion, so the embedding must carry the direction of
motion, not only what the video looks like (chance ``log(2*W*B)``). docs/ssl.md has the measurements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidssl.models.distributed import gather_with_grad, get_rank
from vidssl.models.heads import ProjectionMLP
from vidssl.models.objectives.losses import info_nce
from vidssl.models.objectives.views import Views

__all__ = ["TemporalContrast", "contrastive_loss"]


def contrastive_loss(a: torch.Tensor, b: torch.Tensor, temperature: float, symmetric: bool = True,
                     extra: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """InfoNCE between paired embeddings ``a, b (B, E)`` (row i of ``a`` matches row i of ``b``).

    Keys are gathered from all ranks; the loss is the mean over this rank's rows (see
    :mod:`vidssl.models.distributed` for why this gives the single-process gradient).
    ``extra`` ``(B', E)``: more negatives for the ``a → b`` direction (gathered too).
    Returns ``(loss, accuracy, number of keys)``.
    """
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    n = a.shape[0]
    pos = get_rank() * n + torch.arange(n, device=a.device)  # own rows within the gathered keys
    keys_b = gather_with_grad(b)  # (W*B, E)
    if extra is not None:  # appended after the positives' block, so their indices stay
        keys_b = torch.cat([keys_b, gather_with_grad(F.normalize(extra.float(), dim=-1))], dim=0)
    loss, acc = info_nce(a, keys_b, pos, temperature)
    if symmetric:
        loss2, acc2 = info_nce(b, gather_with_grad(a), pos, temperature)
        loss, acc = 0.5 * (loss + loss2), 0.5 * (acc + acc2)
    return loss, acc, keys_b.shape[0]


class TemporalContrast(nn.Module):
    """Projection MLP + InfoNCE between the context and other windows; returns ``loss``, ``acc``, ``chance``."""

    def __init__(self, cfg, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.proj = ProjectionMLP(embed_dim, cfg.proj_hidden, cfg.proj_dim)

    def forward(self, views: Views) -> dict[str, torch.Tensor]:
        za = self.proj(views.features("context").mean(dim=1))  # (B, E)
        zb = self.proj(views.features("other").mean(dim=1))  # (B, E)
        extra = None
        if self.cfg.negatives == "batch+reversed":
            extra = self.proj(views.reversed_features("other").mean(dim=1))  # (B, E): same frames, backwards
        loss, acc, keys = contrastive_loss(za, zb, self.cfg.temperature, self.cfg.symmetric, extra)
        return {"loss": loss, "acc": acc, "chance": torch.tensor(float(keys), device=za.device).log()}
