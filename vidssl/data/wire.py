"""The worker → main process boundary: shared-memory batch buffers and the wire format.

    worker:  collate stacks windows into a free :class:`BatchRing` slot; :func:`to_wire` turns the
             small tensors into numpy arrays; the :class:`~vidssl.data.records.WorkerBatch` is pickled
             (torch passes the shared window buffers as file descriptors)
    main:    :func:`copy_out` copies the windows out of the slot and hands it back;
             :func:`from_wire` turns the arrays back into tensors (no copy)
"""

from __future__ import annotations

import numpy as np
import torch

from vidssl.data.records import WorkerBatch
from vidssl.data.windows import ALL_WINDOWS

__all__ = ["BatchRing", "copy_out", "to_wire", "from_wire"]


class BatchRing:
    """A worker's reusable shared-memory batch buffers.

    A fresh shared segment per batch costs the worker a page fault per 4 KiB page it writes (a
    (4, 16, 3, 128, 228) uint8 batch: 1,400 faults, most of the loader's system time). Instead each
    worker keeps up to ``slots`` sets of window buffers and stacks batches into a free one. Hand-back
    is explicit: ``flags`` is a (workers, slots) uint8 tensor in shared memory made by the main
    process before the workers start; the worker sets ``flags[w, s] = 1`` when it fills slot ``s``,
    and the main process copies the windows out of the slot (the trainer never sees a view of a
    ring buffer) and then sets it back to 0. With no free slot the worker falls back to a new
    segment, so it never waits. The main process resets all flags before each iteration: batches
    still in flight from an abandoned iteration are discarded, never read.
    """

    def __init__(self, flags: torch.Tensor, worker: int) -> None:
        self.flags, self.worker = flags, worker
        self.bufs: list[dict[str, torch.Tensor]] = [{} for _ in range(flags.shape[1])]
        self.slot: int | None = None

    def acquire(self) -> int | None:
        """A free slot (now marked busy), or None when every slot is still with the main process."""
        row = self.flags[self.worker].tolist()
        for s, busy in enumerate(row):
            if not busy:
                self.flags[self.worker, s] = 1
                self.slot = s
                return s
        self.slot = None
        return None

    def out(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The current slot's buffer for window ``name``, (re)made in shared memory when its shape changes."""
        bufs = self.bufs[self.slot]
        t = bufs.get(name)
        if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            t = torch.empty(shape, dtype=dtype).share_memory_()
            bufs[name] = t
        return t

    def release_unused(self) -> None:
        """The batch did not use the slot (rows of different sizes stay lists): free it again."""
        if self.slot is not None:
            self.flags[self.worker, self.slot] = 0
            self.slot = None


def copy_out(wb: WorkerBatch, flags: torch.Tensor, views: dict) -> None:
    """Main process: replace a batch's ring-backed windows by private copies, then hand the slot back.

    ``views`` keeps the last received tensor of every (worker, slot, window) alive, so the buffer's
    shared mapping stays open and the next batch in that slot is not mapped (and page-faulted) again:
    torch reuses a storage it still holds when the same segment arrives again. Those views are only
    read here, between the worker filling the slot and this hand-back."""
    ring, wb.ring = wb.ring, None
    if ring is None:
        return
    batch = wb.batch
    for name in ALL_WINDOWS:
        t = batch.get(name)
        if isinstance(t, torch.Tensor) and t.is_shared():
            # (A pin_memory thread already made a private pinned copy: then t is not shared.)
            views[(ring[0], ring[1], name)] = t
            # (B, ..., C, H, W) uint8, ours alone. A plain single-threaded memcpy: torch's clone would
            # wake the main process's intra-op thread pool, whose spinning costs far more CPU than the copy.
            batch[name] = torch.from_numpy(t.numpy().copy())
    flags[ring[0], ring[1]] = 0


_SMALL = ("label", "dataset", "valid")


def to_wire(wb: WorkerBatch) -> WorkerBatch:
    """Worker → main: small tensors as numpy arrays. Each tensor crossing the process boundary is a
    shared-memory segment whose file descriptor torch passes over its own authenticated socket
    connection; for (B,)-sized labels and indices that costs far more than pickling the values."""
    batch = wb.batch
    if batch is not None:
        for k in _SMALL:
            if isinstance(batch.get(k), torch.Tensor):
                batch[k] = batch[k].numpy()
        if "frame_indices" in batch:
            batch["frame_indices"] = {n: t.numpy() for n, t in batch["frame_indices"].items()}
        wb.wire = True
    return wb


def from_wire(wb: WorkerBatch) -> WorkerBatch:
    """Main: undo :func:`to_wire` (numpy arrays back to tensors, no copy)."""
    if wb.wire:
        batch = wb.batch
        for k in _SMALL:
            if isinstance(batch.get(k), np.ndarray):
                batch[k] = torch.from_numpy(batch[k])
        if "frame_indices" in batch:
            batch["frame_indices"] = {n: torch.from_numpy(a) for n, a in batch["frame_indices"].items()}
        wb.wire = False
    return wb
