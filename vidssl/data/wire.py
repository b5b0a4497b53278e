"""The worker → main process boundary: shared-memory batch buffers and the wire format.

    worker:  collate stacks windows into a free :class:`BatchRing` slot; the slot's buffers are files
             in the loader's folder on /dev/shm, and a window travels as an :class:`ArenaRef` (file,
             shape, dtype) instead of a tensor; :func:`to_wire` turns the small tensors into numpy
             arrays; the :class:`~vidssl.data.records.WorkerBatch` is pickled
    main:    :func:`copy_out` copies the windows out of the slot (its :class:`ArenaMaps` keeps each
             file mapped) and hands the slot back; :func:`from_wire` turns the arrays back into tensors

Without a folder for the buffers (no /dev/shm) the slots are torch shared-memory tensors, which torch
passes as file descriptors, over a fresh authenticated socket connection per tensor per batch: about
a third of the main process's time in the loader benchmark (docs/benchmarks.md).
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np
import torch

from vidssl.data.records import WorkerBatch
from vidssl.data.windows import ALL_WINDOWS

__all__ = ["ArenaMaps", "ArenaRef", "BatchRing", "copy_out", "to_wire", "from_wire"]


@dataclass(frozen=True)
class ArenaRef:
    """A window in a ring slot's buffer file: what crosses the process boundary instead of the tensor."""

    path: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name


