"""The sharding job: inputs → worker processes → in-order shard writer → journal → index.

Data flow (each arrow a bounded hand-over)::

    items (ordered, this job's share)
      │  parent dispatches at most ``window`` inputs ahead of the writer
      ▼
    WorkerPool: one process per worker, one input (a ShardTask) at a time, killed+replaced on timeout
      │  InputResult = sample metadata + paths of encoded clips in OUTDIR/.vidssl-shard/tmp-*/
      ▼
    reorder buffer (dict by input position, ≤ window entries) → _ShardSink → ShardWriter, in input order
      │  each commit appends one line to the job journal (fsynced) …
      ▼
    … which is what a rerun resumes from: committed shards are kept, the rest is redone.

Shard names and contents depend only on the inputs and the settings: shard *n* of job *j*
always starts at the same (input, clip) position, so a resumed run ends byte-identical to an
uninterrupted one.
"""

from __future__ import annotations

import functools
import glob
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from multiprocessing.connection import wait as mp_wait
from typing import Any

from vidssl.errors import UserError
from vidssl.shard.config import ShardConfig
from vidssl.shard.sources import InputItem, expand_sources, fingerprint, printable, resolve_labels, slug
from vidssl.fsio import atomic_write_bytes, atomic_write_json, unlink_quiet
from vidssl.shard.tasks import InputResult, Sample, ShardTask
from vidssl.shard.writer import ShardWriter

log = logging.getLogger("vidssl.shard")

FORMAT = "vidssl-shards"
VERSION = 1
STATE_DIR = ".vidssl-shard"


# ---- worker processes ---------------------------------------------------------------------------
# parent → worker: a pickled ShardTask (None: exit); worker → parent: a pickled InputResult whose
# samples name clip files in the temp area (vidssl.shard.tasks; the worker side is worker.py and
# transcode.process_input). A worker that dies or overruns the timeout yields a made-up result.

_MALLOC_TUNING = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(128 << 20)}


class _Worker:
    def __init__(self) -> None:
        import socket
        import subprocess
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        # MALLOC_PERTURB_: glibc fills fresh and freed heap blocks with a fixed byte. x264 reads some
        # memory it never initialised (lookahead/border analysis); without this its output could
        # depend on what the worker encoded before, breaking byte-identical shards across runs.
        env = {**os.environ, "MALLOC_PERTURB_": os.environ.get("MALLOC_PERTURB_", "85")}
        # Fixed glibc malloc thresholds instead of its adaptive ones. Adaptive, the worker kept giving
        # the encoder's and decoder's per-input buffers back to the OS and faulting them in again
        # (~600 page faults per small input, every input, ~15% of a worker's CPU on 160x128 clips):
        # blocks under 32 MiB (a 4K yuv420p frame is 12 MiB) come from the heap and are reused, and up to
        # 128 MiB of free heap is kept. It also makes which buffers are heap blocks (perturbed, above)
        # and which are fresh mappings (zeros) depend on their size only, not on the inputs before.
        for name, value in _MALLOC_TUNING.items():
            env.setdefault(name, value)
        self.proc = subprocess.Popen([sys.executable, "-m", "vidssl.shard.worker", str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env)
        theirs.close()
        self.conn = Connection(ours.detach())
        self.pos: int | None = None  # input position being worked on
        self.task: ShardTask | None = None
        self.started = 0.0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5)
        except Exception:  # noqa: BLE001 - a process that will not die is left to the OS
            pass
        self.conn.close()


