"""Stage "plan → batches": what one DataLoader worker does (or the main process with ``workers: 0``).

    in:   a :class:`Job`: this rank's epoch plan, batches already consumed, samples known to hang
    read_segment (stream.py)       → (read position, Sample | Failure), in read order
    shuffle buffer (here)          → samples in the plan's emission order; early arrivals held
    process (transform.py + guard) → (row, short) | (RawRow, short) for decode_stage=main | SampleError
    substitute (here)              → a failed row becomes a copy of a good row, valid=False
    collate (collate.py, wire.py)  → the batch dict, windows in a shared-memory ring slot
    out:  one :class:`~vidssl.data.records.WorkerBatch` per local batch of this worker

Batches that fail partly keep their size, so every rank yields the planned number of full batches.
"""

from __future__ import annotations

import collections
import dataclasses
import pickle
from typing import Any, Callable, Iterator

import torch

from vidssl.data.clips import ShortVideo
from vidssl.data.collate import collate
from vidssl.data.config import DataConfig
from vidssl.data.decode import DecodeError, decode_counts
from vidssl.data.guards import ThreadGuard, WorkerGuard
from vidssl.data.plan import EpochPlan, ShardRef, WorkerPlan
from vidssl.data.records import RawRow, SampleError, WorkerBatch
from vidssl.data.stream import Failure, Sample, read_segment
from vidssl.data.transform import SampleProcessor
from vidssl.data.windows import WINDOWS_BY_MODE
from vidssl.data.wire import ArenaRef, BatchRing, to_wire
from vidssl.errors import RuntimeFailure

__all__ = ["Job", "WorkerStream", "EpochDataset", "worker_init", "as_is", "worker_message"]

@dataclasses.dataclass(frozen=True)
class Job:
    """One iteration's work for the workers: this rank's epoch plan, local batches already consumed
    per plan worker, which plan worker DataLoader worker 0 serves, and samples known to hang."""

    plan: EpochPlan
    consumed: list[int]
    rotate: int
    bad: frozenset[str]


