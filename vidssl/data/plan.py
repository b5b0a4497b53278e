"""The epoch plan: which samples each (rank, worker) reads, in which order, in which batch.

A pure function of (seed, epoch, per-shard sample counts, world size, workers, batch size and the
order options): no file is opened, so every rank computes the same plan independently and a
resumed run recomputes exactly the plan it was interrupted in.

Layout of an epoch (epoch mode)::

    shards of each dataset, permuted by (seed, epoch, dataset), cut to weight × samples
      → all selected shard runs permuted together by (seed, epoch)
      → one sequence of M sample positions; rank r owns positions [r·S, (r+1)·S), S = nb·B
        (positions ≥ M wrap around: explicit padding, flagged)
      → the rank's region is split into `workers` contiguous parts; worker k serves the rank's
        batches j with j % workers == k (the order torch's DataLoader collects them in)
      → each worker's part passes through a seeded shuffle buffer, simulated here on indices

Every rank gets exactly ``nb`` batches: ``M // (W·B)`` with ``drop_last`` (the dropped tail is a
different set each epoch), ``ceil(M / (W·B))`` without (padding repeats samples from the start).
Resampled mode draws shards with replacement (weighted) for a fixed ``steps_per_epoch``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

__all__ = ["ShardRef", "Segment", "WorkerPlan", "EpochPlan", "PlanSpec", "plan_epoch", "shard_refs",
           "worker_batch_counts", "consumed_per_worker", "rank_batches"]


@dataclass(frozen=True)
class ShardRef:
    """One shard of one dataset: ``dataset`` index among mixed datasets, its URL and sample count."""

    dataset: int
    name: str
    url: str
    samples: int


def shard_refs(indexes: Sequence) -> list[ShardRef]:
    """The global shard list of (mixed) datasets, in index order: what every plan refers to by position.
    ``indexes``: :class:`~vidssl.data.index.DatasetIndex` objects, one per dataset."""
    return [ShardRef(d, name, url, n) for d, ix in enumerate(indexes) for name, url, n in ix.shards]


@dataclass(frozen=True)
class PlanSpec:
    """Everything the epoch plan depends on besides the shard list and the epoch: built once from the
    data config and the world size (:meth:`from_config`), used by the loader, ``vidssl data plan``
    and the resume checks, so the settings are written in one place."""

    seed: int
    world_size: int
    workers: int
    batch_size: int
    drop_last: bool = True
    shuffle: bool = True
    shuffle_buffer: int = 1
    weights: tuple[float, ...] = ()
    resampled: bool = False
    steps_per_epoch: int = 0

    #: Settings besides seed, world size, workers and batch size that a saved loader state records.
    ORDER_SETTINGS = ("drop_last", "shuffle", "shuffle_buffer", "weights", "resampled", "steps_per_epoch")

    @classmethod
    def from_config(cls, cfg, world_size: int) -> "PlanSpec":
        """From a :class:`~vidssl.data.config.DataConfig` (its ``logical_workers``) and the world size."""
        return cls(seed=cfg.seed, world_size=world_size, workers=cfg.logical_workers, batch_size=cfg.batch_size,
                   drop_last=cfg.drop_last, shuffle=cfg.shuffle, shuffle_buffer=cfg.shuffle_buffer,
                   weights=tuple(float(w) for w in cfg.weights), resampled=cfg.resampled,
                   steps_per_epoch=cfg.steps_per_epoch)

    def plan(self, shards: Sequence[ShardRef], epoch: int, ranks: Sequence[int] | None = None) -> EpochPlan:
        """:func:`plan_epoch` with these settings."""
        return plan_epoch(shards, seed=self.seed, epoch=epoch, world_size=self.world_size, workers=self.workers,
                          batch_size=self.batch_size, drop_last=self.drop_last, shuffle=self.shuffle,
                          shuffle_buffer=self.shuffle_buffer, weights=self.weights, resampled=self.resampled,
                          steps_per_epoch=self.steps_per_epoch, ranks=ranks)

    def order_settings(self) -> dict:
        """The :attr:`ORDER_SETTINGS` as plain JSON-able values (what a loader state saves and compares)."""
        return {k: list(v) if isinstance(v, tuple) else v for k in self.ORDER_SETTINGS for v in [getattr(self, k)]}


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` (ordinal within the tar) of global shard ``shard``; ``pad`` marks repeats."""

    shard: int
    start: int
    stop: int
    pad: bool = False

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class WorkerPlan:
    """What one worker of one rank does in an epoch.

    ``segments`` are read in order; together they give ``len(order)`` read positions.
    ``order[i]`` is the read position emitted i-th (after the shuffle buffer); emitted sample i
    goes to the worker's local batch ``i // batch_size``, which is the rank's batch
    ``(i // batch_size) * workers + worker``.
    """

    rank: int
    worker: int
    workers: int
    batch_size: int
    batches: int
    segments: list[Segment]
    order: list[int]

    def rank_batch(self, local: int) -> int:
        """Rank-level batch number of this worker's ``local``-th batch."""
        return local * self.workers + self.worker

    def positions(self) -> list[tuple[int, int, bool]]:
        """(global shard, sample ordinal, pad) for every read position, in read order."""
        out = []
        for seg in self.segments:
            out.extend((seg.shard, i, seg.pad) for i in range(seg.start, seg.stop))
        return out


