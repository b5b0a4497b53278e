"""``build_loader``: the streaming clip loader (epoch plan → tar stream → shuffle buffer → clip plan
→ decode → augment → batch), with mid-epoch resume and an error budget.

Pipeline, with what flows at each boundary::

    plan_epoch (main, pure)         → WorkerPlan per worker: shard segments + emission order
    read_segment (worker)           → Sample (json meta, mp4 bytes, label) | Failure | None (consumed)
    shuffle buffer (worker)         → samples in the plan's emission order, ≤ shuffle_buffer held
    SampleProcessor.plan (worker)   → {window: source frame numbers} from metadata
    decode + augment                → worker (default) or DecodeStage in the main process
                                      (decode_stage=main: workers send bytes + frame plans)
    collate (worker/main)           → batch dict, uint8 (B, T, C, H, W) windows
    worker → main                   → windows in a reused shared-memory slot (_BatchRing), small
                                      arrays pickled; main copies the windows out, hands the slot back
    VideoLoader.__iter__ (main)     → reorders by batch number, counts errors, counts consumed
                                      batches where the trainer receives them

Worker processes persist across epochs and resumes; each iteration sends them a _Job (epoch plan,
consumed position, samples known to hang) through a small file they read when it starts.

Batches that fail partly keep their size: a failed row is replaced by a copy of a good row of
the same batch (or of the worker's last good sample, or the next good one) and marked
``valid=False``, so every rank always yields the planned number of full batches.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import pickle
import re
import shutil
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Iterator

import numpy as np
import torch

from vidssl.data.augment import apply_train, eval_views, train_params
from vidssl.data.clips import ShortVideo, plan_clip, sample_rng
from vidssl.data.config import DataConfig
from vidssl.data.decode import DecodeError, make_decoder
from vidssl.data.index import DatasetIndex, open_index
from vidssl.data.plan import EpochPlan, ShardRef, WorkerPlan, plan_epoch
from vidssl.data.stream import Failure, Sample, read_segment
from vidssl.errors import RuntimeFailure, UserError

__all__ = ["build_loader", "VideoLoader", "SampleProcessor", "DecodeStage", "STATE_VERSION"]

log = logging.getLogger("vidssl.data")

STATE_VERSION = 1
_WINDOWS = {"ssl": ("context", "future", "other"), "clip": ("video",), "views": ("video",)}
_WINDOWS_ALL = ("context", "future", "other", "video")


# ---- one sample: clip plan, decode, augment ----------------------------------------------------

class SampleProcessor:
    """Turns one :class:`Sample` into a row of tensors. Randomness comes from
    (seed, epoch, dataset, key) only, so a row is the same whichever worker, rank or stage makes it."""

    def __init__(self, cfg: DataConfig, decoder=None) -> None:
        self.cfg = cfg
        self.decoder = decoder if decoder is not None else make_decoder(cfg.backend, cfg.decode_threads)

    def plan_short(self, sample: Sample, dataset: int, epoch: int) -> tuple[dict[str, list[int]], bool]:
        """(windows, short): windows {name: source frame numbers}; ``short`` when the video was too
        short and loop/pad changed the indices. Raises ShortVideo under the skip policy."""
        c = self.cfg
        rng = sample_rng(c.seed, epoch, dataset, sample.key, "clip")
        return plan_clip(int(sample.meta["frames"]), mode=c.mode, frames=c.frames, stride=c.stride,
                         future=c.future, gap_min=c.gap_min, gap_max=c.gap_max, views=c.views,
                         short=c.short, rng=rng)

    def frames(self, sample: Sample, windows: dict[str, list[int]]) -> torch.Tensor:
        """Decode every frame the windows need: (N, C, H, W) uint8, rows in window order."""
        idx = [i for w in windows.values() for i in w]
        arr = self.decoder.decode(sample.data, idx, sample.meta)  # (N, H, W, 3), any strides
        # PyAV's frames are (N, 3, H, W) in memory (see decode._FrameSink): the permute makes them a
        # contiguous (N, C, H, W) tensor with no copy; decord's are HWC: a strided view until collated.
        return torch.from_numpy(arr).permute(0, 3, 1, 2)

    def finish(self, sample: Sample, dataset: int, epoch: int, windows: dict[str, list[int]],
               frames: torch.Tensor) -> dict[str, Any]:
        """Augment decoded frames (N, C, H, W) into the row's windows."""
        c = self.cfg
        rng = sample_rng(c.seed, epoch, dataset, sample.key, "augment")
        h, w = frames.shape[-2:]
        row: dict[str, Any] = {"key": sample.key, "label": sample.label, "dataset": dataset}
        fi: dict[str, torch.Tensor] = {}
        if c.mode == "ssl":
            nc, nf = len(windows["context"]), len(windows["future"])
            cf, other = frames[: nc + nf], frames[nc + nf:]
            if c.augment == "train":
                # One draw for context+future (the future must stay aligned), one for other. Both
                # windows share the flip: a mirrored window moves the other way, and a positive pair
                # with opposite motions would teach the model to ignore the direction of motion.
                p_cf = train_params(h, w, c, rng)
                p_other = train_params(h, w, c, rng)
                p_other.flip = p_cf.flip
                cf = apply_train(cf, p_cf, c.crop_size)
                other = apply_train(other, p_other, c.crop_size)
            row["context"], row["future"], row["other"] = cf[:nc], cf[nc:], other  # (T|F, C, H, W)
            for name in ("context", "future", "other"):
                fi[name] = torch.tensor(windows[name], dtype=torch.int64)
        elif c.mode == "clip":
            video = frames
            if c.augment == "train":
                video = apply_train(video, train_params(h, w, c, rng), c.crop_size)
            elif c.augment == "eval":
                video = eval_views(video, c.eval_resize, c.crop_size, 1)[0]
            row["video"] = video  # (T, C, H, W)
            fi["video"] = torch.tensor(windows["video"], dtype=torch.int64)
        else:  # views: K windows (× crops), window-major
            t = c.frames
            clips = [frames[v * t:(v + 1) * t] for v in range(c.views)]
            out, idx = [], []
            for v, clip in enumerate(clips):
                if c.augment == "train":
                    views = [apply_train(clip, train_params(h, w, c, rng), c.crop_size)]
                elif c.augment == "eval":
                    views = eval_views(clip, c.eval_resize, c.crop_size, c.eval_crops)
                else:
                    views = [clip]
                out.extend(views)
                idx.extend([windows["video"][v * t:(v + 1) * t]] * len(views))
            row["video"] = torch.stack(out)  # (K·crops, T, C, H, W)
            fi["video"] = torch.tensor(idx, dtype=torch.int64)  # (K·crops, T)
        row["frame_indices"] = fi
        return row

    def __call__(self, sample: Sample, dataset: int, epoch: int) -> dict[str, Any]:
        windows, short = self.plan_short(sample, dataset, epoch)
        row = self.finish(sample, dataset, epoch, windows, self.frames(sample, windows))
        row["_short"] = short  # counted in loader.stats["short"]; collate ignores it
        return row