class WorkerStream:
    """Produces one worker's batches of an epoch, from local batch ``skip`` on.

    Emits decoded batches (decode_stage=worker) or batches of :class:`RawRow` (compressed bytes +
    frame plans) for the main-process :class:`~vidssl.data.decode_stage.DecodeStage` (decode_stage=main).
    """

    def __init__(self, cfg: DataConfig, shards: list[ShardRef], wp: WorkerPlan, epoch: int, skip: int,
                 bad: frozenset[str], guard=None, ring: BatchRing | None = None) -> None:
        self.cfg, self.shards, self.wp, self.epoch, self.skip, self.bad = cfg, shards, wp, epoch, skip, bad
        self.guard, self.ring = guard, ring
        self.raw = cfg.decode_stage == "main"
        self.proc = SampleProcessor(cfg, decoder=None if not self.raw else _NoDecoder())
        self.positions = wp.positions()  # read position → (shard, ordinal, pad)
        self.last_good: dict[str, Any] | None = None
        self.ahead: dict[int, Any] = {}  # read position → result processed ahead of its turn

    # -- read: segments → (read position, item) -------------------------------------------------
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

    # -- process: item → result -----------------------------------------------------------------
    def _error(self, p: int, kind: str, message: str) -> SampleError:
        shard, ordinal, _pad = self.positions[p]
        return SampleError(kind, self.shards[shard].name, ordinal, message)

    def _process(self, p: int, item: Sample | Failure) -> Any:
        """Read position ``p`` processed: (row, short), or (RawRow, short) with decode_stage=main, when
        usable; else the :class:`SampleError` saying why not."""
        if isinstance(item, Failure):
            return self._error(p, item.kind, item.message)
        shard_i, ordinal, pad = self.positions[p]
        shard = self.shards[shard_i]
        tag = f"{shard.dataset}/{item.key}"
        if tag in self.bad:
            return self._error(p, "timeout", f"sample {item.key}: its decode hung earlier "
                               f"(decode_timeout={self.cfg.decode_timeout}s); skipped")
        try:
            if self.raw:
                windows, short = self.proc.plan_short(item, shard.dataset, self.epoch)
                return RawRow(item, shard.dataset, shard.name, ordinal, windows, short, pad), short
            fn = lambda: self.proc.process(item, shard.dataset, self.epoch)  # noqa: E731
            return self.guard(fn, tag) if self.guard is not None else fn()
        except ShortVideo as exc:
            return self._error(p, "short", f"sample {item.key}: {exc}")
        except DecodeError as exc:
            return self._error(p, "decode", f"sample {item.key}: {exc}")
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a counted skip, not a crash
            return self._error(p, "decode", f"sample {item.key}: {type(exc).__name__}: {exc}")

    # -- the batches ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[WorkerBatch]:
        wp, B = self.wp, self.wp.batch_size
        order = wp.order
        consumed = set(order[: self.skip * B])
        held: dict[int, Sample | Failure] = {}  # the shuffle buffer: read, waiting for their turn
        reader = self._read(consumed)

        def fetch(p: int) -> Sample | Failure:
            while p not in held:
                rp, item = next(reader)
                if item is not None:
                    held[rp] = item
            return held.pop(p)

        for b in range(self.skip, wp.batches):
            batch_pos = order[b * B:(b + 1) * B]
            count0 = decode_counts(self.proc.decoder)
            results = [self.ahead.pop(p) if p in self.ahead else self._process(p, fetch(p)) for p in batch_pos]
            errors = [r for r in results if isinstance(r, SampleError)]
            # Planned samples (not padding repeats) too short for the plan that loop/pad stretched.
            n_short = sum(1 for p, r in zip(batch_pos, results)
                          if not isinstance(r, SampleError) and r[1] and not self.positions[p][2])
            wb = WorkerBatch(wp.rank_batch(b), errors, n_short)
            count1 = decode_counts(self.proc.decoder)
            wb.decoded = (count1[0] - count0[0], count1[1] - count0[1])
            if self.raw:
                wb.raw = [None if isinstance(r, SampleError) else r[0] for r in results]
            else:
                rows, valid = self._substitute(b, batch_pos, results, errors, fetch)
                self._collate(wb, rows, valid)
            yield wb

    def _substitute(self, b: int, batch_pos: list[int], results: list, errors: list[SampleError],
                    fetch: Callable[[int], Any]) -> tuple[list[dict[str, Any]], list[bool]]:
        """Rows and valid flags of batch ``b``: each failed row becomes a copy of a good row of the same
        batch (else the worker's last good row, else the next good one) with ``valid=False``."""
        good = [r[0] for r in results if not isinstance(r, SampleError)]
        if not good and self.last_good is None:
            good = self._look_ahead(b, fetch, errors)
        fill = good or [self.last_good]
        rows, valid = [], []
        for j, (p, r) in enumerate(zip(batch_pos, results)):
            if isinstance(r, SampleError):
                rows.append(fill[j % len(fill)])
                valid.append(False)
            else:
                rows.append(r[0])
                valid.append(not self.positions[p][2])
        if good:
            self.last_good = good[-1]
        return rows, valid

    def _collate(self, wb: WorkerBatch, rows: list[dict[str, Any]], valid: list[bool]) -> None:
        """Collate into a free shared-memory ring slot when there is one (see wire.BatchRing)."""
        ring = self.ring if self.ring is not None and self.ring.acquire() is not None else None
        wb.batch = collate(rows, valid, self.cfg.mode, None if ring is None else ring.out)
        if ring is not None:
            used = False
            for n in WINDOWS_BY_MODE[self.cfg.mode]:
                v = wb.batch[n]
                if isinstance(v, list) and ring.arena_dir is not None:
                    # Native-size rows that could not be stacked: each row into its own buffer file.
                    wb.batch[n] = v = ring.rows(n, v)
                ref = ring.ref(v)
                if ref is not None:
                    wb.batch[n] = ref  # the window stays in the slot's file; only its name travels
                used = used or isinstance(v, torch.Tensor) or (isinstance(v, list) and isinstance(v[0], ArenaRef))
            if used:
                wb.ring = (ring.worker, ring.slot)
            else:
                ring.release_unused()

    def _look_ahead(self, b: int, fetch: Callable[[int], Any], errors: list[SampleError]) -> list:
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
            if not isinstance(res, SampleError):
                return [res[0]]
            failed.append(res)
        kinds = collections.Counter(f.kind for f in failed)
        shards = collections.Counter(f.shard for f in failed)
        raise RuntimeFailure(
            f"data: rank {self.wp.rank} worker {self.wp.worker} of epoch {self.epoch}: none of the "
            f"{len(self.wp.order) - b * B} samples left in its plan could be used "
            f"({', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}), so no sample can stand in for them; "
            f"shards: {', '.join(f'{s} ({n})' for s, n in shards.most_common(10))}; first error: {failed[0].message}")


