"""What one training step computes, as an ``nn.Module`` the engine wraps.

A task has one interface, so the loop never branches on what is being trained:

- ``forward(batch) -> {"loss": scalar with grad, name: detached scalar, ...}``;
- ``param_groups() -> [{"params", "lr_scale", "wd_scale"}, ...]`` for AdamW (the loop's schedule
  writes ``lr × lr_scale`` and ``weight_decay × wd_scale`` into each group every step);
- ``after_step(step)``: bookkeeping after optimizer update ``step`` (EMA targets);
- ``place(device)``, ``extra_state()`` / ``load_extra_state(state)``: modules kept outside the
  engine (EMA targets) move and checkpoint through these.

:class:`PretrainTask` is self-supervised pretraining; the fine-tuning task reuses
:func:`decay_groups`.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from vidssl.train.schedule import ema_momentum_at

__all__ = ["PretrainTask", "decay_groups", "no_decay"]

def no_decay(name: str, param: torch.Tensor) -> bool:
    """True for norms, biases (1-d), positional embeddings (``pos``, ``pos_*``) and learned tokens/queries."""
    leaf = name.rsplit(".", 1)[-1]
    return (param.ndim <= 1 or leaf == "pos" or leaf.startswith(("pos_", "query")) or "token" in leaf)


def decay_groups(named: Iterable[tuple[str, nn.Parameter]], lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a non-decayed AdamW group (empty groups dropped)."""
    decay, skip = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        (skip if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "lr_scale": lr_scale, "wd_scale": 1.0},
              {"params": skip, "lr_scale": lr_scale, "wd_scale": 0.0, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class PretrainTask(nn.Module):
    """Self-supervised pretraining: the :class:`~vidssl.models.SSLModel` and its objectives.

    The EMA target encoders (latent regression) are released from the module tree: they are not
    optimizer parameters, stay fp32 when the engine casts the model to bf16, move with
    :meth:`place` and are saved through :meth:`extra_state`.
    """

    def __init__(self, model_cfg, objectives_cfg, train_cfg) -> None:
        super().__init__()
        from vidssl.models import SSLModel  # noqa: PLC0415

        self.model = SSLModel(model_cfg, objectives_cfg)
        self._targets = self.model.release_targets()  # {objective: encoder}, not registered
        self._ema = (objectives_cfg.future.ema_momentum, train_cfg.ema_momentum_end, train_cfg.max_steps)

    @property
    def backbone(self) -> nn.Module:
        """The online backbone (what ``vidssl export`` writes)."""
        return self.model.backbone

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model(batch)

    def param_groups(self) -> list[dict[str, Any]]:
        return decay_groups(self.named_parameters())

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """After optimizer update ``step`` (0-based): EMA targets move with the scheduled momentum."""
        if self._targets:
            start, end, max_steps = self._ema
            self.model.on_after_step(ema_momentum=ema_momentum_at(step, start, end, max_steps))

    def place(self, device: torch.device) -> None:
        for enc in self._targets.values():
            enc.to(device=device, dtype=torch.float32)

    def extra_state(self) -> dict[str, Any]:
        return {name: {k: v.detach().cpu().clone() for k, v in enc.state_dict().items()}
                for name, enc in self._targets.items()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        missing = set(self._targets) - set(state or {})
        if missing:
            raise KeyError(f"checkpoint lacks the EMA target encoder(s) of {', '.join(sorted(missing))}")
        for name, enc in self._targets.items():
            enc.load_state_dict(state[name], strict=True)
