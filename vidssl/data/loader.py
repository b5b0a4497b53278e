"""``build_loader``: the streaming clip loader, with mid-epoch resume and an error budget.

The pipeline is a list of stages, one module each; what flows at each boundary::

    PlanSpec.plan (plan.py, main, pure)  → EpochPlan: per (rank, worker) shard segments + emission order
    ── Job (worker.py) via a job file ──▶ DataLoader workers (persist across epochs and resumes)
    read_segment (stream.py, worker)     → Sample (json meta, mp4 bytes, label) | Failure | None (consumed)
    shuffle buffer (worker.py)           → samples in the plan's emission order, ≤ shuffle_buffer held
    SampleProcessor (transform.py)       → plan {window: frame numbers} → decode → augment → row
                                           (decode_stage=main: workers stop at the plan: RawRow)
    guards (guards.py)                   → a hung decode kills its worker / is abandoned (main)
    substitute + collate (worker.py, collate.py) → batch dict, uint8 (B, T, C, H, W) windows
    ── WorkerBatch (records.py): batch + index, SampleErrors, short count; windows in a
       shared-memory ring slot, small arrays pickled (wire.py) ──▶ main process
    VideoLoader._batches (here)          → reorders by batch number
    VideoLoader._iterate (here)          → counts errors (budget), [DecodeStage (decode_stage.py):
                                           RawRows → batch], counts consumed batches where the
                                           trainer receives them → the trainer gets the batch dict

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
import shutil
import tempfile
import time
from typing import Any, Iterator

import torch

from vidssl.data.config import DataConfig
from vidssl.data.decode import decode_counts, resolve_backend, torchcodec_available
from vidssl.data.decode_stage import DecodeStage
from vidssl.data.guards import dead_worker_samples
from vidssl.data.index import DatasetIndex, open_index
from vidssl.data.plan import EpochPlan, PlanSpec, consumed_per_worker, shard_refs
from vidssl.data.records import SampleError, WorkerBatch
from vidssl.data.transform import SampleProcessor
from vidssl.data.wire import ArenaMaps, copy_out, from_wire
from vidssl.data.worker import EpochDataset, Job, as_is, worker_init, worker_message
from vidssl.errors import RuntimeFailure, UserError
from vidssl.fsio import atomic_write_bytes

__all__ = ["build_loader", "VideoLoader", "SampleProcessor", "DecodeStage", "STATE_VERSION"]

log = logging.getLogger("vidssl.data")

STATE_VERSION = 1


class VideoLoader:
    """Iterable of batches for one rank; see :func:`build_loader` and docs/data.md."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, indexes: list[DatasetIndex]) -> None:
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world_size {world_size}")
        self.cfg, self.rank, self.world_size, self.indexes = cfg, rank, world_size, indexes
        self.shards = shard_refs(indexes)
        self.spec = PlanSpec.from_config(cfg, world_size)  # everything the epoch plan depends on
        self.workers = self.spec.workers
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
        self._ring_views: dict[tuple[int, int, str], torch.Tensor] = {}  # see wire.copy_out
        self._arena_maps = ArenaMaps()  # the workers' ring buffer files, mapped here (see wire.BatchRing)
        self.plan(0)  # fail early (e.g. too few samples) with the user's settings in the message
        self.decode_device, self.backend = self._choose_decoder()
        self.stats["backend"], self.stats["decode_device"] = self.backend, self.decode_device

    # -- public API --
    def plan(self, epoch: int | None = None) -> EpochPlan:
        """This rank's plan of ``epoch`` (default: the current epoch)."""
        epoch = self._epoch if epoch is None else epoch
        if epoch not in self._plans:
            try:
                p = self.spec.plan(self.shards, epoch, ranks=[self.rank])
            except ValueError as exc:
                raise UserError(f"data: {exc} (dataset {', '.join(self.cfg.dataset)})") from None
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
        s = self.spec
        return {"version": STATE_VERSION, "epoch": self._epoch, "batches": self._consumed, "seed": s.seed,
                "world_size": s.world_size, "workers": s.workers, "batch_size": s.batch_size,
                "samples": sum(r.samples for r in self.shards), "plan": s.order_settings()}

    def load_state_dict(self, state: dict[str, Any], *, reshard: bool = False) -> None:
        """Resume at ``state``; refuses states from another world size, worker count, seed, batch size,
        dataset size or plan setting (drop_last, shuffle, shuffle_buffer, weights, resampled,
        steps_per_epoch), because the epoch plan (and so the batches) would differ.

        ``reshard``: a state from another world size or worker count is accepted and mapped to the same
        point of its epoch: batch ``floor(b · n / n_saved)`` of this loader's ``n`` batches per rank
        (``n_saved`` under the saved world size and workers; a finished epoch stays finished). The rest
        of that epoch is then approximate (some samples repeat, some are left out); later epochs follow
        this loader's own plan exactly."""
        try:
            if int(state.get("version", -1)) != STATE_VERSION:
                raise UserError(f"loader state version {state.get('version')!r}; this vidssl reads {STATE_VERSION}")
            mine = self.state_dict()
            moved = reshard and (int(state["world_size"]), int(state["workers"])) != (mine["world_size"],
                                                                                      mine["workers"])
            for key in ("world_size", "workers", "seed", "batch_size", "samples"):
                if moved and key in ("world_size", "workers"):
                    continue
                if int(state[key]) != mine[key]:
                    raise UserError(f"loader state: {key} was {state[key]} when saved and is {mine[key]} now; the "
                                    f"epoch plan depends on it, so the run cannot resume exactly (set data.{key} "
                                    f"back to {state[key]}, or start a new epoch without loading the state)"
                                    if key != "world_size" else
                                    f"loader state: world_size was {state[key]} when saved and is {mine[key]} now; "
                                    f"resume with {state[key]} ranks, or start a new epoch without the state")
            saved = state.get("plan")  # absent in states written before it was recorded: not checked
            if isinstance(saved, dict):
                for key in PlanSpec.ORDER_SETTINGS:
                    if key in saved and saved[key] != mine["plan"][key]:
                        raise UserError(f"loader state: data.{key} was {saved[key]!r} when saved and is "
                                        f"{mine['plan'][key]!r} now; the epoch plan depends on it, so the run "
                                        f"cannot resume exactly (set data.{key} back, or start a new epoch "
                                        f"without loading the state)")
            epoch, batches = int(state["epoch"]), int(state["batches"])
            if moved:
                old_world, old_workers = int(state["world_size"]), int(state["workers"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"loader state: malformed ({exc!r}); expected a dict from VideoLoader.state_dict()") from None
        n = self.plan(epoch).batches_per_rank
        if moved:
            if old_world < 1 or old_workers < 1:
                raise UserError(f"loader state: world_size {old_world} and workers {old_workers}; both must be >= 1")
            try:
                saved_spec = dataclasses.replace(self.spec, world_size=old_world, workers=old_workers)
                n_saved = saved_spec.plan(self.shards, epoch, ranks=[0]).batches_per_rank
            except ValueError as exc:
                raise UserError(f"loader state: its plan at world size {old_world}: {exc}") from None
            if not 0 <= batches <= n_saved:
                raise UserError(f"loader state: batches {batches} outside 0..{n_saved} for epoch {epoch} at "
                                f"world size {old_world}")
            batches = n if 0 < batches == n_saved else min(n, batches * n // max(1, n_saved))
        if not 0 <= batches <= n:
            raise UserError(f"loader state: batches {batches} outside 0..{n} for epoch {epoch}")
        # A state taken after the epoch's last batch (batches == n) stays at (epoch, n): the next
        # iteration yields nothing and moves on to epoch + 1, as the interrupted loop would have, and
        # a training loop that calls set_epoch(epoch) again does not replay the finished epoch.
        self._epoch, self._consumed = epoch, batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._iterate()

    # -- internals --
    def _choose_decoder(self) -> tuple[str, str]:
        """(device, backend) that will decode, checked before any batch: a clear UserError when the
        configured one cannot run here (or, with ``decode_fallback: cpu``, the CPU with a warning)."""
        c = self.cfg
        device = c.decode_device
        if device == "cuda":
            from vidssl.data.cuda import cuda_decode_problem  # noqa: PLC0415 - imports torch.cuda

            problem = cuda_decode_problem(c, [s.url for s in self.shards if s.samples])
            if problem:
                if c.decode_fallback != "cpu":
                    raise UserError(f"data.decode_device=cuda: {problem}; set data.decode_device=cpu, or "
                                    f"data.decode_fallback=cpu to fall back to CPU decoding with a warning")
                log.warning("=" * 72)
                log.warning("data.decode_device=cuda is not available: %s", problem)
                log.warning("FALLING BACK TO CPU DECODING in the main process (decode_fallback=cpu): "
                            "expect far fewer clips/s than on the GPU")
                log.warning("=" * 72)
                device = "cpu"
        backend = resolve_backend(c.backend, device)
        if backend == "torchcodec" and device == "cpu":
            why = torchcodec_available()
            if why:
                if c.backend == "torchcodec":
                    raise UserError(f"data.backend=torchcodec: {why}; or set data.backend=auto (PyAV)")
                backend = "pyav"  # auto after a cuda fallback: the CPU's default decoder
        return device, backend

    def _reset_stats(self) -> None:
        self.stats = {"errors": collections.Counter(), "error_shards": collections.Counter(), "short": 0,
                      "epoch_errors": 0, "restarts": 0, "pictures_decoded": 0, "pictures_read": 0}

    def _count_decoded(self, decoded: tuple[int, int]) -> None:
        """Add a batch's (pictures decoded, pictures read) to ``stats`` (the PyAV backend counts them:
        their ratio is what skipping unwanted non-reference pictures saved, docs/data.md)."""
        self.stats["pictures_decoded"] += decoded[0]
        self.stats["pictures_read"] += decoded[1]

    def _record(self, errors: list[SampleError]) -> None:
        """Count a batch's errors; warn at a limited rate; enforce the error budget."""
        if not errors:
            return
        for err in errors:
            kind, shard = err.kind, err.shard
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
                            kind, shard or "?", err.ordinal, err.message, total)
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
        stage = (DecodeStage(self.cfg, self._epoch, self.decode_device, self.backend)
                 if self.cfg.decode_stage == "main" else None)
        while self._consumed < n:
            try:
                for wb in self._batches(plan):
                    self._record(wb.errors)
                    self.stats["short"] += wb.short
                    self._count_decoded(wb.decoded)
                    batch = wb.batch
                    if stage is not None:
                        count0 = decode_counts(stage.proc.decoder)
                        batch, errors = stage(wb)
                        count1 = decode_counts(stage.proc.decoder)
                        self._count_decoded((count1[0] - count0[0], count1[1] - count0[1]))
                        self._record(errors)
                    self._consumed += 1
                    yield batch
            except RuntimeError as exc:
                # A worker died (its decode watchdog fired, or it crashed): find the sample it was
                # decoding, mark it bad, restart the workers from the consumed position.
                tags = dead_worker_samples(exc, self._pool[1] if self._pool else None)
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
        and resumes; each iteration sends them its :class:`~vidssl.data.worker.Job` through the job file."""
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
            # Ring hand-back flags (see wire.BatchRing): per worker, enough slots for every batch torch
            # lets be in flight (prefetch × workers) plus the one being filled.
            flags = torch.zeros(c.workers, c.prefetch * c.workers + 1, dtype=torch.uint8).share_memory_()
            ds = EpochDataset(c, self.shards, self.rank, job_path=job_path, marker_dir=markers, ring_flags=flags,
                              arena_dir=_arena_dir(tmp))
            # Plan workers with no batches left simply yield nothing.
            dl = torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=c.workers, prefetch_factor=c.prefetch,
                worker_init_fn=worker_init, pin_memory=c.pin_memory, persistent_workers=True,
                collate_fn=as_is)
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
        self._arena_maps.clear()
        if dl.dataset.arena_dir:
            shutil.rmtree(dl.dataset.arena_dir, ignore_errors=True)
        shutil.rmtree(os.path.dirname(markers), ignore_errors=True)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - best effort at interpreter shutdown
            pass

    def _batches(self, plan: EpochPlan) -> Iterator[WorkerBatch]:
        """This rank's batches from the consumed position on, in batch order (workers finish out of order)."""
        c = self.cfg
        start = self._consumed
        job = Job(plan, consumed_per_worker(start, self.workers), start % self.workers, frozenset(self._bad))
        self._generation += 1
        gen = self._generation
        if c.workers == 0:
            source: Any = iter(EpochDataset(c, self.shards, self.rank, job=job))
        else:
            dl, _markers, job_path = self._workers_pool()
            # Before iter(): the persistent workers read it when they restart. Not durable: it is a
            # hand-over to live processes, meaningless after a crash.
            atomic_write_bytes(job_path, pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL), durable=False)
            flags = dl.dataset.ring_flags
            flags.zero_()  # slots held by batches of an abandoned iteration: those are discarded unread
            pin = c.pin_memory and torch.cuda.is_available()
            source = iter(dl)
        waiting: dict[int, WorkerBatch] = {}
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
                raise type(exc)(worker_message(str(exc))) from None
            if batch is None:
                break
            if c.workers:
                # At once: the worker reuses the slot after this.
                # (torch's DataLoader pins only with a GPU present, and so does this copy.)
                copy_out(batch, flags, self._ring_views, self._arena_maps, pin=pin)
                from_wire(batch)
            waiting[batch.index] = batch
            while nxt in waiting:
                yield waiting.pop(nxt)
                nxt += 1
        if waiting or nxt != plan.batches_per_rank:
            raise RuntimeFailure(f"data: rank {self.rank} received batches up to {nxt} of "
                                 f"{plan.batches_per_rank} (internal plan error)")



def _arena_dir(tmp: str) -> str | None:
    """A folder on /dev/shm (RAM) for the workers' ring buffer files, named after the loader's temporary
    folder ``tmp`` and removed with it; None where there is no writable /dev/shm (then the ring uses
    torch's shared-memory tensors). Set VIDSSL_RING_FILES=0 to force that."""
    if os.environ.get("VIDSSL_RING_FILES", "1") == "0" or not os.path.isdir("/dev/shm"):
        return None
    try:
        return tempfile.mkdtemp(prefix=os.path.basename(tmp) + "-ring-", dir="/dev/shm")
    except OSError:
        return None


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