class _NoDecoder:
    name = "none"

    def decode(self, *a, **k):  # pragma: no cover - raw mode never decodes in workers
        raise AssertionError("workers do not decode with decode_stage=main")


class EpochDataset(torch.utils.data.IterableDataset):
    """What each DataLoader worker runs: its slice of an epoch plan.

    The workers persist across epochs (forking fresh ones every epoch cost page faults and start-up
    on every epoch), so the epoch is not built into the dataset: each ``__iter__`` reads the current
    :class:`Job` from ``job_path``, a small pickle the main process (this loader, never shard
    content) rewrites before every ``iter(DataLoader)``. With ``workers: 0`` the job is given directly.
    """

    def __init__(self, cfg, shards, rank: int, job_path: str | None = None, marker_dir: str | None = None,
                 job: Job | None = None, ring_flags: torch.Tensor | None = None, arena_dir: str | None = None) -> None:
        super().__init__()
        self.cfg, self.shards, self.rank = cfg, shards, rank
        self.job_path, self.marker_dir, self.job, self.ring_flags = job_path, marker_dir, job, ring_flags
        self.arena_dir = arena_dir  # the loader's folder on /dev/shm for ring buffers (None: torch tensors)
        self._guard = None  # per worker process, made on its first epoch and reused
        self._ring: BatchRing | None = None  # likewise

    def _job(self) -> Job:
        if self.job is not None:
            return self.job
        with open(self.job_path, "rb") as f:
            return pickle.load(f)  # noqa: S301 - written by this loader's main process, not shard content

    def __iter__(self) -> Iterator[WorkerBatch]:
        job = self._job()
        info = torch.utils.data.get_worker_info()
        k_dl = info.id if info is not None else 0
        # DataLoader worker 0 serves the plan worker owning the next batch, so batches arrive in order.
        k = (k_dl + job.rotate) % job.plan.workers
        guard = None
        if self.cfg.decode_stage == "worker":
            if self._guard is None:
                # Marker files are per DataLoader worker (a process), not per plan worker: roles rotate.
                self._guard = (WorkerGuard(self.marker_dir, k_dl, self.cfg.decode_timeout)
                               if info is not None and self.marker_dir else ThreadGuard(self.cfg.decode_timeout))
            guard = self._guard
        if self._ring is None and self.ring_flags is not None and info is not None:
            self._ring = BatchRing(self.ring_flags, k_dl, self.arena_dir)
        wp = job.plan.worker(self.rank, k)
        stream = WorkerStream(self.cfg, self.shards, wp, job.plan.epoch, job.consumed[k], job.bad, guard, self._ring)
        if info is None:
            yield from stream
        else:
            for wb in stream:
                yield to_wire(wb)


def as_is(batch: WorkerBatch) -> WorkerBatch:
    """The DataLoader's ``collate_fn``: our batches are complete (torch's default_convert would turn
    :func:`~vidssl.data.wire.to_wire`'s numpy arrays back into tensors in the worker)."""
    return batch


def worker_init(_worker_id: int) -> None:
    """Parallelism comes from the workers: one intra-op thread each; FFmpeg's log bridge off."""
    torch.set_num_threads(1)
    try:
        import av.logging  # noqa: PLC0415

        av.logging.set_level(None)
    except Exception:  # noqa: BLE001  # pragma: no cover
        pass


def worker_message(msg: str) -> str:
    """The original message of an exception torch re-raised from a DataLoader worker (the last line
    of the worker's traceback, "module.Type: message"); ``msg`` itself when it is not one."""
    if "Original Traceback" not in msg:
        return msg
    last = msg.rstrip().splitlines()[-1]
    _, sep, rest = last.partition(": ")
    return rest if sep else last