class WorkerPool:
    """``n`` worker processes with a per-input deadline (a hung worker is killed and replaced)."""

    def __init__(self, n: int, timeout: float) -> None:
        self.n = n
        self.timeout = timeout
        self.workers: list[_Worker] = []

    def start(self, k: int) -> None:
        """Start up to ``k`` workers now (each takes ~0.2 s to import PyAV: overlap that with setup)."""
        while len(self.workers) < min(k, self.n):
            self.workers.append(_Worker())

    def idle(self) -> _Worker | None:
        for w in self.workers:
            if w.pos is None:
                return w
        if len(self.workers) < self.n:
            w = _Worker()
            self.workers.append(w)
            return w
        return None

    def submit(self, worker: _Worker, pos: int, task: ShardTask) -> None:
        worker.conn.send(task)
        worker.pos, worker.task, worker.started = pos, task, time.monotonic()

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self.workers.remove(w)

    def poll(self, max_wait: float) -> list[tuple[int, InputResult]]:
        """Results ready within ``max_wait`` seconds, including timeout/crash records."""
        busy = [w for w in self.workers if w.pos is not None]
        if not busy:
            return []
        now = time.monotonic()
        deadline = min(w.started + self.timeout for w in busy)
        wait_s = max(0.0, min(max_wait, deadline - now))
        ready = set(mp_wait([w.conn for w in busy], timeout=wait_s))
        out = []
        now = time.monotonic()
        for w in busy:
            pos, task = w.pos, w.task
            assert pos is not None and task is not None
            if w.conn in ready:
                try:
                    result = w.conn.recv()
                    w.pos = w.task = None
                    out.append((pos, result))
                    continue
                except (EOFError, OSError):  # the socket closed: the worker died
                    try:
                        code = w.proc.wait(5)
                    except Exception:  # noqa: BLE001
                        code = None
                    self._replace(w)
                    _remove_task_files(task)
                    out.append((pos, InputResult.rejected(task.index, "decode", "worker process died while "
                                                          f"handling this input (exit code {code}); input rejected")))
            elif now - w.started >= self.timeout:
                self._replace(w)
                _remove_task_files(task)
                out.append((pos, InputResult.rejected(task.index, "timeout", f"no result after {self.timeout:g}s; "
                                                                             "the worker was killed and replaced")))
        return out

    def close(self) -> None:
        """Stop every worker: idle ones are told to exit (they do at once), busy ones are killed."""
        for w in self.workers:
            try:
                if w.pos is None:
                    w.conn.send(None)
            except OSError:
                pass
        for w in self.workers:
            if w.pos is None:
                try:
                    w.proc.wait(2)
                except Exception:  # noqa: BLE001
                    pass
            w.kill()
        self.workers = []


def _remove_task_files(task: ShardTask) -> None:
    """The clip files of a worker that died or was killed (ShardTask.clip_path names them)."""
    for path in glob.glob(os.path.join(glob.escape(task.tmpdir), f"{task.index:08d}-*")):
        unlink_quiet(path)


# ---- settings, journal, resume ------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _versions() -> tuple[tuple[str, str], ...]:
    import platform

    import av

    from vidssl import __version__

    return tuple({"vidssl": __version__, "av": av.__version__,
                  "ffmpeg": str(getattr(av, "ffmpeg_version_info", "")) or "unknown",
                  "libavcodec": ".".join(map(str, av.library_versions.get("libavcodec", ()))),
                  "python": platform.python_version()}.items())


def library_versions() -> dict[str, str]:
    """Versions recorded in index.json (computed once per process)."""
    return dict(_versions())


def _job_tag(cfg: ShardConfig) -> str:
    return f"-j{cfg.job_index:04d}" if cfg.num_jobs > 1 else ""


def _journal_path(outdir: str, cfg: ShardConfig) -> str:
    return os.path.join(outdir, STATE_DIR, f"journal{_job_tag(cfg) or '-j0000'}.jsonl")


