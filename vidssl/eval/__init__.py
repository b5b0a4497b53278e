"""Evaluation: multi-view merging, per-sample de-duplication across ranks, reports and kNN.

Modules (importing this package imports nothing heavy; import the modules themselves):

- :mod:`~vidssl.eval.metrics`: :func:`merge_views` ``(logits (B,V,C)) -> probs (B,C)`` (softmax per
  view, then mean; V = 1 works), :func:`gather_eval_rows` (all ranks' rows on every rank),
  :func:`dedupe` (each sample counted once, sorted by key), :func:`classification_report`
  (top-1/top-5, mean class accuracy, per-class accuracy, confusion matrix) and
  :func:`plot_confusion` (row-normalised PNG).
- :mod:`~vidssl.eval.knn`: :func:`knn_classify` and :func:`knn_accuracy`, the DINO kNN monitor
  (L2-normalised features, k = 20, votes weighted by ``exp(sim / 0.07)``).

Typical use after inference over a test set on every rank::

    probs = merge_views(logits)                                   # (B, V, C) -> (B, C)
    rows = gather_eval_rows(keys, probs, labels, valid)          # every rank's rows
    keys, probs, labels = dedupe(*rows)                           # each sample once, sorted
    report = classification_report(probs, labels, class_names)
"""