def _stack(items: list, out_for=None):
    """Stack equal-shaped rows into one batch tensor; ``out_for(shape, dtype)`` may give the output
    buffer (a worker's reusable shared-memory ring, see :class:`_BatchRing`)."""
    # Native-size clips (augment=none) from differently sized videos cannot be stacked.
    if not all(t.shape == items[0].shape for t in items):
        return list(items)
    out = None
    elem = items[0]
    if out_for is not None:
        out = out_for((len(items), *elem.shape), elem.dtype)
    elif torch.utils.data.get_worker_info() is not None:
        # In a DataLoader worker, stack straight into shared memory: sending the batch to the main
        # process then passes a handle instead of copying every clip into a new shared segment.
        storage = elem._typed_storage()._new_shared(len(items) * elem.numel(), device=elem.device)
        out = elem.new(storage).resize_(len(items), *elem.shape)  # the way torch's default_collate does it
    # Rows are contiguous (T, C, H, W) (PyAV) or (T, C, H, W) views of HWC frames (decord): then this
    # one strided copy is also the HWC -> CHW transpose. For uint8, numpy's copy loop is ~40% cheaper
    # than torch.stack's, and single-threaded (no intra-op pool wake-ups).
    if out is not None and elem.dtype == torch.uint8:
        dst = out.numpy()
        for i, t in enumerate(items):
            dst[i] = t.numpy()
        return out
    return torch.stack(items, out=out)


def collate(rows: list[dict[str, Any]], valid: list[bool], mode: str, out_for=None) -> dict[str, Any]:
    """Rows → batch: windows (B, T, C, H, W) uint8, frame_indices {window: (B, T)}, key, label,
    dataset, valid. ``out_for(name, shape, dtype)`` may supply the window tensors' buffers."""
    batch: dict[str, Any] = {}
    for name in _WINDOWS[mode]:
        batch[name] = _stack([r[name] for r in rows],
                             None if out_for is None else (lambda shape, dtype, n=name: out_for(n, shape, dtype)))
    batch["frame_indices"] = {n: torch.stack([r["frame_indices"][n] for r in rows]) for n in rows[0]["frame_indices"]}
    batch["key"] = [r["key"] for r in rows]
    batch["label"] = torch.tensor([r["label"] for r in rows], dtype=torch.int64)
    batch["dataset"] = torch.tensor([r["dataset"] for r in rows], dtype=torch.int64)
    batch["valid"] = torch.tensor(valid, dtype=torch.bool)
    return batch


# ---- decode guard: a hung decoder must not stall training -------------------------------------