def _read_journal(path: str) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """Header and commit records; a torn last line (crash while appending) is ignored."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except FileNotFoundError:
        return None, []
    records = []
    for line in lines:
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    if not records or "settings" not in records[0]:
        return None, []
    return records[0], records[1:]


def _append_line(path: str, obj: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _settings_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _clear_outdir(outdir: str) -> None:
    """``overwrite``: remove what vidssl shard wrote (shards, index, errors, state) and nothing else."""
    index = _load_json(os.path.join(outdir, "index.json")) or {}
    names = {s.get("name") for s in index.get("shards", []) if isinstance(s, dict)}
    for path in glob.glob(os.path.join(glob.escape(outdir), STATE_DIR, "journal*.jsonl")):
        _, recs = _read_journal(path)
        names |= {r["shard"]["name"] for r in recs if "shard" in r}
    for name in names:
        if isinstance(name, str) and "/" not in name:
            unlink_quiet(os.path.join(outdir, name))
    for path in glob.glob(os.path.join(glob.escape(outdir), ".*.tar.partial")):
        unlink_quiet(path)
    for name in ("index.json", "errors.jsonl"):
        unlink_quiet(os.path.join(outdir, name))
    shutil.rmtree(os.path.join(outdir, STATE_DIR), ignore_errors=True)


def _load_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


# ---- progress -----------------------------------------------------------------------------------

class _Progress:
    """tqdm bar on a terminal, a log line every ``log_every`` seconds otherwise."""

    def __init__(self, cfg: ShardConfig, total: int, done: int) -> None:
        mode = cfg.progress
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode
        self.total, self.done = total, done
        self.clips = self.errors = 0
        self.bytes_in = 0
        self.t0 = time.monotonic()
        self.last_log = self.t0
        self.every = cfg.log_every
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="input", dynamic_ncols=True, file=sys.stderr)

    def update(self, samples: int, errors: int, nbytes: int) -> None:
        self.done += 1
        self.clips += samples
        self.errors += errors
        self.bytes_in += nbytes
        dt = max(1e-6, time.monotonic() - self.t0)
        mbs = self.bytes_in / dt / 1e6
        if self.bar is not None:
            self.bar.set_postfix_str(f"clips={self.clips} errors={self.errors} {mbs:.1f}MB/s", refresh=False)
            self.bar.update(1)
        elif self.mode == "log" and (time.monotonic() - self.last_log >= self.every or self.done == self.total):
            self.last_log = time.monotonic()
            rate = (self.done) / dt
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            log.info("inputs %d/%d, clips %d, errors %d, %.1f MB/s in, ETA %s", self.done, self.total,
                     self.clips, self.errors, mbs, "?" if eta == float("inf") else f"{eta:.0f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---- the job ------------------------------------------------------------------------------------

def _check_args(cfg: ShardConfig) -> tuple[str, str]:
    if not cfg.output:
        raise UserError("output: no OUTDIR given (-o OUTDIR)")
    outdir = os.path.abspath(os.path.expanduser(cfg.output))
    # Missing parents are created (as mkdir -p would), but not through a path that is a file.
    ancestor = os.path.dirname(outdir)
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise UserError(f"output {cfg.output!r}: {ancestor!r} is a file, not a folder")
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise UserError(f"output {cfg.output!r}: exists and is not a folder")
    prefix = cfg.prefix or slug(os.path.basename(outdir), 60)
    return outdir, prefix


def run_shard(cfg: ShardConfig) -> dict[str, Any]:
    """Shard ``cfg.sources`` into ``cfg.output``; resumes a previous run of the same settings.

    Returns a summary dict: ``samples``, ``shards``, ``rejected``, ``dropped_short``, ``skipped``,
    ``inputs``, ``frames``, ``bytes``, ``bytes_in``, ``seconds`` (wall time), ``resumed_shards``,
    ``index`` (path of index.json, or None while other jobs of a multi-job run are unfinished).
    Raises :class:`UserError` for unusable arguments (no sources, missing OUTDIR parent, an OUTDIR
    made with other settings without ``overwrite``).
    """
    t_start = time.monotonic()
    outdir, prefix = _check_args(cfg)
    items = expand_sources(cfg.sources, exclude=outdir)
    if not items:
        raise UserError(f"no input files found in SOURCE {cfg.sources!r}")
    classes, labels = resolve_labels(items, cfg.classes)
    mine = [i for i in range(len(items)) if i % cfg.num_jobs == cfg.job_index]
    # Workers start now: their start-up (Python + PyAV imports) overlaps the setup below.
    pool = WorkerPool(cfg.n_workers, cfg.timeout)
    pool.start(min(cfg.n_workers, sum(1 for i in mine if items[i].error is None)))
    try:
        return _run_shard(cfg, t_start, outdir, prefix, items, classes, labels, mine, pool)
    finally:
        pool.close()


def _run_shard(cfg: ShardConfig, t_start: float, outdir: str, prefix: str, items: list[InputItem],
               classes: list[str], labels, mine: list[int], pool: WorkerPool) -> dict[str, Any]:
    settings = cfg.output_settings()
    settings["prefix"] = prefix
    settings["inputs"] = {"count": len(items), "sha256": fingerprint(items)}
    settings["classes"] = classes
    settings["versions"] = {k: v for k, v in library_versions().items() if k != "python"}

    os.makedirs(outdir, exist_ok=True)
    state = os.path.join(outdir, STATE_DIR)
    journal = _journal_path(outdir, cfg)
    header, commits = _read_journal(journal)
    index_settings = (_load_json(os.path.join(outdir, "index.json")) or {}).get("settings")
    old = header["settings"] if header else None
    if old is None and isinstance(index_settings, dict):
        old = {k: index_settings.get(k) for k in settings}
    if old is not None and old != settings:
        if not cfg.overwrite:
            diff = "; ".join(_settings_diff(old, settings)[:6])
            raise UserError(f"output {cfg.output!r} was made with other settings ({diff}); rerun with the "
                            "same settings to resume, or pass overwrite=true (--overwrite) to replace it")
        log.warning("overwrite: removing the previous dataset in %s", outdir)
        _clear_outdir(outdir)
        header, commits = None, []
    os.makedirs(state, exist_ok=True)
    if header is None:
        unlink_quiet(journal)
        _append_line(journal, {"settings": settings})
    tag = _job_tag(cfg)
    tmpdir = os.path.join(state, f"tmp{tag or '-j0000'}")
    shutil.rmtree(tmpdir, ignore_errors=True)
    os.makedirs(tmpdir)
    for path in glob.glob(os.path.join(glob.escape(outdir), f".{glob.escape(prefix)}{tag}-*.tar.partial")):
        unlink_quiet(path)

    # Resume: keep committed shards that are still intact on disk; redo from the first that is not.
    kept: list[dict[str, Any]] = []
    for rec in commits:
        if "shard" in rec:
            path = os.path.join(outdir, rec["shard"]["name"])
            if not os.path.isfile(path) or os.path.getsize(path) != rec["shard"]["bytes"]:
                log.warning("shard %s is missing or damaged: redoing from there", rec["shard"]["name"])
                break
        kept.append(rec)
    if len(kept) != len(commits):
        tmp_journal = journal + ".rewrite"
        with open(tmp_journal, "w", encoding="utf-8") as fh:
            for rec in [{"settings": settings}, *kept]:
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp_journal, journal)
    shards = [rec["shard"] for rec in kept if "shard" in rec]
    errors: list[dict[str, Any]] = [e for rec in kept for e in rec.get("errors", [])]
    skipped = sum(rec.get("skipped", 0) for rec in kept)
    finished = bool(kept) and kept[-1].get("final", False)
    start_pos, skip_clips = (kept[-1]["next"] if kept else (0, 0))

    summary: dict[str, Any]
    if not finished:
        job = _JobInputs(cfg=cfg, items=items, labels=labels, mine=mine, outdir=outdir, prefix=prefix, tag=tag,
                         tmpdir=tmpdir, journal=journal)
        new = _run_inputs(job, pool, start_pos=start_pos, skip_clips=skip_clips, first_shard=len(shards))
        shards, errors, skipped = shards + new.shards, errors + new.errors, skipped + new.skipped
    shutil.rmtree(tmpdir, ignore_errors=True)

    job_record = {"job_index": cfg.job_index, "num_jobs": cfg.num_jobs, "settings": settings, "classes": classes,
                  "shards": shards, "errors": errors, "skipped": skipped}
    index_path = None
    if cfg.num_jobs == 1:
        index_path = _write_index(outdir, settings, classes, [job_record], cfg)
    else:
        atomic_write_json(os.path.join(state, f"done{tag}.json"), job_record)
        try:
            index_path = merge_index(outdir)
        except UserError as exc:
            log.info("index.json not written yet: %s", exc)
    dropped = sum(1 for e in errors if e.get("_short"))
    summary = {
        "inputs": len(mine), "samples": sum(s["samples"] for s in shards), "shards": len(shards),
        "rejected": sum(1 for e in errors if not e.get("_short")), "dropped_short": dropped,
        "skipped": skipped, "frames": sum(s["frames"] for s in shards),
        "clip_seconds": round(sum(s["seconds"] for s in shards), 3), "bytes": sum(s["bytes"] for s in shards),
        "resumed_shards": sum(1 for r in kept if "shard" in r), "seconds": round(time.monotonic() - t_start, 3),
        "index": index_path, "output": outdir,
    }
    return summary


# ---- the input loop -----------------------------------------------------------------------------
# parent → WorkerPool: a ShardTask per input (at most ``window`` ahead of the writer);
# WorkerPool → reorder buffer: an InputResult per input, in completion order;
# reorder buffer → _ShardSink, in input order: samples into ShardWriter tars, and one journal line
# per commit: {"next": [pos, clip], "errors": [...], "skipped": n, "shard": {...}?, "final": true?}.

@dataclass(frozen=True)
class _JobInputs:
    """This job's share of the inputs and where its output goes (fixed for the whole run)."""

    cfg: ShardConfig
    items: list[InputItem]  # every input of the run, in SOURCE order
    labels: list[tuple[int, str | None]]  # (class index, class name) per item
    mine: list[int]  # indices into ``items`` of this job's inputs; a "pos" is an index into ``mine``
    outdir: str
    prefix: str  # shard names are {prefix}{tag}-{n:06d}.tar
    tag: str  # "-jNNNN" in a multi-job run, "" otherwise
    tmpdir: str  # where workers write clip files
    journal: str  # this job's journal (one line per commit)


