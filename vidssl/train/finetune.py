"""Fine-tuning for action recognition: config, the task the shared loop trains, pretrained weights.

Modes (``finetune.mode``):

- ``linear``: the backbone is frozen and kept in eval mode; a BatchNorm (no affine) + linear head
  on the pooled features (MAE/MemDPC-style linear probe);
- ``attentive``: frozen backbone; one cross-attention block with a learned query over the
  backbone's space-time tokens, then a linear layer (V-JEPA's attentive probe);
- ``full``: every weight trained, with layer-wise lr decay ``decay^(L+1-i)`` (embeddings i=0, block /
  stage i, head L+1), label smoothing, mixup/cutmix on whole clips (one mix for every frame of a
  clip) and drop path where the backbone has it (``model.backbone_kwargs.drop_path``).

``finetune.pretrained``: a pretraining run folder (its newest checkpoint, consolidated), an exported
file (``vidssl export``), or ``none`` (random initialisation: the from-scratch baseline).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vidssl.errors import UserError
from vidssl.models.base import clips_to_input
from vidssl.models.vit import Block
from vidssl.train.config import FinetuneConfig
from vidssl.train.task import decay_groups

log = logging.getLogger("vidssl.train")

__all__ = ["FinetuneTask", "AttentiveProbe", "load_pretrained_backbone", "layer_ids"]


# ---- pretrained weights ---------------------------------------------------------------------------

def load_pretrained_backbone(backbone, pretrained: str, model_cfg) -> str:
    """Load ``pretrained`` (run folder, checkpoint folder, exported file or ``none``) into ``backbone``.

    Returns a description of what was loaded. A backbone name or shape mismatch is a UserError naming
    both names or the mismatched keys.
    """
    from vidssl.models.registry import load_state, load_weights  # noqa: PLC0415

    if pretrained.strip().lower() == "none":
        return "random initialisation"
    p = Path(pretrained)
    if not p.exists():
        raise UserError(f"finetune.pretrained: {pretrained!r} does not exist; allowed: a pretraining run folder, "
                        f"an exported .pt file, or none")
    if p.is_file():
        side = p.with_suffix(".yaml")
        if side.is_file():
            import yaml  # noqa: PLC0415

            saved = (yaml.safe_load(side.read_text(encoding="utf-8")) or {}).get("model", {}) or {}
            _check_backbone(saved.get("backbone"), model_cfg.backbone, pretrained)
        load_weights(backbone, p, key="finetune.pretrained")
        return f"exported weights {p}"
    from vidssl.train.checkpoint import META, complete_checkpoints, read_meta  # noqa: PLC0415
    from vidssl.train.engine import consolidated_state_dict  # noqa: PLC0415

    if (p / META).is_file():
        ckpt = p
    else:
        found = complete_checkpoints(p / "checkpoints") or complete_checkpoints(p)
        if not found:
            raise UserError(f"finetune.pretrained: {pretrained!r} holds no complete checkpoint and is not a file")
        ckpt = found[-1][1]
    meta = read_meta(ckpt)
    _check_backbone(meta.get("config", {}).get("model", {}).get("backbone"), model_cfg.backbone, pretrained)
    full = consolidated_state_dict(ckpt)
    sd = {k[len("model.backbone."):]: v for k, v in full.items() if k.startswith("model.backbone.")}
    if not sd:
        raise UserError(f"finetune.pretrained: checkpoint {ckpt} holds no pretraining backbone (model.backbone.*)")
    try:
        with torch.no_grad():
            load_state(backbone, sd, str(ckpt), key="finetune.pretrained")
    except UserError as exc:
        raise UserError(f"finetune.pretrained: {ckpt} does not fit backbone {model_cfg.backbone}: {exc}") from None
    return f"pretraining checkpoint {ckpt} (step {meta.get('step')})"


def _check_backbone(saved: str | None, wanted: str, where: str) -> None:
    if saved and saved != wanted:
        raise UserError(f"finetune.pretrained: {where!r} holds a {saved!r} backbone but model.backbone is "
                        f"{wanted!r}; set model.backbone={saved}")


# ---- layer-wise lr decay ----------------------------------------------------------------------------

def layer_ids(backbone) -> tuple[dict[str, int], int]:
    """``({parameter name: layer id}, L)`` for layer-wise lr decay; the head is layer ``L + 1``.

    ViT: positions and patch embedding 0, block i → i + 1, final norm L + 1 (VideoMAE).
    torchvision ResNets: stem 0, layer k → k (L = 4). ``cnn3d_small``: stage k → k (L = 3).
    Other backbones: every parameter layer 0 (one scale for the whole backbone).
    """
    names = [n for n, _ in backbone.named_parameters()]
    if hasattr(backbone, "blocks"):
        depth = len(backbone.blocks)
        out = {}
        for n in names:
            if n.startswith("blocks."):
                out[n] = int(n.split(".")[1]) + 1
            elif n.startswith(("pos", "patch_embed")):
                out[n] = 0
            else:
                out[n] = depth + 1
        return out, depth
    if hasattr(backbone, "layer4"):
        return {n: (int(n[5]) if n.startswith("layer") else 0) for n in names}, 4
    if hasattr(backbone, "stages"):
        depth = len(backbone.stages) - 1
        return {n: int(n.split(".")[1]) for n in names}, depth
    return {n: 0 for n in names}, 0


# ---- the task ---------------------------------------------------------------------------------------

class AttentiveProbe(nn.Module):
    """One learned query cross-attends to the tokens (B, N, D) → (B, D) (V-JEPA's attentive probe)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.block = Block(dim, heads, cross=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        q = self.query.expand(tokens.shape[0], -1, -1)
        return self.norm(self.block(q, tokens))[:, 0]

class FinetuneTask(nn.Module):
    """Backbone + head trained on labelled clips; ``forward(batch) -> {"loss", "acc"}``.

    ``logits(clips)`` maps uint8 clips ``(B, T, C, H, W)`` to ``(B, classes)`` (evaluation).
    """

    def __init__(self, cfg: FinetuneConfig, num_classes: int) -> None:
        super().__init__()
        from vidssl.models import build_backbone_from_config  # noqa: PLC0415

        self.cfg = cfg.finetune
        self.mean, self.std = tuple(cfg.model.mean), tuple(cfg.model.std)
        self.num_classes = num_classes
        self.backbone = build_backbone_from_config(cfg.model)
        self.loaded = load_pretrained_backbone(self.backbone, self.cfg.pretrained, cfg.model)
        self.frozen = self.cfg.mode in ("linear", "attentive")
        if self.frozen:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
        d = self.backbone.embed_dim
        self.probe = AttentiveProbe(d, self.cfg.attentive_heads) if self.cfg.mode == "attentive" else None
        norm = [nn.BatchNorm1d(d, affine=False)] if (self.cfg.mode == "linear" and self.cfg.head_norm) else []
        hc = cfg.model.head
        if hc.kind == "mlp":
            layers = [nn.Linear(d, hc.hidden_dim), nn.GELU(), nn.Dropout(hc.dropout), nn.Linear(hc.hidden_dim,
                                                                                                 num_classes)]
        else:
            layers = [nn.Dropout(hc.dropout), nn.Linear(d, num_classes)]
        self.head = nn.Sequential(*norm, *layers)
        self.train()  # frozen backbones go to eval mode now, not only when someone calls train()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # frozen statistics and no drop path
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float (B, C, T, H, W) → what the head reads: (B, D)."""
        if self.frozen:
            with torch.no_grad():
                tokens = self.backbone.forward_tokens(x) if self.probe is not None else None
                pooled = self.backbone.forward_pooled(x) if self.probe is None else None
        else:
            tokens = None
            pooled = self.backbone.forward_pooled(x)
        if self.probe is not None:
            b = tokens.shape[0]
            return self.probe(tokens.reshape(b, -1, tokens.shape[-1]))  # (B, T'*N, D) → (B, D)
        return pooled

    def logits(self, clips: torch.Tensor) -> torch.Tensor:
        dtype = next(self.head.parameters()).dtype
        x = clips_to_input(clips, self.mean, self.std, dtype=dtype)  # (B, C, T, H, W)
        return self.head(self.features(x).to(dtype))

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        clips, labels = batch["video"], batch["label"].long()  # (B, T, C, H, W) uint8, (B,)
        if bool((labels < 0).any()):
            raise UserError("finetune: a training sample has no label (-1); fine-tuning needs labelled shards")
        target = F.one_hot(labels, self.num_classes).float()
        if self.training and (self.cfg.mixup or self.cfg.cutmix) and torch.rand(()) < self.cfg.mix_prob:
            clips, target = self._mix(clips, target)
        logits = self.logits(clips).float()
        eps = self.cfg.label_smoothing
        soft = target * (1 - eps) + eps / self.num_classes
        loss = torch.sum(-soft * F.log_softmax(logits, dim=-1), dim=-1).mean()
        acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "acc": acc.detach()}

    def _mix(self, clips: torch.Tensor, target: torch.Tensor):
        """Mixup or cutmix (chosen 50/50 when both are on) with the batch reversed; one λ per batch,
        one box for every frame of a clip. Uses torch's RNG (saved in checkpoints)."""
        use_cutmix = self.cfg.cutmix > 0 and (self.cfg.mixup == 0 or torch.rand(()) < 0.5)
        alpha = self.cfg.cutmix if use_cutmix else self.cfg.mixup
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        flipped = clips.flip(0)
        if use_cutmix:
            h, w = clips.shape[-2:]
            cut = math.sqrt(1 - lam)
            ch, cw = int(h * cut), int(w * cut)
            cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
            y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
            x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
            clips = clips.clone()
            clips[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]  # same box on every frame
            lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
        else:
            clips = (clips.float() * lam + flipped.float() * (1 - lam)).round().clamp(0, 255).to(torch.uint8)
        return clips, target * lam + target.flip(0) * (1 - lam)

    def param_groups(self) -> list[dict[str, Any]]:
        head = [(n, p) for n, p in self.named_parameters() if not n.startswith("backbone.")]
        if self.frozen:
            return decay_groups(head)
        ids, depth = layer_ids(self.backbone)
        groups: list[dict[str, Any]] = []
        top = depth + 1
        by_layer: dict[int, list] = {}
        for n, p in self.backbone.named_parameters():
            by_layer.setdefault(ids[n], []).append((n, p))
        for i in sorted(by_layer):
            groups += decay_groups(by_layer[i], lr_scale=self.cfg.layer_decay ** (top - i))
        groups += decay_groups(head, lr_scale=1.0)
        return groups

    def after_step(self, step: int) -> None:
        pass

    def place(self, device) -> None:
        pass

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