@dataclass
class EpochPlan:
    """The plan of one epoch for every (rank, worker); summary numbers for reporting."""

    epoch: int
    world_size: int
    workers: int
    batch_size: int
    batches_per_rank: int
    samples_total: int        # samples in the index (all datasets, before weights)
    samples_selected: int     # samples the epoch is drawn from (after weights)
    samples_covered: int      # distinct samples that appear in the epoch
    samples_padding: int      # positions that repeat a sample (drop_last off)
    samples_dropped: int      # selected samples left out by drop_last
    resampled: bool
    plans: dict[tuple[int, int], WorkerPlan]

    @property
    def coverage(self) -> float:
        """Fraction of the whole dataset (all samples in the index) seen this epoch."""
        return self.samples_covered / self.samples_total if self.samples_total else 0.0

    def worker(self, rank: int, worker: int) -> WorkerPlan:
        return self.plans[(rank, worker)]

    def summary(self) -> dict:
        return {"epoch": self.epoch, "world_size": self.world_size, "workers": self.workers,
                "batch_size": self.batch_size, "batches_per_rank": self.batches_per_rank,
                "samples_total": self.samples_total, "samples_selected": self.samples_selected,
                "samples_covered": self.samples_covered, "samples_padding": self.samples_padding,
                "samples_dropped": self.samples_dropped, "coverage": round(self.coverage, 6),
                "resampled": self.resampled}


def worker_batch_counts(batches: int, workers: int) -> list[int]:
    """Batches served by each worker when worker k serves the rank's batches j ≡ k (mod workers)."""
    return [len(range(k, batches, workers)) for k in range(workers)]


def consumed_per_worker(consumed: int, workers: int) -> list[int]:
    """How many of each worker's batches are among the rank's first ``consumed`` batches."""
    return [len(range(k, consumed, workers)) for k in range(workers)]


def _rng(*parts: object) -> random.Random:
    # String seeds go through SHA-512 in CPython: identical in every process, unlike hash().
    return random.Random("vidssl-plan:" + ":".join(str(p) for p in parts))