class _WorkerGuard:
    """In a DataLoader worker: record the sample being decoded in a marker file and arm a kernel
    timer (``setitimer``) whose SIGALRM, left at its default action, terminates the worker process
    if the decode outlives the timeout. Delivery needs no GIL, so it also fires when decord hangs
    holding the GIL; the main process then sees the dead worker, reads the marker, marks that sample
    bad and restarts the workers from the consumed position (see VideoLoader._iterate).
    (A per-sample ``faulthandler.dump_traceback_later`` did the same but started and joined a
    watchdog thread for every sample: a few percent of the loader's time on 16-frame clips.)"""

    def __init__(self, marker_dir: str, worker: int, timeout: float) -> None:
        self.path = os.path.join(marker_dir, f"w{worker}")
        self.timeout = timeout
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)  # default action: terminate the process

    def __call__(self, fn, tag: str):
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()} {tag}\n".encode(), 0)
        signal.setitimer(signal.ITIMER_REAL, self.timeout)
        try:
            return fn()
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            os.ftruncate(self.fd, 0)


class _ThreadGuard:
    """In the main process: run the decode in a helper thread and stop waiting after the timeout.
    Works for decoders that release the GIL (PyAV/FFmpeg); a decoder hung while holding the GIL
    (decord's known failure) cannot be interrupted this way — use workers > 0 with decord."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="vidssl-decode")

    def __call__(self, fn, tag: str):
        fut = self.pool.submit(fn)
        try:
            return fut.result(timeout=self.timeout)
        except FutureTimeout:
            # Abandon the hung thread (it cannot be killed) and continue with a fresh one.
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="vidssl-decode")
            raise DecodeError(f"decode did not finish within decode_timeout={self.timeout}s") from None


# ---- reusable shared-memory batch buffers -----------------------------------------------------

class _BatchRing:
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


def _copy_out(batch: dict[str, Any], flags: torch.Tensor, views: dict) -> None:
    """Main process: replace a batch's ring-backed windows by private copies, then hand the slot back.

    ``views`` keeps the last received tensor of every (worker, slot, window) alive, so the buffer's
    shared mapping stays open and the next batch in that slot is not mapped (and page-faulted) again:
    torch reuses a storage it still holds when the same segment arrives again. Those views are only
    read here, between the worker filling the slot and this hand-back."""
    ring = batch.pop("_ring", None)
    if ring is None:
        return
    for name in _WINDOWS_ALL:
        t = batch.get(name)
        if isinstance(t, torch.Tensor) and t.is_shared():
            # (A pin_memory thread already made a private pinned copy: then t is not shared.)
            views[(ring[0], ring[1], name)] = t
            # (B, ..., C, H, W) uint8, ours alone. A plain single-threaded memcpy: torch's clone would
            # wake the main process's intra-op thread pool, whose spinning costs far more CPU than the copy.
            batch[name] = torch.from_numpy(t.numpy().copy())
    flags[ring[0], ring[1]] = 0


_SMALL = ("label", "dataset", "valid")


def _to_wire(batch: dict[str, Any]) -> dict[str, Any]:
    """Worker → main: small tensors as numpy arrays. Each tensor crossing the process boundary is a
    shared-memory segment whose file descriptor torch passes over its own authenticated socket
    connection; for (B,)-sized labels and indices that costs far more than pickling the values."""
    for k in _SMALL:
        if isinstance(batch.get(k), torch.Tensor):
            batch[k] = batch[k].numpy()
    if "frame_indices" in batch:
        batch["frame_indices"] = {n: t.numpy() for n, t in batch["frame_indices"].items()}
    batch["_wire"] = True
    return batch


def _from_wire(batch: dict[str, Any]) -> dict[str, Any]:
    """Main: undo :func:`_to_wire` (numpy arrays back to tensors, no copy)."""
    if batch.pop("_wire", False):
        for k in _SMALL:
            if isinstance(batch.get(k), np.ndarray):
                batch[k] = torch.from_numpy(batch[k])
        if "frame_indices" in batch:
            batch["frame_indices"] = {n: torch.from_numpy(a) for n, a in batch["frame_indices"].items()}
    return batch


# ---- the per-worker stream ---------------------------------------------------------------------

class _WorkerStream:
    """Produces one worker's batches of an epoch, from local batch ``skip`` on.

    Emits decoded batches (decode_stage=worker) or raw batches of (Sample, frame plan) for the
    main-process DecodeStage (decode_stage=main).
    """

    def __init__(self, cfg: DataConfig, shards: list[ShardRef], wp: WorkerPlan, epoch: int, skip: int,
                 bad: frozenset[str], guard=None, ring: _BatchRing | None = None) -> None:
        self.cfg, self.shards, self.wp, self.epoch, self.skip, self.bad = cfg, shards, wp, epoch, skip, bad
        self.guard, self.ring = guard, ring
        self.raw = cfg.decode_stage == "main"
        self.proc = SampleProcessor(cfg, decoder=None if not self.raw else _NoDecoder())
        self.positions = wp.positions()  # read position → (shard, ordinal, pad)
        self.last_good: dict[str, Any] | None = None
        self.ahead: dict[int, Any] = {}  # read position → processed result decoded ahead of time

    def _read(self, consumed: set[int]) -> Iterator[tuple[int, Sample | Failure | None]]:
        c = self.cfg
        rp = 0
        for seg in self.wp.segments:
            base = rp
            n = seg.size
            if all((base + i) in consumed for i in range(n)):
                for i in range(n):  # fully consumed before a resume: not even opened
                    yield base + i, None
            else:
                url = self.shards[seg.shard].url
                for ordinal, item in read_segment(url, seg.start, seg.stop,
                                                  lambda o, b=base, s=seg.start: (b + o - s) not in consumed,
                                                  timeout=c.read_timeout, retries=c.retries):
                    yield base + ordinal - seg.start, item
            rp += n

    def _process(self, p: int, item: Sample | Failure) -> tuple[str, Any]:
        """('ok', row) | ('fail', Failure) for read position ``p``."""
        if isinstance(item, Failure):
            return "fail", item
        shard = self.shards[self.positions[p][0]]
        tag = f"{shard.dataset}/{item.key}"
        if tag in self.bad:
            return "fail", Failure("timeout", f"sample {item.key}: its decode hung earlier "
                                   f"(decode_timeout={self.cfg.decode_timeout}s); skipped")
        try:
            if self.raw:
                return "ok", (item, shard.dataset, *self.proc.plan_short(item, shard.dataset, self.epoch))
            fn = lambda: self.proc(item, shard.dataset, self.epoch)  # noqa: E731
            return "ok", (self.guard(fn, tag) if self.guard is not None else fn())
        except ShortVideo as exc:
            return "fail", Failure("short", f"sample {item.key}: {exc}")
        except DecodeError as exc:
            return "fail", Failure("decode", f"sample {item.key}: {exc}")
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a counted skip, not a crash
            return "fail", Failure("decode", f"sample {item.key}: {type(exc).__name__}: {exc}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        wp, B = self.wp, self.wp.batch_size
        order = wp.order
        consumed = set(order[: self.skip * B])
        held: dict[int, Sample | Failure] = {}
        reader = self._read(consumed)

        def fetch(p: int):
            while p not in held:
                rp, item = next(reader)
                if item is not None:
                    held[rp] = item
            return held.pop(p)

        for b in range(self.skip, wp.batches):
            results, errors = [], []
            for i in range(b * B, (b + 1) * B):
                p = order[i]
                res = self.ahead.pop(p) if p in self.ahead else self._process(p, fetch(p))
                if res[0] == "fail":
                    f: Failure = res[1]
                    shard = self.shards[self.positions[p][0]]
                    errors.append((f.kind, shard.name, self.positions[p][1], f.message))
                results.append(res)
            # Planned samples (not padding repeats) too short for the plan that loop/pad stretched.
            n_short = sum(1 for j, (status, val) in enumerate(results)
                          if status == "ok" and not self.positions[order[b * B + j]][2]
                          and (val[3] if self.raw else val.get("_short")))
            batch: dict[str, Any]
            if self.raw:
                batch = {"_raw": [r[1] if r[0] == "ok" else None for r in results]}
                batch["_pad"] = [self.positions[order[i]][2] for i in range(b * B, (b + 1) * B)]
            else:
                good = [r[1] for r in results if r[0] == "ok"]
                if not good and self.last_good is None:
                    good = self._look_ahead(b, fetch, errors)
                fill = good or [self.last_good]
                rows, valid = [], []
                for j, (status, val) in enumerate(results):
                    pad = self.positions[order[b * B + j]][2]
                    if status == "ok":
                        rows.append(val)
                        valid.append(not pad)
                    else:
                        rows.append(fill[j % len(fill)])
                        valid.append(False)
                if good:
                    self.last_good = good[-1]
                ring = self.ring if self.ring is not None and self.ring.acquire() is not None else None
                batch = collate(rows, valid, self.cfg.mode, None if ring is None else ring.out)
                if ring is not None:
                    if any(isinstance(batch[n], torch.Tensor) for n in _WINDOWS[self.cfg.mode]):
                        batch["_ring"] = (ring.worker, ring.slot)
                    else:
                        ring.release_unused()
            batch["_index"] = wp.rank_batch(b)
            batch["_errors"] = errors
            batch["_short"] = n_short
            yield batch

    def _look_ahead(self, b: int, fetch, errors: list[tuple]) -> list:
        """Every sample of this batch failed (``errors``) and there is no earlier good one: process
        the worker's next samples until one works (kept for their own turn, so nothing is decoded
        twice). When none does, the error says what failed where: the main process never saw these
        failures (they travel with the batch that could not be made), so no warning named them."""
        B = self.wp.batch_size
        failed = list(errors)
        for i in range((b + 1) * B, len(self.wp.order)):
            p = self.wp.order[i]
            res = self._process(p, fetch(p))
            self.ahead[p] = res
            if res[0] == "ok":
                return [res[1]]
            failed.append((res[1].kind, self.shards[self.positions[p][0]].name, self.positions[p][1], res[1].message))
        kinds = collections.Counter(f[0] for f in failed)
        shards = collections.Counter(f[1] for f in failed)
        raise RuntimeFailure(
            f"data: rank {self.wp.rank} worker {self.wp.worker} of epoch {self.epoch}: none of the "
            f"{len(self.wp.order) - b * B} samples left in its plan could be used "
            f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}), so no sample can stand in for them; "
            f"shards: {', '.join(f'{s} ({n})' for s, n in shards.most_common(10))}; first error: {failed[0][3]}")


class _NoDecoder:
    name = "none"

    def decode(self, *a, **k):  # pragma: no cover - raw mode never decodes in workers
        raise AssertionError("workers do not decode with decode_stage=main")


@dataclasses.dataclass(frozen=True)
class _Job:
    """One iteration's work for the workers: this rank's epoch plan, local batches already consumed
    per plan worker, which plan worker DataLoader worker 0 serves, and samples known to hang."""

    plan: EpochPlan
    consumed: list[int]
    rotate: int
    bad: frozenset[str]


class _EpochDataset(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs: its slice of an epoch plan.

    The workers persist across epochs (forking fresh ones every epoch cost page faults and start-up
    on every epoch), so the epoch is not built into the dataset: each ``__iter__`` reads the current
    :class:`_Job` from ``job_path``, a small pickle the main process (this loader, never shard
    content) rewrites before every ``iter(DataLoader)``. With ``workers: 0`` the job is given directly.
    """

    def __init__(self, cfg, shards, rank: int, job_path: str | None = None, marker_dir: str | None = None,
                 job: _Job | None = None, ring_flags: torch.Tensor | None = None) -> None:
        super().__init__()
        self.cfg, self.shards, self.rank = cfg, shards, rank
        self.job_path, self.marker_dir, self.job, self.ring_flags = job_path, marker_dir, job, ring_flags
        self._guard = None  # per worker process, made on its first epoch and reused
        self._ring: _BatchRing | None = None  # likewise

    def _job(self) -> _Job:
        if self.job is not None:
            return self.job
        with open(self.job_path, "rb") as f:
            return pickle.load(f)  # noqa: S301 - written by this loader's main process, not shard content

    def __iter__(self):
        job = self._job()
        info = torch.utils.data.get_worker_info()
        k_dl = info.id if info is not None else 0
        # DataLoader worker 0 serves the plan worker owning the next batch, so batches arrive in order.
        k = (k_dl + job.rotate) % job.plan.workers
        guard = None
        if self.cfg.decode_stage == "worker":
            if self._guard is None:
                # Marker files are per DataLoader worker (a process), not per plan worker: roles rotate.
                self._guard = (_WorkerGuard(self.marker_dir, k_dl, self.cfg.decode_timeout)
                               if info is not None and self.marker_dir else _ThreadGuard(self.cfg.decode_timeout))
            guard = self._guard
        if self._ring is None and self.ring_flags is not None and info is not None:
            self._ring = _BatchRing(self.ring_flags, k_dl)
        wp = job.plan.worker(self.rank, k)
        stream = _WorkerStream(self.cfg, self.shards, wp, job.plan.epoch, job.consumed[k], job.bad, guard, self._ring)
        if info is None:
            yield from stream
        else:
            for batch in stream:
                yield _to_wire(batch)


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    # Our batches are complete; torch's default (default_convert) would turn _to_wire's numpy arrays
    # back into tensors in the worker.
    return batch