@dataclass(frozen=True)
class _Committed:
    """What one run of the input loop committed (to be added to what a resumed run kept)."""

    shards: list[dict[str, Any]]  # shard records, as journalled and listed in index.json
    errors: list[dict[str, Any]]  # error records, as journalled (with "source" and "_input")
    skipped: int  # non-video files skipped


class _ShardSink:
    """Input results, in input order → shard tars → one journal line per commit.

    A commit closes the open shard (if any) and journals it together with the error records and
    skips seen since the previous commit and the (input position, clip) to resume from.
    """

    def __init__(self, job: _JobInputs, *, first_shard: int, start_pos: int, skip_clips: int) -> None:
        self.job = job
        self.first_shard = first_shard  # shards already committed by an earlier run
        self.start_pos, self.skip_clips = start_pos, skip_clips  # clips of start_pos already in a shard
        self.shard_bytes, self.shard_samples = job.cfg.shard_bytes, job.cfg.shard_samples
        self.writer: ShardWriter | None = None
        self.pending_errors: list[dict[str, Any]] = []
        self.pending_skipped = 0
        self.shards: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.skipped = 0

    def committed(self) -> _Committed:
        return _Committed(shards=list(self.shards), errors=list(self.errors), skipped=self.skipped)

    def add(self, pos: int, result: InputResult) -> None:
        """Write the samples of the input at ``pos`` and note its errors (for the next commit)."""
        item = self.job.items[self.job.mine[pos]]
        samples = result.samples
        first = self.skip_clips if pos == self.start_pos else 0
        for s in samples[:first]:  # already in a committed shard
            if s.owned:
                unlink_quiet(s.file)
        for j in range(first, len(samples)):
            self._add_sample(pos, j, samples[j])
        for e in result.errors:
            # printable: a non-UTF-8 file name must not break errors.jsonl or the journal
            rec = {"source": printable(item.path), **{k: printable(v) if isinstance(v, str) else v
                                                       for k, v in e.items()}, "_input": self.job.mine[pos]}
            self.pending_errors.append(rec)
        if result.skipped:
            self.pending_skipped += 1

    def _add_sample(self, pos: int, j: int, sample: Sample) -> None:
        meta = sample.meta
        meta_json = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
        cls = str(meta["label"]).encode() if meta["label"] >= 0 else None
        extra = ShardWriter.sample_bytes(meta_json, sample.size, cls)
        if self.writer is not None and (self.writer.samples >= self.shard_samples
                                        or self.writer.final_size_if_added(extra) > self.shard_bytes):
            self.commit((pos, j))
        if self.writer is None:
            self.writer = ShardWriter(self.job.outdir, self._shard_name())
        self.writer.add(meta["key"], meta_json, sample.file, cls, meta["frames"], meta["frames"] / meta["fps"])
        if sample.owned:  # not the source file itself (verbatim stream copy)
            unlink_quiet(sample.file)

    def _shard_name(self) -> str:
        return f"{self.job.prefix}{self.job.tag}-{self.first_shard + len(self.shards):06d}.tar"

    def commit(self, next_pos: tuple[int, int], final: bool = False) -> None:
        """Close the open shard and journal it; a rerun resumes at ``next_pos`` (input, clip)."""
        rec: dict[str, Any] = {"next": list(next_pos), "errors": list(self.pending_errors),
                               "skipped": self.pending_skipped}
        if self.writer is not None:
            rec["shard"] = self.writer.commit()
            self.shards.append(rec["shard"])
            self.writer = None
        if final:
            rec["final"] = True
        _append_line(self.job.journal, rec)
        self.errors.extend(self.pending_errors)
        self.pending_errors.clear()
        self.skipped += self.pending_skipped
        self.pending_skipped = 0

    def abort(self) -> None:
        """Drop the open shard (its partial file); committed shards stay."""
        if self.writer is not None:
            self.writer.abort()


