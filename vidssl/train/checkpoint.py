"""Checkpoints of a run: atomic, complete or invisible, with the data position and every RNG.

Layout: ``RUN/checkpoints/step_00001000/`` is one DeepSpeed checkpoint (module, sharded optimizer
state under ZeRO) plus ``vidssl.json`` (step, world size, the resolved config; readable without
torch). It is written as ``.partial-step_00001000`` by every rank and renamed by rank 0 only after
every rank finished and the files were fsynced, so a checkpoint interrupted while being written
(kill -9, node loss) is never picked up by a resume: :func:`complete_checkpoints` lists only
renamed folders. The newest ``keep_checkpoints`` are kept.

``client_state["vidssl"]`` holds what DeepSpeed does not save: the step, the loader position
(the same on every rank), the RNG states of every rank (gathered, each rank restores its own),
the task's extra state (EMA targets) and the config.

Public API: :class:`Checkpointer` (``save`` / ``load``), :func:`resolve_resume`, :func:`complete_checkpoints`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

from vidssl.errors import UserError
from vidssl.fsio import fsync_dir

log = logging.getLogger("vidssl.train")

__all__ = ["Checkpointer", "complete_checkpoints", "resolve_resume", "check_compatible", "META", "tag_for",
           "has_partitioned_optimizer", "to_universal"]

META = "vidssl.json"
_TAG = re.compile(r"^step_(\d{8,})$")

# Settings that may change between a checkpoint and its resume without changing the batches or
# the updates of the steps still to run (everything else in data/train/model/objectives must match).
_FREE_KEYS = {
    "run.dir", "run.progress",
    "train.max_steps", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints", "train.resume",
    "train.max_bad_steps", "train.timeout_minutes", "train.plot", "train.device", "train.knn_every",
    "data.prefetch", "data.pin_memory", "data.decode_timeout", "data.read_timeout", "data.retries",
    "data.max_error_fraction", "data.backend", "data.decode_threads", "data.decode_stage", "data.decode_device",
    "data.dataset",  # the same index moved elsewhere; the loader checks the sample count itself
    "deepspeed.config", "deepspeed.overlap_comm", "train.elastic_resume",
}


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    out = []
    if root.is_dir():
        for d in root.iterdir():
            m = _TAG.match(d.name)
            if m and d.is_dir() and (d / META).is_file():
                out.append((int(m.group(1)), d))
    return sorted(out)


def read_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / META).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"resume: {str(ckpt)!r} is not a complete vidssl checkpoint ({exc})") from None


def resolve_resume(resume: str, run_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from, or None to start fresh.

    ``auto``: the newest complete checkpoint of ``run_dir`` (None when it has none). ``none``: None,
    refused when ``run_dir`` already holds checkpoints (they would be overwritten). A path: a
    checkpoint folder, or a run / checkpoints folder (its newest complete checkpoint).
    """
    root = Path(run_dir) / "checkpoints"
    mode = resume.strip()
    if mode.lower() == "auto":
        found = complete_checkpoints(root)
        return found[-1][1] if found else None
    if mode.lower() == "none":
        found = complete_checkpoints(root)
        if found:
            raise UserError(f"train.resume: got 'none' but {str(run_dir)!r} already holds {len(found)} checkpoint(s) "
                            f"(newest {found[-1][1].name}); use train.resume=auto to continue it, or a new run.dir")
        return None
    p = Path(mode)
    if not p.exists():
        raise UserError(f"train.resume: {mode!r} does not exist; allowed: auto, none, or a checkpoint folder")
    if (p / META).is_file():
        return p
    for cand in (p, p / "checkpoints"):
        found = complete_checkpoints(cand)
        if found:
            return found[-1][1]
    raise UserError(f"train.resume: {mode!r} holds no complete vidssl checkpoint (a folder like "
                    f"RUN/checkpoints/step_00000100 with {META})")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not (prefix and k in ("backbone_kwargs",)):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def check_compatible(meta: dict[str, Any], config: dict[str, Any], world_size: int, ckpt: Path,
                     *, elastic: bool = False) -> None:
    """Refuse a resume that could not reproduce the interrupted run, saying what differs.

    ``elastic`` (``train.elastic_resume``): another world size (and ``data.workers``,
    ``train.grad_accum``) is accepted; the
    resume then re-partitions the states (:func:`to_universal`) and maps the data position."""
    if int(meta.get("world_size", world_size)) != world_size and not elastic:
        raise UserError(f"resume: {ckpt} was written by {meta['world_size']} ranks and this run has {world_size}; "
                        f"the data order and ZeRO partitions depend on it: relaunch with {meta['world_size']} ranks, "
                        f"or set train.elastic_resume=true to re-partition the checkpoint for {world_size} "
                        f"(the rest of its epoch is then approximate), or start a new run from exported weights")
    # The global batch changes with the world size anyway: grad_accum may change to keep it.
    free = _FREE_KEYS | ({"data.workers", "train.grad_accum"} if elastic else set())
    saved, now = _flat(meta.get("config", {})), _flat(config)
    diffs = [k for k in sorted(set(saved) | set(now))
             if k not in free and saved.get(k, "<unset>") != now.get(k, "<unset>")
             and k.split(".")[0] in ("data", "train", "model", "objectives", "deepspeed", "finetune")]
    if diffs:
        shown = "; ".join(f"{k} was {saved.get(k, '<unset>')!r}, now {now.get(k, '<unset>')!r}" for k in diffs[:4])
        more = f" (and {len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise UserError(f"resume: settings differ from checkpoint {ckpt.name}: {shown}{more}; these change the "
                        f"data order or the updates, so the resumed run would not continue the interrupted one. "
                        f"Set them back, or start a new run.dir")


