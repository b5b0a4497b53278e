"""Epoch plan: a pure function giving every rank the same number of batches, no duplicates, coverage."""

from __future__ import annotations

import collections
import itertools

import pytest

from vidssl.data.plan import ShardRef, consumed_per_worker, plan_epoch, rank_batches, worker_batch_counts

# Uneven shard sizes, including an empty shard and a one-sample shard.
COUNTS = [7, 3, 12, 1, 0, 9, 5, 11, 4, 8]


def shards(counts=COUNTS, dataset=0):
    return [ShardRef(dataset, f"d{dataset}-{i:06d}.tar", f"/x/d{dataset}-{i:06d}.tar", n) for i, n in enumerate(counts)]


def all_rank_batches(plan):
    return [rank_batches(plan, r) for r in range(plan.world_size)]


@pytest.mark.parametrize("world,workers,batch", [(1, 1, 4), (2, 3, 2), (3, 2, 3), (4, 4, 1), (2, 1, 5)])
@pytest.mark.parametrize("drop_last", [True, False])
def test_equal_batches_no_duplicates_coverage(world, workers, batch, drop_last):
    total = sum(COUNTS)
    plan = plan_epoch(shards(), seed=1, epoch=0, world_size=world, workers=workers, batch_size=batch,
                      drop_last=drop_last, shuffle_buffer=5)
    per_rank = all_rank_batches(plan)
    # Every rank yields the same number of batches, all full.
    assert {len(b) for b in per_rank} == {plan.batches_per_rank}
    assert all(len(b) == batch for rb in per_rank for b in rb)
    rows = [row for rb in per_rank for b in rb for row in b]
    real = [(s, i) for s, i, pad in rows if not pad]
    padding = [(s, i) for s, i, pad in rows if pad]
    # No sample appears twice except explicit padding; every sample exists in its shard.
    assert len(real) == len(set(real))
    assert all(0 <= i < COUNTS[s] for s, i in real + padding)
    if drop_last:
        assert plan.batches_per_rank == total // (world * batch)
        assert not padding
        assert plan.samples_dropped == total - len(real) < world * batch
    else:
        assert plan.batches_per_rank == -(-total // (world * batch))
        assert len(real) == total  # full coverage
        assert len(padding) == plan.samples_padding < world * batch
    assert plan.coverage == pytest.approx(len(real) / total)


def test_order_changes_per_epoch_and_repeats_per_seed():
    def order(seed, epoch):
        plan = plan_epoch(shards(), seed=seed, epoch=epoch, world_size=2, workers=2, batch_size=3,
                          shuffle_buffer=8)
        return all_rank_batches(plan)

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)
    # Over a few epochs with drop_last, the dropped tail differs, so everything gets covered.
    seen = set()
    for e in range(6):
        seen |= {(s, i) for rb in order(0, e) for b in rb for s, i, _ in b}
    assert len(seen) == sum(COUNTS)


def test_no_shuffle_reads_in_index_order():
    plan = plan_epoch(shards(), seed=0, epoch=5, world_size=1, workers=1, batch_size=2, shuffle=False,
                      drop_last=False)
    rows = [(s, i) for b in rank_batches(plan, 0) for s, i, pad in b if not pad]
    assert rows == [(s, i) for s, n in enumerate(COUNTS) for i in range(n)]


def test_worker_round_robin_counts_and_consumed():
    assert worker_batch_counts(10, 3) == [4, 3, 3]
    assert consumed_per_worker(4, 3) == [2, 1, 1]
    assert sum(consumed_per_worker(7, 4)) == 7
    plan = plan_epoch(shards(), seed=0, epoch=0, world_size=1, workers=3, batch_size=2)
    assert [plan.worker(0, k).batches for k in range(3)] == worker_batch_counts(plan.batches_per_rank, 3)


def test_shuffle_buffer_is_a_permutation_within_bounds():
    plan = plan_epoch(shards([40]), seed=3, epoch=0, world_size=1, workers=1, batch_size=4, shuffle_buffer=6)
    wp = plan.worker(0, 0)
    assert sorted(wp.order) == list(range(40)) and wp.order != list(range(40))
    # A buffer of 6 means emission i has read at most i + 6 positions: the i-th emitted read
    # position is < i + 6 (bounded memory in the worker).
    assert all(p < i + 6 for i, p in enumerate(wp.order))


def test_mixed_datasets_with_weights():
    mixed = shards([10, 10, 10], dataset=0) + shards([6, 6], dataset=1)
    plan = plan_epoch(mixed, seed=0, epoch=0, world_size=1, workers=1, batch_size=2, weights=[1.0, 0.5],
                      drop_last=False)
    rows = [(s, i) for b in rank_batches(plan, 0) for s, i, pad in b if not pad]
    per_ds = collections.Counter(mixed[s].dataset for s, _ in rows)
    assert per_ds == {0: 30, 1: 6}
    assert len(rows) == len(set(rows))
    assert plan.samples_total == 42 and plan.samples_selected == 36


def test_resampled_fixed_steps():
    mixed = shards([5, 5], dataset=0) + shards([50], dataset=1)
    plan = plan_epoch(mixed, seed=0, epoch=2, world_size=3, workers=2, batch_size=4, resampled=True,
                      steps_per_epoch=7, weights=[3.0, 1.0])
    per_rank = all_rank_batches(plan)
    assert [len(b) for b in per_rank] == [7, 7, 7]
    rows = [mixed[s].dataset for rb in per_rank for b in rb for s, _, _ in b]
    assert len(rows) == 3 * 7 * 4
    # weights 3:1 over datasets: dataset 0 clearly dominates despite having 10 vs 50 samples
    assert rows.count(0) > rows.count(1)


def test_impossible_plan_is_a_clear_error():
    with pytest.raises(ValueError, match="fewer than world_size"):
        plan_epoch(shards([3]), seed=0, epoch=0, world_size=2, workers=1, batch_size=2)
    plan = plan_epoch(shards([3]), seed=0, epoch=0, world_size=2, workers=1, batch_size=2, drop_last=False)
    assert plan.batches_per_rank == 1 and plan.samples_padding == 1


def test_plan_is_independent_of_which_ranks_are_computed():
    full = plan_epoch(shards(), seed=4, epoch=1, world_size=3, workers=2, batch_size=2)
    for r, k in itertools.product(range(3), range(2)):
        one = plan_epoch(shards(), seed=4, epoch=1, world_size=3, workers=2, batch_size=2, ranks=[r])
        assert one.worker(r, k) == full.worker(r, k)