def _input_bytes(item: InputItem, result: InputResult) -> int:
    """Source bytes an input contributed (for the progress rate): its size when it gave samples."""
    try:
        return os.path.getsize(item.path) if result.samples else 0
    except OSError:
        return 0


def _run_inputs(job: _JobInputs, pool: WorkerPool, *, start_pos: int, skip_clips: int,
                first_shard: int) -> _Committed:
    """The main loop: dispatch, reorder, write shards, journal each commit. Starts at input
    ``start_pos`` (its first ``skip_clips`` clips and ``first_shard`` shards are already
    committed); returns what it committed. ``pool`` is closed here and by the caller."""
    cfg, mine = job.cfg, job.mine
    n_workers = min(cfg.n_workers, max(1, len(mine) - start_pos))
    pool.n = n_workers
    window = max(4, 3 * n_workers)  # inputs in flight or finished but not yet written
    progress = _Progress(cfg, len(mine), start_pos)
    sink = _ShardSink(job, first_shard=first_shard, start_pos=start_pos, skip_clips=skip_clips)
    results: dict[int, InputResult] = {}  # the reorder buffer, by input position
    next_issue = next_write = start_pos
    try:
        while next_write < len(mine):
            # Dispatch while the reorder window has room (bounds memory and temp disk use).
            while next_issue < len(mine) and next_issue - next_write < window:
                item = job.items[mine[next_issue]]
                if item.error is not None:
                    results[next_issue] = InputResult.rejected(next_issue, *item.error)
                else:
                    worker = pool.idle()
                    if worker is None:
                        break
                    pool.submit(worker, next_issue, ShardTask.for_input(cfg, item, next_issue,
                                                                        job.labels[mine[next_issue]], job.tmpdir))
                next_issue += 1
            while next_write in results:
                result = results.pop(next_write)
                sink.add(next_write, result)
                progress.update(len(result.samples), len(result.errors),
                                _input_bytes(job.items[mine[next_write]], result))
                next_write += 1
            if next_write >= len(mine):
                break
            if next_write not in results:
                for pos, result in pool.poll(1.0):
                    results[pos] = result
        sink.commit((len(mine), 0), final=True)
    except BaseException:
        sink.abort()
        raise
    finally:
        pool.close()
        progress.close()
    return sink.committed()


