"""Evaluation metrics on hand-made cases with known answers: view merging, de-duplication across
ranks, the classification report, confusion plots and the DINO kNN classifier."""

from __future__ import annotations

import math

import pytest
import torch

from vidssl.eval.knn import knn_accuracy, knn_classify
from vidssl.eval.metrics import (
    classification_report,
    dedupe,
    gather_eval_rows,
    merge_views,
    plot_confusion,
)

LN3 = math.log(3.0)


# ----------------------------------------------------------------------------- merge_views


def test_merge_views_single_view_is_softmax():
    logits = torch.tensor([[[0.0, LN3]], [[1.0, 2.0]]])  # (B=2, V=1, C=2)
    probs = merge_views(logits)
    assert probs.shape == (2, 2)
    torch.testing.assert_close(probs[0], torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(probs, torch.softmax(logits[:, 0], dim=-1))
    # 1 clip x 1 crop of a 400-class problem: no division by (views - 1).
    one = merge_views(torch.randn(3, 1, 400))
    assert torch.isfinite(one).all()
    torch.testing.assert_close(one.sum(dim=1), torch.ones(3))


def test_merge_views_two_views_average_probabilities():
    # view 1: softmax([0, ln 3]) = [1/4, 3/4]; view 2: softmax([0, 0]) = [1/2, 1/2]; mean = [3/8, 5/8].
    logits = torch.tensor([[[0.0, LN3], [0.0, 0.0]]])  # (1, 2, 2)
    probs = merge_views(logits)
    torch.testing.assert_close(probs, torch.tensor([[0.375, 0.625]]))
    # Averaging logits would give softmax([0, ln3 / 2]) = [1 / (1 + sqrt 3), sqrt 3 / (1 + sqrt 3)] ≈ [0.366, 0.634].
    mean_logits = torch.softmax(logits.mean(dim=1), dim=-1)
    torch.testing.assert_close(mean_logits, torch.tensor([[1 / (1 + 3**0.5), 3**0.5 / (1 + 3**0.5)]]))
    assert not torch.allclose(probs, mean_logits, atol=1e-3)


def test_merge_views_probabilities_not_logits_change_the_prediction():
    # One very confident view for class 1, two mildly confident views for class 0.
    logits = torch.tensor([[[0.0, 10.0], [2.0, 0.0], [2.0, 0.0]]])  # (1, 3, 2)
    probs = merge_views(logits)
    p0 = (1 / (1 + math.exp(10)) + 2 / (1 + math.exp(-2))) / 3  # ≈ 0.587
    torch.testing.assert_close(probs, torch.tensor([[p0, 1 - p0]]))
    assert probs.argmax(dim=1).item() == 0  # averaged probabilities: class 0
    assert logits.mean(dim=1).argmax(dim=1).item() == 1  # averaged logits: class 1


def test_merge_views_rejects_bad_shapes():
    with pytest.raises(ValueError):
        merge_views(torch.zeros(2, 3))
    with pytest.raises(ValueError):
        merge_views(torch.zeros(2, 0, 3))


# ----------------------------------------------------------------------------- dedupe / gather


def _probs(n, c=3):
    return torch.arange(n * c, dtype=torch.float32).reshape(n, c)  # row i is distinguishable


def test_dedupe_drops_padding_and_sorts():
    keys = ["b", "a", "c", "pad-only", "b"]
    probs = _probs(5)
    labels = torch.tensor([1, 0, 2, 1, 1])
    valid = torch.tensor([True, True, True, False, False])
    k, p, y = dedupe(keys, probs, labels, valid)
    assert k == ["a", "b", "c"]  # "pad-only" appears only as padding: dropped
    torch.testing.assert_close(p, probs[[1, 0, 2]])
    assert y.tolist() == [0, 1, 2]


def test_dedupe_two_ranks_count_each_sample_once():
    # 5 samples over 2 ranks, 3 rows each: rank 1 pads with a repeat of v0 (valid=False); the same
    # rows also arrive twice when gathered naively (rank 0's rows repeated).
    rank0 = (["v0", "v2", "v4"], torch.tensor([0, 2, 1]), [True, True, True])
    rank1 = (["v1", "v3", "v0"], torch.tensor([1, 0, 0]), [True, True, False])
    keys = rank0[0] + rank1[0] + rank0[0]
    labels = torch.cat([rank0[1], rank1[1], rank0[1]])
    valid = torch.tensor(rank0[2] + rank1[2] + rank0[2])
    probs = _probs(len(keys))
    k, p, y = dedupe(keys, probs, labels, valid)
    assert k == ["v0", "v1", "v2", "v3", "v4"]
    assert y.tolist() == [0, 1, 2, 0, 1]
    torch.testing.assert_close(p, probs[[0, 3, 1, 4, 2]])  # first valid row of each key
    # Same result whatever the rank order.
    k2, p2, y2 = dedupe(rank1[0] + rank0[0], torch.cat([probs[3:6], probs[0:3]]),
                        torch.cat([rank1[1], rank0[1]]), torch.tensor(rank1[2] + rank0[2]))
    assert k2 == k and y2.tolist() == y.tolist()
    torch.testing.assert_close(p2, p)
    # valid=None: every row counts.
    k3, _, _ = dedupe(["z", "y", "z"], _probs(3), torch.tensor([1, 1, 1]))
    assert k3 == ["y", "z"]


def test_dedupe_conflicting_labels_raise_naming_the_key():
    with pytest.raises(ValueError, match="clip_007"):
        dedupe(["clip_007", "ok", "clip_007"], _probs(3), torch.tensor([0, 1, 2]))
    # A conflicting label on a padding row is ignored (the row is dropped first).
    k, _, y = dedupe(["x", "x"], _probs(2), torch.tensor([0, 1]), torch.tensor([True, False]))
    assert k == ["x"] and y.tolist() == [0]
    with pytest.raises(ValueError):
        dedupe(["a", "b"], _probs(3), torch.tensor([0, 1, 2]))


def test_gather_eval_rows_identity_without_process_group():
    keys, probs, labels = ["a", "b"], _probs(2), torch.tensor([0, 2])
    k, p, y, v = gather_eval_rows(keys, probs, labels, None)
    assert k == keys and torch.equal(p, probs) and torch.equal(y, labels)
    assert v.dtype == torch.bool and v.tolist() == [True, True]
    _, _, _, v = gather_eval_rows(keys, probs, labels, torch.tensor([True, False]))
    assert v.tolist() == [True, False]


def test_gather_eval_rows_concatenates_ranks_in_order(monkeypatch):
    import torch.distributed as dist

    other = (["c"], _probs(1) + 100, torch.tensor([1]), torch.tensor([False]))

    def fake_all_gather_object(out, obj):
        out[0], out[1] = obj, other  # we are rank 0 of 2

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **kw: 2)
    monkeypatch.setattr(dist, "all_gather_object", fake_all_gather_object)
    k, p, y, v = gather_eval_rows(["a", "b"], _probs(2), torch.tensor([0, 2]), None)
    assert k == ["a", "b", "c"]
    torch.testing.assert_close(p, torch.cat([_probs(2), _probs(1) + 100]))
    assert y.tolist() == [0, 2, 1] and v.tolist() == [True, True, False]


