"""Stage "rows → batch": collate a batch's rows into the dict the trainer receives.

    in:  rows from :class:`~vidssl.data.transform.SampleProcessor`, a valid flag per row
    out: {window: (B, T, C, H, W) uint8 (views: (B, K·crops, T, C, H, W)), "frame_indices": {window: (B, T)},
          "key": [B], "label": (B,), "dataset": (B,), "valid": (B,) bool}
"""

from __future__ import annotations

from typing import Any

import torch

from vidssl.data.windows import WINDOWS_BY_MODE

__all__ = ["collate", "stack_rows"]


def stack_rows(items: list, out_for=None):
    """Stack equal-shaped rows into one batch tensor; ``out_for(shape, dtype)`` may give the output
    buffer (a worker's reusable shared-memory ring, see :class:`vidssl.data.wire.BatchRing`)."""
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
    for name in WINDOWS_BY_MODE[mode]:
        batch[name] = stack_rows([r[name] for r in rows],
                             None if out_for is None else (lambda shape, dtype, n=name: out_for(n, shape, dtype)))
    batch["frame_indices"] = {n: torch.stack([r["frame_indices"][n] for r in rows]) for n in rows[0]["frame_indices"]}
    batch["key"] = [r["key"] for r in rows]
    batch["label"] = torch.tensor([r["label"] for r in rows], dtype=torch.int64)
    batch["dataset"] = torch.tensor([r["dataset"] for r in rows], dtype=torch.int64)
    batch["valid"] = torch.tensor(valid, dtype=torch.bool)
    return batch