class _Arena:
    """One buffer file on /dev/shm, mapped in the worker that made it (sized exactly, space reserved)."""

    def __init__(self, path: str, nbytes: int) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Reserve the pages now: a write into a tmpfs file past the free space would kill the
            # worker with SIGBUS; here it is an OSError the caller turns into the fallback.
            os.posix_fallocate(fd, 0, max(nbytes, 1))
            self.map = mmap.mmap(fd, max(nbytes, 1))
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        self.path, self.nbytes = path, nbytes

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = int(np.prod(shape)) if shape else 1
        return torch.frombuffer(self.map, dtype=dtype, count=n).view(shape)

    def retire(self) -> None:
        """Remove the file (mappings stay valid until dropped; tmpfs frees the pages after the last)."""
        try:
            os.unlink(self.path)
        except OSError:
            pass


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

    With ``arena_dir`` (the loader's folder on /dev/shm) each (slot, window) buffer is a file there,
    made again (and the old one removed) only when a batch needs more room, and the batch carries an
    :class:`ArenaRef` per window: no file descriptor passing per batch. Without it, torch
    shared-memory tensors.
    """

    def __init__(self, flags: torch.Tensor, worker: int, arena_dir: str | None = None) -> None:
        self.flags, self.worker, self.arena_dir = flags, worker, arena_dir
        self.bufs: list[dict[str, torch.Tensor]] = [{} for _ in range(flags.shape[1])]
        self.arenas: list[dict[str, _Arena]] = [{} for _ in range(flags.shape[1])]
        self.refs: dict[int, tuple[torch.Tensor, ArenaRef]] = {}  # id(view) → (view, ref), this batch
        self.made = 0
        self.slot: int | None = None

    def acquire(self) -> int | None:
        """A free slot (now marked busy), or None when every slot is still with the main process."""
        row = self.flags[self.worker].tolist()
        for s, busy in enumerate(row):
            if not busy:
                self.flags[self.worker, s] = 1
                self.slot = s
                self.refs = {}
                return s
        self.slot = None
        return None

    def out(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """The current slot's buffer for window ``name``, (re)made in shared memory when its shape changes."""
        if self.arena_dir is not None:
            t = self._arena_out(name, tuple(shape), dtype)
            if t is not None:
                return t
        bufs = self.bufs[self.slot]
        t = bufs.get(name)
        if t is None or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            t = torch.empty(shape, dtype=dtype).share_memory_()
            bufs[name] = t
        return t

    def _arena_out(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A view of the (slot, window) file with room for ``shape``; None when /dev/shm has no room."""
        nbytes = (int(np.prod(shape)) if shape else 1) * torch.empty(0, dtype=dtype).element_size()
        arenas = self.arenas[self.slot]
        a = arenas.get(name)
        if a is None or a.nbytes < nbytes:
            # The slot is free, so the main process has copied out everything that read the old file.
            self.made += 1
            path = os.path.join(self.arena_dir, f"w{self.worker}-s{self.slot}-{name}-{os.getpid()}-{self.made}")
            try:
                new = _Arena(path, nbytes)
            except OSError:
                return None
            if a is not None:
                a.retire()
            arenas[name] = a = new
        t = a.tensor(shape, dtype)
        self.refs[id(t)] = (t, ArenaRef(a.path, shape, str(t.numpy().dtype)))
        return t

    def rows(self, name: str, rows: list) -> list:
        """Unstackable rows (native sizes differ): each copied into the slot's file ``name.i``; their
        :class:`ArenaRef` list, or ``rows`` unchanged when /dev/shm has no room."""
        refs = []
        for i, t in enumerate(rows):
            buf = self._arena_out(f"{name}.{i}", tuple(t.shape), t.dtype)
            if buf is None:
                return rows
            buf.numpy()[...] = t.numpy()  # (also the HWC -> CHW copy of strided decord rows)
            refs.append(self.refs[id(buf)][1])
        return refs

    def ref(self, t) -> ArenaRef | None:
        """The :class:`ArenaRef` of a window tensor :meth:`out` handed out for this batch, else None."""
        entry = self.refs.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def release_unused(self) -> None:
        """The batch did not use the slot (rows of different sizes stay lists): free it again."""
        if self.slot is not None:
            self.flags[self.worker, self.slot] = 0
            self.slot = None


class ArenaMaps:
    """Main process: the ring buffer files mapped so far, by (worker, slot, window); a new file for the
    same key (the worker needed more room) replaces the old mapping."""

    def __init__(self) -> None:
        self.maps: dict[tuple[int, int, str], tuple[str, mmap.mmap]] = {}

    def array(self, key: tuple[int, int, str], ref: ArenaRef) -> np.ndarray:
        got = self.maps.get(key)
        if got is None or got[0] != ref.path:
            fd = os.open(ref.path, os.O_RDONLY)
            try:
                m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)  # the main process only copies out
            finally:
                os.close(fd)
            self.maps[key] = got = (ref.path, m)
        dtype = np.dtype(ref.dtype)
        n = int(np.prod(ref.shape)) if ref.shape else 1
        return np.frombuffer(got[1], dtype=dtype, count=n).reshape(ref.shape)

    def clear(self) -> None:
        self.maps.clear()


def copy_out(wb: WorkerBatch, flags: torch.Tensor, views: dict, maps: ArenaMaps | None = None,
             pin: bool = False) -> None:
    """Main process: replace a batch's ring-backed windows by private copies, then hand the slot back.

    Windows that came as :class:`ArenaRef` are copied out of the mapped file (into pinned memory
    with ``pin``); the rest of this docstring is about torch shared-memory windows (no /dev/shm).

    ``views`` keeps the last received tensor of every (worker, slot, window) alive, so the buffer's
    shared mapping stays open and the next batch in that slot is not mapped (and page-faulted) again:
    torch reuses a storage it still holds when the same segment arrives again. Those views are only
    read here, between the worker filling the slot and this hand-back."""
    ring, wb.ring = wb.ring, None
    if ring is None:
        return
    batch = wb.batch
    maps = maps if maps is not None else ArenaMaps()
    for name in ALL_WINDOWS:
        t = batch.get(name)
        if isinstance(t, ArenaRef):
            batch[name] = _private(maps.array((ring[0], ring[1], name), t), pin)
            continue
        if isinstance(t, list) and t and isinstance(t[0], ArenaRef):
            batch[name] = [_private(maps.array((ring[0], ring[1], f"{name}.{i}"), r), pin) for i, r in enumerate(t)]
            continue
        if isinstance(t, torch.Tensor) and t.is_shared():
            # (A pin_memory thread already made a private pinned copy: then t is not shared.)
            views[(ring[0], ring[1], name)] = t
            # (B, ..., C, H, W) uint8, ours alone. A plain single-threaded memcpy: torch's clone would
            # wake the main process's intra-op thread pool, whose spinning costs far more CPU than the copy.
            batch[name] = torch.from_numpy(t.numpy().copy())
    flags[ring[0], ring[1]] = 0


def _private(src: np.ndarray, pin: bool) -> torch.Tensor:
    """A private copy of a ring buffer's window: one single-threaded memcpy (into pinned memory with ``pin``)."""
    if pin:
        dst = torch.empty(src.shape, dtype=torch.from_numpy(src[:0]).dtype, pin_memory=True)
        dst.numpy()[...] = src
        return dst
    return torch.from_numpy(src.copy())


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