def _worker_init(_worker_id: int) -> None:
    # Parallelism comes from the workers: one intra-op thread each; FFmpeg's log bridge off.
    torch.set_num_threads(1)
    try:
        import av.logging  # noqa: PLC0415

        av.logging.set_level(None)
    except Exception:  # noqa: BLE001  # pragma: no cover
        pass


# ---- main-process decode stage -----------------------------------------------------------------

class DecodeStage:
    """Decodes and augments raw batches (bytes + frame plans sent by workers) in the main process.

    This is where GPU decoding plugs in: ``decode_device="cuda"`` uses torchcodec's NVDEC decoder
    (UNVERIFIED: written without a GPU to test on) and keeps CUDA out of the forked workers.
    """

    def __init__(self, cfg: DataConfig, epoch: int) -> None:
        self.cfg, self.epoch = cfg, epoch
        decoder = _TorchCodecDecoder() if cfg.decode_device == "cuda" else None
        self.proc = SampleProcessor(cfg, decoder)
        self.guard = _ThreadGuard(cfg.decode_timeout)
        self.last_good = None

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows, valid, errors = [], [], []
        for item, pad in zip(batch.pop("_raw"), batch.pop("_pad")):
            if item is None:
                rows.append(None)
                valid.append(False)
                continue
            sample, dataset, windows, _short = item
            try:
                frames = self.guard(lambda s=sample, w=windows: self.proc.frames(s, w), sample.key)
                rows.append(self.proc.finish(sample, dataset, self.epoch, windows, frames))
                valid.append(not pad)
            except Exception as exc:  # noqa: BLE001 - counted skip
                errors.append(("decode", "", sample.key, f"sample {sample.key}: {exc}"))
                rows.append(None)
                valid.append(False)
        good = [r for r in rows if r is not None] or ([self.last_good] if self.last_good is not None else [])
        if not good:
            raise RuntimeFailure(f"batch {batch['_index']}: every sample failed and no earlier sample exists "
                                 f"to stand in for them")
        self.last_good = good[-1]
        rows = [r if r is not None else good[j % len(good)] for j, r in enumerate(rows)]
        out = collate(rows, valid, self.cfg.mode)
        out["_index"], out["_errors"] = batch["_index"], errors
        return out