# ----------------------------------------------------------------------------- report / plot

NAMES = ["run", "jump", "swim"]
# (true label, probabilities): 4 x run, 3 x jump, no swim.
CASE = [
    (0, [0.7, 0.2, 0.1]),  # run  -> run
    (0, [0.6, 0.3, 0.1]),  # run  -> run
    (0, [0.5, 0.1, 0.4]),  # run  -> run
    (0, [0.2, 0.5, 0.3]),  # run  -> jump
    (1, [0.5, 0.2, 0.3]),  # jump -> run  (true class ranked last)
    (1, [0.1, 0.3, 0.6]),  # jump -> swim
    (1, [0.1, 0.8, 0.1]),  # jump -> jump
]


def _case():
    labels = torch.tensor([y for y, _ in CASE])
    probs = torch.tensor([p for _, p in CASE])
    return probs, labels


def test_classification_report_hand_case():
    probs, labels = _case()
    r = classification_report(probs, labels, NAMES)
    assert r["samples"] == 7
    assert r["top1"] == pytest.approx(4 / 7)
    assert r["top5"] == pytest.approx(1.0) and r["top5_k"] == 3  # k = min(5, C) = 3 covers every class
    # Per-class recall: run 3/4, jump 1/3; swim has no samples and is left out of the mean.
    assert r["mean_class_acc"] == pytest.approx((3 / 4 + 1 / 3) / 2)
    assert r["mean_class_acc"] != pytest.approx(r["top1"])
    assert r["per_class"] == {
        "run": {"samples": 4, "acc": pytest.approx(0.75)},
        "jump": {"samples": 3, "acc": pytest.approx(1 / 3)},
        "swim": {"samples": 0, "acc": None},
    }
    assert r["confusion"] == [[3, 1, 0], [1, 1, 1], [0, 0, 0]]
    assert r["classes"] == NAMES
    assert r["missing_classes"] == ["swim"]
    assert all(isinstance(r[k], float) for k in ("top1", "top5", "mean_class_acc"))


def test_classification_report_top5_with_more_classes():
    probs = torch.tensor([[0.30, 0.25, 0.20, 0.10, 0.10, 0.05]] * 2)  # class 5 is 6th of 6
    r = classification_report(probs, torch.tensor([5, 3]), list("abcdef"))
    assert r["top5_k"] == 5
    assert r["top5"] == pytest.approx(0.5) and r["top1"] == 0.0


def test_classification_report_rejects_bad_input():
    probs, labels = _case()
    with pytest.raises(ValueError):
        classification_report(probs, labels, NAMES[:2])
    with pytest.raises(ValueError):
        classification_report(probs, torch.full_like(labels, 3), NAMES)


