"""Stream the samples of a tar shard without extracting anything to disk or unpickling anything.

``read_segment`` yields exactly one item per sample ordinal in ``[start, stop)``: a
:class:`Sample` (metadata parsed as JSON, mp4 kept as bytes, label as decimal text), a
:class:`Failure` naming the kind of problem, or ``None`` for ordinals the caller does not want
(already consumed before a resume: their bytes are skipped, never kept nor decoded).
A fixed count per segment is what keeps every rank's batch count fixed whatever goes wrong.
"""

from __future__ import annotations

import http.client
import json
import tarfile
from dataclasses import dataclass
from typing import Callable, Iterator

from vidssl.data.index import ShardMissing, is_remote, open_stream

__all__ = ["Sample", "Failure", "read_segment", "iter_tar_groups"]


@dataclass
class Sample:
    """One sample's compressed content, as read from its shard."""

    key: str
    meta: dict
    data: bytes          # the KEY.mp4 bytes
    label: int


@dataclass
class Failure:
    """A sample that could not be obtained. ``kind``: missing (shard absent), read (network or
    I/O error), truncated (the tar ended early), format (bad member), decode, timeout, short."""

    kind: str
    message: str


def iter_tar_groups(fileobj, keep: Callable[[int], bool]) -> Iterator[tuple[int, str, dict[str, bytes]]]:
    """Yield (ordinal, key, {extension: bytes}) for each group of consecutive members sharing a
    key (the member name before the first dot of its base name). Member data of groups with
    ``keep(ordinal)`` false is skipped unread (``{}`` is yielded for them)."""
    ordinal = -1
    key = None
    members: dict[str, bytes] = {}
    # mode "r|": forward-only stream; tarfile never seeks and never writes to disk here.
    with tarfile.open(fileobj=fileobj, mode="r|") as tf:
        for m in tf:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            prefix = m.name[: len(m.name) - len(base)]
            k, _, ext = base.partition(".")
            k = prefix + k
            if k != key:
                if key is not None:
                    yield ordinal, key, members
                ordinal += 1
                key = k
                members = {}
            if keep(ordinal):
                f = tf.extractfile(m)
                members[ext] = f.read() if f is not None else b""
        if key is not None:
            yield ordinal, key, members


def _parse(key: str, members: dict[str, bytes]) -> Sample | Failure:
    if "json" not in members or "mp4" not in members:
        return Failure("format", f"sample {key}: members {sorted(members)}; expected json and mp4")
    try:
        meta = json.loads(members["json"])
        frames = int(meta["frames"])
        if frames < 1:
            raise ValueError(f"frames={frames}")
        kf = meta.get("keyframes") or [0]
        meta["keyframes"] = sorted({int(k) for k in kf} | {0})
        meta["fps"] = float(meta.get("fps") or 0.0)
        if meta["fps"] <= 0:
            raise ValueError(f"fps={meta.get('fps')!r}")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        return Failure("format", f"sample {key}: bad {key}.json ({exc})")
    label = meta.get("label", -1)
    if "cls" in members:
        try:
            label = int(members["cls"].decode("ascii").strip())
        except (ValueError, UnicodeDecodeError):
            return Failure("format", f"sample {key}: {key}.cls is not a decimal integer")
    return Sample(key=key, meta=meta, data=members["mp4"], label=int(label if label is not None else -1))


_READ_ERRORS = (OSError, tarfile.TarError, http.client.HTTPException, EOFError)


def read_segment(url: str, start: int, stop: int, want: Callable[[int], bool] = lambda _: True, *,
                 timeout: float = 60.0, retries: int = 1) -> Iterator[tuple[int, Sample | Failure | None]]:
    """Yield ``(ordinal, item)`` for every ordinal in ``[start, stop)`` of shard ``url`` (see module doc).

    A broken remote read is retried from a fresh connection at most ``retries`` times, resuming
    at the first ordinal not yet yielded; local errors are not retried (they would repeat).
    """
    pos = start
    attempts = 0
    remote = is_remote(url)
    while pos < stop:
        try:
            f = open_stream(url, timeout)
        except ShardMissing as exc:
            for o in range(pos, stop):
                yield o, (Failure("missing", str(exc)) if want(o) else None)
            return
        except _READ_ERRORS as exc:
            failure = Failure("read", f"{url}: {exc}")
            attempts += 1
            if remote and attempts <= retries:
                continue
            for o in range(pos, stop):
                yield o, (failure if want(o) else None)
            return
        try:
            with f:
                for ordinal, key, members in iter_tar_groups(f, lambda o: pos <= o < stop and want(o)):
                    if ordinal < pos:
                        continue
                    if ordinal >= stop:
                        break
                    yield ordinal, (_parse(key, members) if want(ordinal) else None)
                    pos = ordinal + 1
            if pos < stop:  # a clean end of archive before the index's sample count
                for o in range(pos, stop):
                    yield o, (Failure("truncated", f"{url}: tar ends after {o} samples; index says more")
                              if want(o) else None)
                return
        except _READ_ERRORS as exc:
            kind = "read" if remote else "truncated"
            attempts += 1
            if remote and attempts <= retries:
                continue
            msg = f"{url}: {type(exc).__name__}: {exc}"
            for o in range(pos, stop):
                yield o, (Failure(kind, msg) if want(o) else None)
            return
