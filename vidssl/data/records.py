"""Typed records that cross the loader's stage boundaries (and the worker → main process boundary).

The batch dict a trainer receives holds only data (windows, frame indices, key, label, dataset,
valid); everything the loader needs to keep its books travels beside it in a :class:`WorkerBatch`:

    worker stream ──WorkerBatch(index, errors, short, batch | raw rows, ring slot)──▶ main process
    main process: reorder by ``index`` → count ``errors`` (budget) → [DecodeStage: raw rows → batch]
                  → the trainer gets ``batch`` (a plain dict)

Every unusable sample becomes one :class:`SampleError`, made the same way wherever it happens
(read in a worker, decoded in a worker, decoded in the main process), so the error budget and the
per-shard counts see them all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vidssl.data.stream import Sample

__all__ = ["SampleError", "RawRow", "WorkerBatch"]


@dataclass(frozen=True)
class SampleError:
    """One planned sample that could not be used.

    ``kind``: missing, read, truncated, format, decode, timeout or short (see
    :class:`vidssl.data.stream.Failure`); ``shard``: the shard's name; ``ordinal``: the sample's
    position in that shard; ``message``: what went wrong, for logs and the budget error.
    """

    kind: str
    shard: str
    ordinal: int
    message: str


@dataclass
class RawRow:
    """``decode_stage=main``: what a worker sends for one sample instead of its decoded frames.

    ``windows``: {window name: source frame numbers} planned from the metadata; ``short``: loop/pad
    stretched them (the video was too short); ``pad``: the row repeats a sample to fill the batch.
    """

    sample: Sample
    dataset: int
    shard: str
    ordinal: int
    windows: dict[str, list[int]]
    short: bool
    pad: bool


@dataclass
class WorkerBatch:
    """One batch of the rank's plan and its bookkeeping, as a worker produces it.

    Exactly one of ``batch`` (decoded: the dict the trainer gets) and ``raw`` (one :class:`RawRow`
    per row, ``None`` where the sample failed: the main-process decode stage finishes it) is set.
    ``ring``: (worker, slot) of the shared-memory buffers holding the windows (see
    :class:`vidssl.data.wire.BatchRing`); ``wire``: small arrays travel as numpy (see
    :func:`vidssl.data.wire.to_wire`).
    """

    index: int                              # the rank-level batch number
    errors: list[SampleError] = field(default_factory=list)
    short: int = 0                          # planned (not padding) samples stretched by loop/pad
    batch: dict[str, Any] | None = None
    raw: list[RawRow | None] | None = None
    ring: tuple[int, int] | None = None
    wire: bool = False
    decoded: tuple[int, int] = (0, 0)       # (pictures decoded, pictures read) by this batch's decodes (PyAV)

    def pin_memory(self) -> "WorkerBatch":
        """Called by the DataLoader's pin-memory thread (``pin_memory: true``): pin the windows."""
        import torch  # noqa: PLC0415

        if self.batch is not None:
            for k, v in list(self.batch.items()):
                if isinstance(v, torch.Tensor):
                    self.batch[k] = v.pin_memory()
                elif isinstance(v, list) and v and all(isinstance(t, torch.Tensor) for t in v):
                    self.batch[k] = [t.pin_memory() for t in v]  # native-size rows that could not be stacked
        return self