# ---- index --------------------------------------------------------------------------------------

def _public_error(e: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in e.items() if not k.startswith("_")}


def _write_index(outdir: str, settings: dict[str, Any], classes: list[str], jobs: list[dict[str, Any]],
                 cfg: ShardConfig | None = None) -> str:
    """errors.jsonl then index.json (last, atomically)."""
    shards = [s for job in jobs for s in job["shards"]]
    errors = [e for job in jobs for e in job["errors"]]
    body = "".join(json.dumps(_public_error(e), ensure_ascii=False) + "\n" for e in errors)
    atomic_write_bytes(os.path.join(outdir, "errors.jsonl"), body.encode("utf-8"))
    full_settings = dict(settings)
    if cfg is not None:
        full_settings["sources"] = [printable(src) for src in cfg.sources]
    index = {
        "format": FORMAT, "version": VERSION, "name": settings.get("prefix") or os.path.basename(outdir),
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": full_settings, "classes": classes, "shards": shards,
        "totals": {"shards": len(shards), "samples": sum(s["samples"] for s in shards),
                   "frames": sum(s["frames"] for s in shards),
                   "seconds": round(sum(s["seconds"] for s in shards), 6),
                   "bytes": sum(s["bytes"] for s in shards),
                   "rejected": sum(1 for e in errors if not e.get("_short")),
                   "dropped_short": sum(1 for e in errors if e.get("_short")),
                   "skipped": sum(job.get("skipped", 0) for job in jobs)},
        "versions": library_versions(),
    }
    path = os.path.join(outdir, "index.json")
    atomic_write_json(path, index)
    return path