class _TorchCodecDecoder:
    """NVDEC decoding through torchcodec (UNVERIFIED on GPU: no GPU was available when written)."""

    name = "torchcodec-cuda"

    def decode(self, data: bytes, indices, meta) -> np.ndarray:
        from torchcodec.decoders import VideoDecoder  # noqa: PLC0415

        dec = VideoDecoder(data, device="cuda", seek_mode="exact")
        frames = dec.get_frames_at(indices=list(indices)).data  # (N, C, H, W) uint8 on cuda
        return frames.permute(0, 2, 3, 1).cpu().numpy()


# ---- the loader ------------------------------------------------------------------------------

#: DataConfig fields besides seed/batch_size that shape the epoch plan: a saved state records them.
_PLAN_SETTINGS = ("drop_last", "shuffle", "shuffle_buffer", "weights", "resampled", "steps_per_epoch")


def _plain(value: Any) -> Any:
    """A config value as plain JSON-able data (tuples as lists), so saved and current states compare equal."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


class VideoLoader:
    """Iterable of batches for one rank; see :func:`build_loader` and docs/data.md."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, indexes: list[DatasetIndex]) -> None:
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.cfg, self.rank, self.world_size, self.indexes = cfg, rank, world_size, indexes
        self.shards = [ShardRef(d, name, url, n) for d, ix in enumerate(indexes) for name, url, n in ix.shards]
        self.workers = cfg.logical_workers
        self._epoch = 0
        self._consumed = 0
        self._plans: dict[int, EpochPlan] = {}
        self._bad: set[str] = set()
        self.stats: dict[str, Any] = {}
        self._reset_stats()
        self._last_warn = 0.0
        self._epoch_kinds: collections.Counter = collections.Counter()  # error kinds of this pass (budget message)
        self._pool: tuple[Any, str, str] | None = None  # persistent DataLoader workers, see _workers_pool
        self._generation = 0  # counts iterations: an older, unfinished one must not steal batches
        self._ring_views: dict[tuple[int, int, str], torch.Tensor] = {}  # see _copy_out
        self.plan(0)  # fail early (e.g. too few samples) with the user's settings in the message

    # -- public API --
    def plan(self, epoch: int | None = None) -> EpochPlan:
        """This rank's plan of ``epoch`` (default: the current epoch)."""
        epoch = self._epoch if epoch is None else epoch
        if epoch not in self._plans:
            c = self.cfg
            try:
                p = plan_epoch(self.shards, seed=c.seed, epoch=epoch, world_size=self.world_size,
                               workers=self.workers, batch_size=c.batch_size, drop_last=c.drop_last,
                               shuffle=c.shuffle, shuffle_buffer=c.shuffle_buffer, weights=c.weights,
                               resampled=c.resampled, steps_per_epoch=c.steps_per_epoch, ranks=[self.rank])
            except ValueError as exc:
                raise UserError(f"data: {exc} (dataset {', '.join(c.dataset)})") from None
            self._plans = {epoch: p}
        return self._plans[epoch]

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def classes(self) -> list[str]:
        return self.indexes[0].classes

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate; a resumed position is kept when ``epoch`` is its epoch."""
        if epoch < 0:
            raise UserError(f"epoch: got {epoch}; allowed: >= 0")
        if epoch != self._epoch:
            self._epoch = epoch
            self._consumed = 0

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return self.plan().batches_per_rank

    def state_dict(self) -> dict[str, Any]:
        """Position to resume from: the next batch is batch ``batches`` of epoch ``epoch``."""
        c = self.cfg
        return {"version": STATE_VERSION, "epoch": self._epoch, "batches": self._consumed, "seed": c.seed,
                "world_size": self.world_size, "workers": self.workers, "batch_size": c.batch_size,
                "samples": sum(s.samples for s in self.shards),
                "plan": {k: _plain(getattr(c, k)) for k in _PLAN_SETTINGS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``; refuses states from another world size, worker count, seed, batch size,
        dataset size or plan setting (drop_last, shuffle, shuffle_buffer, weights, resampled,
        steps_per_epoch), because the epoch plan (and so the batches) would differ."""
        try:
            if int(state.get("version", -1)) != STATE_VERSION:
                raise UserError(f"loader state version {state.get('version')!r}; this vidssl reads {STATE_VERSION}")
            mine = self.state_dict()
            for key in ("world_size", "workers", "seed", "batch_size", "samples"):
                if int(state[key]) != mine[key]:
                    raise UserError(f"loader state: {key} was {state[key]} when saved and is {mine[key]} now; the "
                                    f"epoch plan depends on it, so the run cannot resume exactly (set data.{key} "
                                    f"back to {state[key]}, or start a new epoch without loading the state)"
                                    if key != "world_size" else
                                    f"loader state: world_size was {state[key]} when saved and is {mine[key]} now; "
                                    f"resume with {state[key]} ranks, or start a new epoch without the state")
            saved = state.get("plan")  # absent in states written before it was recorded: not checked
            if isinstance(saved, dict):
                for key in _PLAN_SETTINGS:
                    if key in saved and saved[key] != mine["plan"][key]:
                        raise UserError(f"loader state: data.{key} was {saved[key]!r} when saved and is "
                                        f"{mine['plan'][key]!r} now; the epoch plan depends on it, so the run "
                                        f"cannot resume exactly (set data.{key} back, or start a new epoch "
                                        f"without loading the state)")
            epoch, batches = int(state["epoch"]), int(state["batches"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"loader state: malformed ({exc!r}); expected a dict from VideoLoader.state_dict()") from None
        n = self.plan(epoch).batches_per_rank
        if not 0 <= batches <= n:
            raise UserError(f"loader state: batches {batches} outside 0..{n} for epoch {epoch}")
        # A state taken after the epoch's last batch (batches == n) stays at (epoch, n): the next
        # iteration yields nothing and moves on to epoch + 1, as the interrupted loop would have, and
        # a training loop that calls set_epoch(epoch) again does not replay the finished epoch.
        self._epoch, self._consumed = epoch, batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._iterate()

    # -- internals --
    def _reset_stats(self) -> None:
        self.stats = {"errors": collections.Counter(), "error_shards": collections.Counter(), "short": 0,
                      "epoch_errors": 0, "restarts": 0}

    def _record(self, errors: list[tuple]) -> None:
        """Count a batch's errors; warn at a limited rate; enforce the error budget."""
        if not errors:
            return
        for kind, shard, where, msg in errors:
            self.stats["errors"][kind] += 1
            if kind == "short":
                self.stats["short"] += 1
                continue  # a policy outcome, not bad data: not in the budget
            self.stats["epoch_errors"] += 1
            self._epoch_kinds[kind] += 1
            if shard:
                self.stats["error_shards"][shard] += 1
            now = time.monotonic()
            total = sum(v for k, v in self.stats["errors"].items() if k != "short")
            if total <= 3 or now - self._last_warn > 30:
                self._last_warn = now
                log.warning("skipped a sample (%s, shard %s, sample %s): %s [%d skipped so far]",
                            kind, shard or "?", where, msg, total)
        planned = self.plan().batches_per_rank * self.cfg.batch_size
        allowed = math.floor(self.cfg.max_error_fraction * planned)
        if self.stats["epoch_errors"] > allowed:
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(self._epoch_kinds.items()))  # this epoch's, like the count
            shards = ", ".join(f"{s} ({n})" for s, n in self.stats["error_shards"].most_common(10))
            raise RuntimeFailure(
                f"data: {self.stats['epoch_errors']} of {planned} samples planned for rank {self.rank} in epoch "
                f"{self._epoch} failed ({kinds}), more than max_error_fraction={self.cfg.max_error_fraction} "
                f"allows ({allowed}); shards: {shards or 'n/a'}")

    def _iterate(self) -> Iterator[dict[str, Any]]:
        plan = self.plan()
        n = plan.batches_per_rank
        self.stats["epoch_errors"] = 0
        self.stats["error_shards"].clear()
        self._epoch_kinds.clear()
        stage = DecodeStage(self.cfg, self._epoch) if self.cfg.decode_stage == "main" else None
        while self._consumed < n:
            try:
                for batch in self._batches(plan):
                    self._record(batch.pop("_errors"))
                    self.stats["short"] += batch.pop("_short", 0)
                    if stage is not None:
                        batch = stage(batch)
                        self._record(batch.pop("_errors"))
                    batch.pop("_index")
                    self._consumed += 1
                    yield batch
            except RuntimeError as exc:
                # A worker died (its decode watchdog fired, or it crashed): find the sample it was
                # decoding, mark it bad, restart the workers from the consumed position.
                tags = _dead_worker_samples(exc, self._pool[1] if self._pool else None)
                if not tags:
                    raise
                for tag in tags:
                    if tag in self._bad:
                        raise RuntimeFailure(f"data: a worker died twice on sample {tag}") from exc
                    self._bad.add(tag)
                self.stats["restarts"] += 1
                log.warning("a loader worker died while decoding %s (decode_timeout=%ss?); restarting workers "
                            "from batch %d, skipping that sample", ", ".join(tags), self.cfg.decode_timeout,
                            self._consumed)
                self.close()  # that DataLoader lost a worker: the next pass starts fresh ones
                continue
        self._epoch += 1
        self._consumed = 0

    def _workers_pool(self) -> tuple[Any, str, str]:
        """(DataLoader, marker dir, job file): worker processes started once and kept across epochs
        and resumes; each iteration sends them its :class:`_Job` through the job file."""
        if self._pool is None:
            c = self.cfg
            # Import what the workers need here, once: forked workers inherit the loaded modules
            # instead of each importing them again (~1 s for torchvision).
            import av  # noqa: F401, PLC0415

            if c.augment != "none":
                import torchvision.transforms.v2.functional  # noqa: F401, PLC0415
            tmp = tempfile.mkdtemp(prefix="vidssl-loader-")
            markers = os.path.join(tmp, "markers")
            os.mkdir(markers)
            job_path = os.path.join(tmp, "job.pkl")
            # Ring hand-back flags (see _BatchRing): per worker, enough slots for every batch torch
            # lets be in flight (prefetch × workers) plus the one being filled.
            flags = torch.zeros(c.workers, c.prefetch * c.workers + 1, dtype=torch.uint8).share_memory_()
            ds = _EpochDataset(c, self.shards, self.rank, job_path=job_path, marker_dir=markers, ring_flags=flags)
            # Plan workers with no batches left simply yield nothing.
            dl = torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=c.workers, prefetch_factor=c.prefetch,
                worker_init_fn=_worker_init, pin_memory=c.pin_memory, persistent_workers=True,
                collate_fn=_as_is)
            self._pool = (dl, markers, job_path)
        return self._pool

    def close(self) -> None:
        """Stop the worker processes (they persist across epochs) and remove their temporary files.
        Iterating again afterwards starts new workers. Also called when the loader is garbage-collected."""
        pool, self._pool = getattr(self, "_pool", None), None
        if pool is None:
            return
        dl, markers, _job = pool
        it = getattr(dl, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
        dl._iterator = None
        self._ring_views = {}
        shutil.rmtree(os.path.dirname(markers), ignore_errors=True)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter shutdown
            pass

    def _batches(self, plan: EpochPlan) -> Iterator[dict[str, Any]]:
        c = self.cfg
        start = self._consumed
        consumed = [len(range(k, start, self.workers)) for k in range(self.workers)]
        job = _Job(plan, consumed, start % self.workers, frozenset(self._bad))
        self._generation += 1
        gen = self._generation
        if c.workers == 0:
            source: Any = iter(_EpochDataset(c, self.shards, self.rank, job=job))
        else:
            dl, _markers, job_path = self._workers_pool()
            tmp = job_path + ".tmp"
            with open(tmp, "wb") as f:
                pickle.dump(job, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(tmp, job_path)  # before iter(): the persistent workers read it when they restart
            flags = dl.dataset.ring_flags
            flags.zero_()  # slots held by batches of an abandoned iteration: those are discarded unread
            source = iter(dl)
        waiting: dict[int, dict[str, Any]] = {}
        nxt = start
        while True:
            if gen != self._generation:
                # The persistent workers now serve a newer iteration of this loader.
                raise RuntimeFailure("data: this loader was iterated again before an earlier iteration finished; "
                                     "only the newest iteration can continue")
            try:
                batch = next(source, None)
            except (RuntimeFailure, UserError) as exc:
                # Raised in a worker, re-raised here by torch as "Caught X in DataLoader worker
                # process N. Original Traceback ...": keep our one-line message for the CLI.
                raise type(exc)(_worker_message(str(exc))) from None
            if batch is None:
                break
            if c.workers:
                _copy_out(batch, flags, self._ring_views)  # at once: the worker reuses the slot after this
                _from_wire(batch)
            waiting[batch["_index"]] = batch
            while nxt in waiting:
                yield waiting.pop(nxt)
                nxt += 1
        if waiting or nxt != plan.batches_per_rank:
            raise RuntimeFailure(f"data: rank {self.rank} received batches up to {nxt} of "
                                 f"{plan.batches_per_rank} (internal plan error)")


def _worker_message(msg: str) -> str:
    """The original message of an exception torch re-raised from a DataLoader worker (the last line
    of the worker's traceback, "module.Type: message"); ``msg`` itself when it is not one."""
    if "Original Traceback" not in msg:
        return msg
    last = msg.rstrip().splitlines()[-1]
    _, sep, rest = last.partition(": ")
    return rest if sep else last


def _dead_worker_samples(exc: RuntimeError, marker_dir: str | None) -> list[str]:
    # "DataLoader worker (pid(s) 12, 34) exited unexpectedly" or "... (pid 12) is killed by signal: ..."
    m = re.search(r"pid(?:\(s\))? ([\d, ]+)", str(exc))
    if not m or not marker_dir:
        return []
    pids = {p.strip() for p in m.group(1).split(",") if p.strip()}
    tags = []
    for name in os.listdir(marker_dir):
        try:
            text = open(os.path.join(marker_dir, name)).read().strip()  # noqa: SIM115
        except OSError:
            continue
        if text:
            pid, _, tag = text.partition(" ")
            if pid in pids and tag:
                tags.append(tag)
    return tags


def build_loader(cfg: DataConfig, rank: int | None = None, world_size: int | None = None) -> VideoLoader:
    """Open the dataset index(es) and return this rank's :class:`VideoLoader`.

    ``rank``/``world_size`` default to torch.distributed's when it is initialised, else 0/1.
    Raises UserError for a missing or malformed dataset and impossible plans.
    """
    if world_size is None or rank is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        else:
            rank = 0 if rank is None else rank
            world_size = 1 if world_size is None else world_size
    indexes = [open_index(d, cfg.read_timeout) for d in cfg.dataset]
    return VideoLoader(cfg, rank, world_size, indexes)