def test_plot_confusion_writes_png(tmp_path):
    probs, labels = _case()
    r = classification_report(probs, labels, NAMES)
    out = plot_confusion(r["confusion"], r["classes"], tmp_path / "sub" / "confusion.png", title="hand case")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024


@pytest.mark.parametrize("classes", [100, 400])
def test_plot_confusion_many_classes(tmp_path, classes):
    g = torch.Generator().manual_seed(0)
    confusion = torch.randint(0, 5, (classes, classes), generator=g) + 20 * torch.eye(classes, dtype=torch.long)
    names = [f"class_with_a_long_name_{i}" for i in range(classes)]
    out = plot_confusion(confusion, names, tmp_path / f"c{classes}.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024


# ----------------------------------------------------------------------------- kNN


def _polar(deg, r=1.0):
    return [r * math.cos(math.radians(deg)), r * math.sin(math.radians(deg))]


# One very close neighbour of class 0 (10°), two farther ones of class 1 (±40°), one opposite (class 2).
# Radii vary: only directions matter after L2 normalisation.
TRAIN = torch.tensor([_polar(10, 5.0), _polar(40, 0.5), _polar(-40, 2.0), _polar(180, 3.0)])
TRAIN_Y = torch.tensor([0, 1, 1, 2])
QUERY = torch.tensor([_polar(0, 7.0)])


def test_knn_weighted_vote_beats_majority_with_exact_scores():
    t = 0.1
    scores = knn_classify(TRAIN, TRAIN_Y, QUERY, k=3, temperature=t)
    assert scores.shape == (1, 3)
    a = math.exp(math.cos(math.radians(10)) / t)  # ≈ 18,960
    b = 2 * math.exp(math.cos(math.radians(40)) / t)  # ≈ 4,240
    torch.testing.assert_close(scores, torch.tensor([[a, b, 0.0]], dtype=torch.float64), rtol=1e-5, atol=0)
    assert scores.argmax(dim=1).item() == 0  # weighted vote: the close class-0 neighbour wins
    assert torch.bincount(TRAIN_Y[[0, 1, 2]]).argmax().item() == 1  # majority of the 3 neighbours: class 1
    # A high temperature makes the vote close to a majority vote: class 1 wins.
    assert knn_classify(TRAIN, TRAIN_Y, QUERY, k=3, temperature=10.0).argmax(dim=1).item() == 1


def test_knn_k_larger_than_n_uses_every_neighbour():
    t = 0.5
    scores = knn_classify(TRAIN, TRAIN_Y, QUERY, k=20, temperature=t, num_classes=4)
    expect = [
        math.exp(math.cos(math.radians(10)) / t),
        2 * math.exp(math.cos(math.radians(40)) / t),
        math.exp(-1 / t),
        0.0,
    ]
    torch.testing.assert_close(scores, torch.tensor([expect], dtype=torch.float64), rtol=1e-5, atol=1e-12)


def test_knn_chunked_equals_unchunked_and_is_scale_invariant():
    g = torch.Generator().manual_seed(0)
    train, query = torch.randn(50, 8, generator=g), torch.randn(37, 8, generator=g)
    labels = torch.randint(0, 5, (50,), generator=g)
    full = knn_classify(train, labels, query, k=7, chunk=4096)
    assert full.shape == (37, 5)
    # Same neighbours; the float32 similarities may differ in the last bit with the block size.
    for chunk in (5, 1):
        part = knn_classify(train, labels, query, k=7, chunk=chunk)
        torch.testing.assert_close(part, full, rtol=1e-5, atol=0)
        assert torch.equal(part > 0, full > 0)
    scaled = knn_classify(train * (0.1 + 10 * torch.rand(50, 1, generator=g)), labels,
                          query * (0.1 + 10 * torch.rand(37, 1, generator=g)), k=7)
    torch.testing.assert_close(scaled, full, rtol=1e-4, atol=0)


def test_knn_accuracy():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([_polar(0), _polar(120), _polar(240)])  # 3 well-separated directions
    train_y, val_y = torch.arange(3).repeat(10), torch.arange(3).repeat(4)
    train = centres[train_y] + 0.05 * torch.randn(30, 2, generator=g)
    val = centres[val_y] + 0.05 * torch.randn(12, 2, generator=g)
    r = knn_accuracy(train, train_y, val, val_y)
    assert r == {"top1": 1.0, "top5": 1.0, "k": 20, "temperature": 0.07, "train": 30, "val": 12}
    # The hand case: the query is class 1 by label; weighted kNN says class 0, class 1 is second.
    r = knn_accuracy(TRAIN, TRAIN_Y, QUERY, torch.tensor([1]), k=3, temperature=0.1)
    assert r["top1"] == 0.0 and r["top5"] == 1.0 and r["k"] == 3 and r["train"] == 4 and r["val"] == 1
    assert knn_accuracy(TRAIN, TRAIN_Y, QUERY, torch.tensor([1]), k=99)["k"] == 4
