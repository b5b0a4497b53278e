"""The records that cross the process boundary of ``vidssl shard``.

::

    pipeline.py (parent)  ──ShardTask──▶  worker.py → transcode.process_input  (worker process)
    pipeline.py (parent)  ◀─InputResult──  (samples: encoded clip files in OUTDIR's temp area + metadata)

Both are pickled over a socket, so they hold plain values only (no open files, no PyAV objects).
This module imports nothing but the standard library: every worker imports it on start.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vidssl.shard.config import ShardConfig
    from vidssl.shard.sources import InputItem

__all__ = ["ShardTask", "Sample", "InputResult", "ErrorRecord"]

#: One rejected input or dropped clip, exactly as the journal and ``errors.jsonl`` store it (the
#: parent adds ``source`` and ``_input``): ``stage`` and ``reason`` always; ``start``, ``end`` and
#: ``_short`` (a dropped short clip, not an error) for clip-level records. A dict, not a class,
#: because its key order is part of the file format.
ErrorRecord = dict[str, Any]


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to turn one input into clip files (parent → worker)."""

    # -- the input: its position in this job's share (orders results, names temp files), its
    #    file, the manifest span (source seconds; None: from the start / to the end), and whether
    #    a non-video is an error (True) or silently skipped (False: found by walking a folder)
    index: int
    path: str
    start: float | None
    end: float | None
    strict: bool
    # -- what the samples are labelled with: class index (-1: none), class name, manifest columns
    label: int
    label_name: str | None
    extra: dict[str, Any]
    # -- where the worker writes clip files (OUTDIR/.vidssl-shard/tmp-jNNNN; see clip_path)
    tmpdir: str
    # -- the clip plan (ShardConfig options of the same names)
    clip_seconds: float | None
    clip_stride: float | None
    min_seconds: float
    # -- the output video (ShardConfig options of the same names; ``encoder`` is the FFmpeg name
    #    of ``codec``); ``copy``: stream copy instead of a re-encode
    short_side: int | None
    fps: float | None
    codec: str
    encoder: str
    crf: int
    preset: str
    gop: int
    bframes: int
    threads: int
    copy: bool

    @classmethod
    def for_input(cls, cfg: ShardConfig, item: InputItem, index: int, label: tuple[int, str | None],
                  tmpdir: str) -> ShardTask:
        """The task for input ``item`` at position ``index`` of this job, labelled ``label``."""
        return cls(index=index, path=item.path, start=item.start, end=item.end, strict=item.strict,
                   label=label[0], label_name=label[1], extra=item.extra, tmpdir=tmpdir,
                   clip_seconds=cfg.clip_seconds, clip_stride=cfg.clip_stride, min_seconds=cfg.min_seconds,
                   short_side=cfg.short_side, fps=cfg.fps, codec=cfg.codec, encoder=cfg.encoder, crf=cfg.crf,
                   preset=cfg.preset, gop=cfg.gop, bframes=cfg.bframes, threads=cfg.threads, copy=cfg.copy)

    def clip_path(self, n: int) -> str:
        """Temp file of this input's ``n``-th clip (the parent removes ``{index:08d}-*`` after a crash)."""
        return os.path.join(self.tmpdir, f"{self.index:08d}-{n}.mp4")


@dataclass(frozen=True)
class Sample:
    """One clip ready for a shard: its ``KEY.json`` metadata and the file holding its video."""

    meta: dict[str, Any]  # KEY.json as written into the tar (key, source facts, clip facts, label)
    file: str  # the encoded clip in the temp area, or the source itself (``owned`` False)
    size: int  # bytes of ``file``
    owned: bool = True  # False: ``file`` is the SOURCE (verbatim stream copy): never delete it


@dataclass(frozen=True)
class InputResult:
    """What became of one input (worker → parent; also made by the parent for inputs rejected
    before a worker saw them, and for workers that timed out or died).

    All or nothing: a rejected input has no samples and one error record; ``errors`` may also
    list clips dropped as too short next to the samples that were kept.
    """

    index: int  # ShardTask.index
    samples: list[Sample] = field(default_factory=list)
    errors: list[ErrorRecord] = field(default_factory=list)
    skipped: bool = False  # a non-video file found while walking a folder: counted, not an error

    @classmethod
    def rejected(cls, index: int, stage: str, reason: str) -> InputResult:
        """An input rejected as a whole at ``stage`` (probe, decode, plan, encode, timeout, ...)."""
        return cls(index=index, errors=[{"stage": stage, "reason": reason}])