# ---- another world size ----------------------------------------------------------------------

def has_partitioned_optimizer(ckpt: Path) -> bool:
    """Whether ``ckpt`` holds per-rank optimizer partitions (ZeRO 1-3, or DeepSpeed's bf16 optimizer):
    then another world size needs a universal checkpoint. ZeRO-0 in fp32 keeps the whole optimizer
    state in ``mp_rank_00_model_states.pt``, which any world size loads."""
    return any(Path(ckpt).glob("*optim_states.pt"))


def to_universal(ckpt: Path, out: Path) -> Path:
    """Convert DeepSpeed checkpoint ``ckpt`` to a universal checkpoint at ``out`` (a folder named like
    ``ckpt``): fp32 weights and Adam moments per parameter, loadable at any world size with
    ``{"checkpoint": {"load_universal": true}}``. Runs DeepSpeed's ``ds_to_universal`` in a child
    process (it forks its own pool; a training process may hold CUDA). Written as ``.partial-*`` and
    renamed, so an interrupted conversion is never half-used; ``out`` is replaced."""
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    out = Path(out)
    # ds_to_universal also writes a ``latest_universal`` file beside its output folder: convert into
    # a private staging folder and move only the checkpoint out of it.
    staging = out.parent / f".partial-{out.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
           "--output_folder", str(staging / out.name), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        lines = [ln for ln in (res.stderr or res.stdout).strip().splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if not ln[:1].isspace()), lines[-1] if lines else "no output")
        raise UserError(f"resume: converting {str(ckpt)!r} to a universal checkpoint for another world size failed "
                        f"(DeepSpeed's ds_to_universal, exit {res.returncode}): {reason.strip()}; the checkpoint "
                        f"may be damaged: resume an older one with train.resume=PATH, or at its own world size")
    _fsync_tree(staging / out.name)
    shutil.rmtree(out, ignore_errors=True)
    (staging / out.name).rename(out)
    shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(out.parent)
    log.info("universal checkpoint of %s written to %s in %.1fs", ckpt.name, out, time.perf_counter() - t)
    return out


def reseed(seed: int, step: int, rank: int) -> None:
    """Seed every generator of this rank from (seed, step, rank): a resume whose checkpoint holds no
    RNG state for this rank (another world size) still draws reproducibly."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    s = int(np.random.SeedSequence([seed, step, rank, 0x5EED]).generate_state(1)[0])
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


# ---- RNG states ------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """Every generator this process draws from: Python, NumPy, torch CPU and CUDA."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: Path) -> None:
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


class Checkpointer:
    """Save and load the checkpoints of one run through an :class:`~vidssl.train.engine.Engine`."""

    def __init__(self, run_dir: str | Path, engine, *, keep: int) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.engine = engine
        self.keep = keep

    def save(self, step: int, *, loader_state: dict[str, Any], extra: dict[str, Any], config: dict[str, Any],
             train_state: dict[str, Any], param_group_names: list[list[str]] | None = None) -> Path:
        """Write checkpoint ``step`` on every rank; returns its folder. Collective: call on all ranks."""
        eng = self.engine
        tag = tag_for(step)
        partial = f".partial-{tag}"
        if eng.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / partial, ignore_errors=True)  # left by a crash mid-write
        eng.barrier()
        t = time.perf_counter()
        client = {"vidssl": {"step": step, "loader": loader_state, "rng": eng.gather_objects(rng_state()),
                             "extra": extra, "train_state": train_state, "world_size": eng.world_size,
                             "param_group_names": param_group_names}}
        eng.save(str(self.root), partial, client)
        eng.barrier()
        final = self.root / tag
        if eng.rank == 0:
            tmp = self.root / partial
            meta = {"step": step, "world_size": eng.world_size, "zero_stage": eng.zero_stage,
                    "precision": eng.precision, "config": config, "time": time.time()}
            (tmp / META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
            _fsync_tree(tmp)
            if final.exists():  # the same step saved again (a resumed run ending where it resumed)
                old = self.root / f".old-{tag}"
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
                tmp.rename(final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(final)
            fsync_dir(self.root)
            for _s, d in complete_checkpoints(self.root)[:-self.keep]:
                shutil.rmtree(d, ignore_errors=True)
            log.info("checkpoint %s written in %.1fs", final, time.perf_counter() - t)
        eng.barrier()
        return final

    def load(self, ckpt: Path, *, seed: int | None = None, source: Path | None = None) -> dict[str, Any]:
        """Load module, optimizer and this rank's RNG from ``ckpt``; returns ``client_state["vidssl"]``.

        ``seed`` (an elastic resume): a checkpoint of another world size is accepted, and each rank is
        re-seeded from (seed, step, rank) instead of restoring RNG states it does not hold.
        ``source``: the folder DeepSpeed reads instead of ``ckpt`` (its universal conversion)."""
        src = Path(source) if source is not None else Path(ckpt)
        client = self.engine.load(str(src.parent), src.name)
        state = client.get("vidssl")
        if not isinstance(state, dict):
            raise UserError(f"resume: {str(ckpt)!r} lacks vidssl's training state (not written by vidssl pretrain?)")
        rngs = state.get("rng") or []
        if len(rngs) == self.engine.world_size:
            set_rng_state(rngs[self.engine.rank])
        elif seed is not None:
            reseed(seed, int(state.get("step", 0)), self.engine.rank)
        else:
            raise UserError(f"resume: {str(ckpt)!r} holds RNG states of {len(rngs)} ranks; this run has "
                            f"{self.engine.world_size}")
        return state