def merge_index(outdir: str) -> str:
    """Combine the finished jobs of a multi-job run into ``index.json`` (+ ``errors.jsonl``).

    Raises :class:`UserError` naming the jobs that have not finished, or when the jobs were run
    with different settings. Returns the path of ``index.json``.
    """
    outdir = os.path.abspath(outdir)
    state = os.path.join(outdir, STATE_DIR)
    done = sorted(glob.glob(os.path.join(glob.escape(state), "done-j*.json")))
    if not done:
        if os.path.isfile(os.path.join(outdir, "index.json")):
            return os.path.join(outdir, "index.json")  # a single-job dataset: already complete
        raise UserError(f"merge {outdir!r}: no finished job found (nothing in {STATE_DIR}/done-j*.json)")
    jobs = [_load_json(p) for p in done]
    if any(j is None for j in jobs):
        raise UserError(f"merge {outdir!r}: a job summary in {STATE_DIR} is unreadable")
    num = jobs[0]["num_jobs"]
    settings = jobs[0]["settings"]
    for j in jobs:
        if j["settings"] != settings:
            raise UserError(f"merge {outdir!r}: job {j['job_index']} used other settings than job "
                            f"{jobs[0]['job_index']} ({'; '.join(_settings_diff(settings, j['settings'])[:4])})")
    have = {j["job_index"] for j in jobs}
    missing = [i for i in range(num) if i not in have]
    if missing:
        raise UserError(f"merge {outdir!r}: jobs {missing[:10]} of {num} have not finished")
    jobs.sort(key=lambda j: j["job_index"])
    return _write_index(outdir, settings, jobs[0]["classes"], jobs)


def dataset_info(outdir: str) -> dict[str, Any]:
    """Summary of a dataset folder from its ``index.json`` (raises UserError when there is none)."""
    path = os.path.join(outdir, "index.json")
    index = _load_json(path)
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise UserError(f"{outdir!r}: no vidssl dataset here (index.json missing or not a {FORMAT} index)")
    totals = index.get("totals", {})
    return {"name": index.get("name"), "path": os.path.abspath(outdir), "version": index.get("version"),
            "created": index.get("created"), "classes": index.get("classes", []), **totals,
            "settings": index.get("settings", {}), "versions": index.get("versions", {})}