def _buffer_order(n: int, size: int, rng: random.Random | None) -> list[int]:
    """Emission order of a shuffle buffer of ``size`` fed read positions 0..n-1 (webdataset style).

    The buffer fills to ``size``; then each new arrival triggers one random emission. At most
    ``size`` samples are ever held, so a worker holds at most ``size`` compressed samples.
    """
    if rng is None or size <= 1:
        return list(range(n))
    buf: list[int] = []
    out: list[int] = []
    for pos in range(n):
        buf.append(pos)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            out.append(buf.pop())
    while buf:
        j = rng.randrange(len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        out.append(buf.pop())
    return out


def _take(runs: Sequence[Segment], start: int, count: int, total: int) -> list[Segment]:
    """Positions ``[start, start+count)`` of the sequence ``runs`` (length ``total``), wrapping
    around past the end; wrapped positions become padding segments."""
    out: list[Segment] = []
    pos = start
    end = start + count
    while pos < end:
        lap, off = divmod(pos, total)
        want = min(end - pos, total - off)
        # walk the runs covering [off, off + want)
        acc = 0
        for run in runs:
            if acc + run.size <= off:
                acc += run.size
                continue
            if acc >= off + want:
                break
            lo = max(off, acc) - acc + run.start
            hi = min(off + want, acc + run.size) - acc + run.start
            seg = Segment(run.shard, lo, hi, pad=lap > 0)
            if out and out[-1].shard == seg.shard and out[-1].stop == seg.start and out[-1].pad == seg.pad:
                out[-1] = Segment(seg.shard, out[-1].start, seg.stop, seg.pad)
            else:
                out.append(seg)
            acc += run.size
        pos += want
    return out


def plan_epoch(shards: Sequence[ShardRef], *, seed: int, epoch: int, world_size: int, workers: int,
               batch_size: int, drop_last: bool = True, shuffle: bool = True, shuffle_buffer: int = 1,
               weights: Sequence[float] = (), resampled: bool = False, steps_per_epoch: int = 0,
               ranks: Sequence[int] | None = None) -> EpochPlan:
    """Plan one epoch (pure function; see the module docstring for the layout).

    ``ranks`` restricts the per-worker plans computed (a training rank needs only its own);
    the summary numbers are always for the whole world.
    Raises ValueError when the plan is impossible (no samples, or fewer than one batch per rank
    with ``drop_last``).
    """
    if world_size < 1 or workers < 1 or batch_size < 1:
        raise ValueError(f"world_size, workers and batch_size must be >= 1; got {world_size}, {workers}, {batch_size}")
    n_datasets = 1 + max((s.dataset for s in shards), default=0)
    totals = [0] * n_datasets
    for s in shards:
        totals[s.dataset] += s.samples
    total = sum(totals)
    if total == 0:
        raise ValueError("the dataset has no samples")
    weights = list(weights) or [1.0] * n_datasets
    ranks = list(range(world_size)) if ranks is None else list(ranks)
    plans: dict[tuple[int, int], WorkerPlan] = {}

    if resampled:
        nb = steps_per_epoch
        counts = worker_batch_counts(nb, workers)
        probs = [w if t else 0.0 for w, t in zip(weights, totals)]
        by_ds: dict[int, list[int]] = {}
        for i, s in enumerate(shards):
            if s.samples:
                by_ds.setdefault(s.dataset, []).append(i)
        seen: set[tuple[int, int]] = set()
        for r in ranks:
            for k in range(workers):
                rng = _rng(seed, epoch, "resampled", r, k)
                need = counts[k] * batch_size
                segs: list[Segment] = []
                got = 0
                while got < need:
                    d = rng.choices(range(n_datasets), weights=probs)[0]
                    cand = by_ds[d]
                    i = rng.choices(cand, weights=[shards[c].samples for c in cand])[0]
                    take = min(shards[i].samples, need - got)
                    segs.append(Segment(i, 0, take))
                    got += take
                order = _buffer_order(need, shuffle_buffer, _rng(seed, epoch, "buffer", r, k))
                plans[(r, k)] = WorkerPlan(r, k, workers, batch_size, counts[k], segs, order)
                for seg in segs:
                    seen.update((seg.shard, j) for j in range(seg.start, seg.stop))
        return EpochPlan(epoch, world_size, workers, batch_size, nb, total, total, len(seen), 0, 0, True, plans)

    # ---- epoch mode: select, permute, cut --------------------------------------------------
    runs: list[Segment] = []
    for d in range(n_datasets):
        idx = [i for i, s in enumerate(shards) if s.dataset == d and s.samples > 0]
        if shuffle:
            _rng(seed, epoch, "shards", d).shuffle(idx)
        quota = totals[d] if weights[d] >= 1 else int(round(weights[d] * totals[d]))
        for i in idx:
            if quota <= 0:
                break
            take = min(quota, shards[i].samples)
            runs.append(Segment(i, 0, take))
            quota -= take
    if shuffle and n_datasets > 1:
        _rng(seed, epoch, "mix").shuffle(runs)
    selected = sum(r.size for r in runs)
    if selected == 0:
        raise ValueError("the weights select no samples")
    per_step = world_size * batch_size
    nb = selected // per_step if drop_last else -(-selected // per_step)
    if nb == 0:
        raise ValueError(f"the dataset has {selected} samples, fewer than world_size × batch_size = "
                         f"{world_size} × {batch_size}; lower batch_size or set drop_last=false")
    counts = worker_batch_counts(nb, workers)
    used = nb * per_step
    for r in ranks:
        base = r * nb * batch_size
        offset = base
        for k in range(workers):
            n = counts[k] * batch_size
            segs = _take(runs, offset, n, selected)
            order = _buffer_order(n, shuffle_buffer, _rng(seed, epoch, "buffer", r, k) if shuffle else None)
            plans[(r, k)] = WorkerPlan(r, k, workers, batch_size, counts[k], segs, order)
            offset += n
    covered = min(used, selected)
    return EpochPlan(epoch, world_size, workers, batch_size, nb, total, selected, covered,
                     max(0, used - selected), max(0, selected - used), False, plans)


def rank_batches(plan: EpochPlan, rank: int) -> list[list[tuple[int, int, bool]]]:
    """The rank's batches as lists of (global shard, sample ordinal, pad), in the order the
    trainer receives them. Used by tests and ``vidssl data plan``; the loader streams instead."""
    per_worker = []
    for k in range(plan.workers):
        wp = plan.worker(rank, k)
        pos = wp.positions()
        em = [pos[i] for i in wp.order]
        per_worker.append([em[i * wp.batch_size:(i + 1) * wp.batch_size] for i in range(wp.batches)])
    out = []
    for j in range(plan.batches_per_rank):
        out.append(per_worker[j % plan.workers][j // plan.workers])
    return out

