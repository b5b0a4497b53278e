"""One training loop, shared by pretraining and fine-tuning.

Per optimizer step: write the scheduled lr / weight decay into the parameter groups, then for
each of ``grad_accum`` micro-batches: wait for a batch (timed: data wait), move its clips to the
device as uint8 (normalised there by the model), forward, agree across ranks that the loss is
finite, backward, engine step (on every micro-batch: DeepSpeed applies the update at the
boundary and divides the loss by the accumulation steps itself). Then the task's ``after_step``
(EMA; not after an update DeepSpeed skipped), one metrics row, and a checkpoint every
``checkpoint_every`` steps and at the end.

A non-finite loss on any rank skips that micro-batch on every rank (no backward, so no
collective is left waiting) with a warning; ``max_bad_steps`` in a row abort the run.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch

from vidssl.errors import RuntimeFailure, UserError
from vidssl.train.schedule import lr_at, weight_decay_at

log = logging.getLogger("vidssl.train")

__all__ = ["TrainState", "train_loop", "endless_batches", "to_device"]


@dataclass
class TrainState:
    """Counters that survive a resume (saved in every checkpoint)."""

    step: int = 0  # optimizer updates done
    skipped: int = 0  # micro-batches skipped for a non-finite loss, over the run
    bad_in_row: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def endless_batches(loader) -> Iterator[dict[str, Any]]:
    """The loader's batches, epoch after epoch, from its current (possibly resumed) position.

    Starting a DataLoader iteration draws a seed from torch's global RNG; that draw happens in a
    forked RNG so that it never shifts the training RNG (dropout, drop path) between a run and
    its resume, which start iterations at different places.
    """
    if len(loader) == 0:
        raise UserError("data: the dataset gives no batch per rank per epoch (too few samples for "
                        "data.batch_size x world size with drop_last)")
    while True:
        loader.set_epoch(loader.epoch)
        it = iter(loader)
        with torch.random.fork_rng(devices=[]):
            first = next(it, None)
        if first is not None:
            yield first
            yield from it


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of the batch to ``device``: clips stay uint8 (4x less to copy than float)
    and are normalised on the device by the model; non-tensors (keys) stay."""
    out = dict(batch)
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.to(device, non_blocking=True)
    return out


def train_loop(*, engine, loader, cfg, state: TrainState, metrics,
               micro_batch: int, checkpoint: Callable[[TrainState], None],
               on_step: Callable[[TrainState], None] | None = None) -> TrainState:
    """Train until ``cfg.max_steps`` (a :class:`~vidssl.train.config.TrainConfig`-like section).

    ``loader`` is this rank's :class:`~vidssl.data.VideoLoader`, at its (possibly resumed) position.
    ``checkpoint(state)`` is called on every rank after steps that are multiples of
    ``cfg.checkpoint_every`` and after the last one; ``on_step(state)`` (optional) after every
    step (for monitors such as kNN accuracy).
    """
    module = engine.module  # the task as the engine holds it
    module.train()
    batches = endless_batches(loader)
    clips_per_step = micro_batch * cfg.grad_accum * engine.world_size
    while state.step < cfg.max_steps:
        t_start = time.perf_counter()
        lr, wd = lr_at(state.step, cfg), weight_decay_at(state.step, cfg)
        engine.set_schedule(lr, wd)
        wait = 0.0
        sums: dict[str, float] = {}
        micro = 0
        norm: float | None = None
        applied = True  # False when DeepSpeed skipped this step's update (non-finite gradients)
        while micro < cfg.grad_accum:
            t0 = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - t0
            batch = to_device(batch, engine.device)
            out = engine.forward(batch)
            loss = out["loss"]
            if not engine.all_true(bool(torch.isfinite(loss.detach()).all())):
                state.skipped += 1
                state.bad_in_row += 1
                log.warning("step %d: non-finite loss on at least one rank (%s here); micro-batch skipped "
                            "(%d in a row, limit %d)", state.step + 1, float(loss.detach()), state.bad_in_row,
                            cfg.max_bad_steps)
                if state.bad_in_row >= cfg.max_bad_steps:
                    raise RuntimeFailure(f"{state.bad_in_row} non-finite losses in a row at step {state.step + 1} "
                                         f"(train.max_bad_steps={cfg.max_bad_steps}); lower train.lr, check the "
                                         f"data, or use fp32/bf16 instead of fp16")
                continue
            engine.backward(loss)
            boundary, norm = engine.step()
            micro += 1
            if boundary and norm is not None and math.isnan(norm):
                # DeepSpeed found non-finite gradients (bf16/fp16) and skipped the update itself.
                applied = False
                state.skipped += 1
                state.bad_in_row += 1
                log.warning("step %d: non-finite gradients; DeepSpeed skipped the update (%d in a row, limit %d)",
                            state.step + 1, state.bad_in_row, cfg.max_bad_steps)
                if state.bad_in_row >= cfg.max_bad_steps:
                    raise RuntimeFailure(f"{state.bad_in_row} non-finite gradients/losses in a row at step "
                                         f"{state.step + 1} (train.max_bad_steps={cfg.max_bad_steps}); lower "
                                         f"train.lr or use fp32 (bf16 Conv3d gradients on CPU are unreliable)")
            else:
                state.bad_in_row = 0
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
        if applied:
            # EMA targets follow the online weights only when they moved: after a skipped update the
            # target would otherwise take one more step towards unchanged weights.
            module.after_step(state.step)
        state.step += 1
        elapsed = time.perf_counter() - t_start
        values = engine.mean_over_ranks({k: v / cfg.grad_accum for k, v in sums.items()})
        row: dict[str, Any] = {"step": state.step, "epoch": loader.epoch, **values, "lr": lr,
                               "weight_decay": wd,
                               "grad_norm": norm if norm is not None and math.isfinite(norm) else None,
                               "clips_per_s": clips_per_step / elapsed if elapsed > 0 else None,
                               "data_wait": wait / elapsed if elapsed > 0 else 0.0,
                               "step_time": elapsed, "skipped": state.skipped}
        metrics.log(row)
        if on_step is not None:
            on_step(state)
        if state.step == cfg.max_steps or (cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0):
            checkpoint(state)
    return state
