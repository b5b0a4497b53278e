"""From a resolved config to a finished run: checks, process group, loader, engine, resume, loop, outputs.

Shared by ``vidssl pretrain`` and ``vidssl finetune``: the caller gives the config (with ``run``,
``data``, ``train`` and ``deepspeed`` sections) and a ``build_task(loader)`` that returns the task
module. Order matters for users:

1. :func:`preflight` (no worker process, no process group yet): device, the generated DeepSpeed
   config (conflicts, fp16 on CPU), the datasets (missing, empty), the resume target. Every
   problem here is a one-line error and exit 2.
2. process group (gloo on CPU, NCCL on GPU) with ``train.timeout_minutes``;
3. seeds, loader, task, engine; resume (module, optimizer, loader position, RNG, EMA);
4. the loop; checkpoints; metrics; curves.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vidssl.errors import UserError

log = logging.getLogger("vidssl.train")

__all__ = ["Preflight", "preflight", "parse_run_config", "import_plugins", "run_training", "git_sha", "launch_world_size", "seed_everything"]


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def launch_world_size() -> int:
    """The world size the launcher announced (WORLD_SIZE, else SLURM_NTASKS, else 1), before any process group."""
    for key in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(key, "").isdigit() and ("RANK" in os.environ or key == "SLURM_NTASKS"):
            return int(os.environ[key])
    return 1


def seed_everything(seed: int) -> None:
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Preflight:
    device: str
    world_size: int
    ds_config: dict[str, Any]
    resume_from: Path | None
    samples: int
    classes: list[str]


def import_plugins(modules) -> None:
    """Import ``run.imports`` (modules that register backbones); errors name the module."""
    import importlib  # noqa: PLC0415

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UserError(f"run.imports: cannot import {name!r} ({exc}); is it on PYTHONPATH?") from None


def parse_run_config(cls, items):
    """``parse_config_args`` for run configs: ``run.imports`` are imported first, so that backbones they
    register are known when ``model.backbone`` is validated."""
    from vidssl.config import apply_overrides, load_yaml, parse_config_args  # noqa: PLC0415

    path = next((i for i in items if "=" not in i and i.endswith((".yaml", ".yml"))), None)
    data = apply_overrides(load_yaml(path) if path else {}, [i for i in items if "=" in i])
    run = data.get("run") if isinstance(data.get("run"), dict) else {}
    imports = run.get("imports") or []
    if isinstance(imports, str):
        imports = [m.strip() for m in imports.strip("[]").split(",") if m.strip()]
    if isinstance(imports, list):
        import_plugins([str(m) for m in imports])
    return parse_config_args(cls, items)


def preflight(cfg) -> Preflight:
    """Every check that needs no worker and no process group; raises UserError/ConfigError."""
    from vidssl.data.index import open_index  # noqa: PLC0415
    from vidssl.train.checkpoint import check_compatible, read_meta, resolve_resume  # noqa: PLC0415
    from vidssl.train.engine import build_ds_config, resolve_device  # noqa: PLC0415

    device = resolve_device(cfg.train.device)
    world = launch_world_size()
    ds_config = build_ds_config(cfg.train, cfg.deepspeed, micro_batch=cfg.data.batch_size, world_size=world,
                                device=device)
    samples, classes = 0, []
    for i, d in enumerate(cfg.data.dataset):
        ix = open_index(d, cfg.data.read_timeout)
        if ix.samples == 0:
            raise UserError(f"data.dataset: {d!r} holds no samples (index.json lists no sample; see its "
                            f"errors.jsonl for rejected inputs)")
        samples += ix.samples
        if i == 0:
            classes = list(ix.classes)
    resume_from = resolve_resume(cfg.train.resume, cfg.run.dir)
    if resume_from is not None:
        check_compatible(read_meta(resume_from), cfg.to_dict(), world, resume_from, elastic=cfg.train.elastic_resume)
    return Preflight(device, world, ds_config, resume_from, samples, classes)


def run_training(cfg, build_task: Callable[[Any], Any], *, local_rank: int | None = None,
                 pre: Preflight | None = None, name: str = "train",
                 on_step_factory: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Run (or resume) training; returns a summary (final step, last row, run dir) on every rank."""
    import torch  # noqa: PLC0415

    from vidssl.data import build_loader  # noqa: PLC0415
    from vidssl.train.checkpoint import (  # noqa: PLC0415
        Checkpointer,
        check_compatible,
        has_partitioned_optimizer,
        read_meta,
        to_universal,
    )
    from vidssl.train.engine import init_distributed, init_engine, resolve_env  # noqa: PLC0415
    from vidssl.train.loop import TrainState, train_loop  # noqa: PLC0415
    from vidssl.train.metrics import open_metrics, read_metrics  # noqa: PLC0415

    pre = pre or preflight(cfg)
    before = {k: os.environ.get(k) for k in _DIST_VARS}
    env = resolve_env(local_rank)
    if env.world_size != pre.world_size:
        # preflight saw no launcher variables but resolve_env found some (or the reverse): redo the derived config
        from vidssl.train.engine import build_ds_config  # noqa: PLC0415

        pre.ds_config = build_ds_config(cfg.train, cfg.deepspeed, micro_batch=cfg.data.batch_size,
                                        world_size=env.world_size, device=pre.device)
    if not torch.distributed.is_initialized():
        init_distributed(env, pre.device, cfg.train.timeout_minutes)
    elif torch.distributed.get_world_size() != env.world_size:
        raise UserError(f"a process group of {torch.distributed.get_world_size()} ranks already exists in this "
                        f"process; cannot train with {env.world_size}")
    run_dir = Path(cfg.run.dir)
    engine = None
    loader = None
    universal = None
    try:
        if env.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(
                f"# resolved config of vidssl {name}; git {git_sha() or 'unknown'}; world size {env.world_size}\n"
                + cfg.to_yaml(), encoding="utf-8")
        # Same seed on every rank for the weights (DeepSpeed also broadcasts rank 0's); per-rank after.
        seed_everything(cfg.train.seed)
        loader = build_loader(cfg.data, rank=env.rank, world_size=env.world_size)
        task = build_task(loader)
        if pre.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # Ranks on one machine share its cores: oversubscribed OpenMP threads spin against each other.
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // max(1, _local_world())))
        groups = task.param_groups()
        name_of = {id(p): n for n, p in task.named_parameters()}
        group_names = [[name_of[id(p)] for p in g["params"]] for g in groups]  # lets export find fp32 masters
        meta = read_meta(pre.resume_from) if pre.resume_from is not None else {}
        saved_world = int(meta.get("world_size", 0)) or env.world_size
        ds_config = pre.ds_config
        if pre.resume_from is not None and saved_world != env.world_size:
            check_compatible(meta, cfg.to_dict(), env.world_size, pre.resume_from, elastic=cfg.train.elastic_resume)
            if has_partitioned_optimizer(pre.resume_from):
                # Re-partition the optimizer states (and fp32 masters) for this world size: rank 0
                # converts, every rank loads its new partition from the per-parameter files.
                universal = run_dir / "checkpoints" / ".universal" / pre.resume_from.name
                failed = [None]
                if env.rank == 0:
                    try:
                        to_universal(pre.resume_from, universal)
                    except UserError as exc:
                        failed = [str(exc)]
                torch.distributed.broadcast_object_list(failed, src=0)  # every rank stops with rank 0's reason
                if failed[0]:
                    raise UserError(failed[0])
                ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
        engine = init_engine(task, groups, ds_config, env, pre.device)
        task.place(engine.device)
        seed_everything(cfg.train.seed * 1000 + env.rank + 1)
        state = TrainState()
        ckpt = Checkpointer(run_dir, engine, keep=cfg.train.keep_checkpoints)
        if pre.resume_from is not None:
            elastic = saved_world != env.world_size
            saved = ckpt.load(pre.resume_from, seed=cfg.train.seed if elastic else None, source=universal)
            loader.load_state_dict(saved["loader"], reshard=elastic)
            if elastic:
                old_w = saved["loader"]["world_size"]
                old_accum = int(meta.get("config", {}).get("train", {}).get("grad_accum", cfg.train.grad_accum))
                log.warning("elastic resume: checkpoint %s was written by %d ranks, resuming on %d: global batch "
                            "%d -> %d (train.lr and train.max_steps are not rescaled); epoch %d continues at "
                            "batch %d of %d per rank (approximate for the rest of this epoch, exact after); "
                            "per-rank RNGs re-seeded", pre.resume_from.name, old_w, env.world_size,
                            cfg.data.batch_size * old_accum * old_w,
                            cfg.data.batch_size * cfg.train.grad_accum * env.world_size, loader.epoch,
                            loader.state_dict()["batches"], len(loader))
            if universal is not None:
                torch.distributed.barrier()  # every rank has read its partition
                if env.rank == 0:
                    shutil.rmtree(universal, ignore_errors=True)
                    try:
                        universal.parent.rmdir()
                    except OSError:
                        pass
            task.load_extra_state(saved.get("extra", {}))
            state = TrainState(**saved["train_state"])
            log.info("resumed from %s at step %d (epoch %d, batch %d)", pre.resume_from, state.step,
                     loader.epoch, loader.state_dict()["batches"])
            if state.step >= cfg.train.max_steps:
                log.warning("checkpoint step %d >= train.max_steps %d: nothing to train", state.step,
                            cfg.train.max_steps)
        metrics = open_metrics(env.rank, run_dir, start_step=state.step, max_steps=cfg.train.max_steps,
                               progress=cfg.run.progress, log_every=cfg.train.log_every, name=name)
        config_dict = cfg.to_dict()

        def checkpoint(st: TrainState) -> None:
            ckpt.save(st.step, loader_state=loader.state_dict(), extra=task.extra_state(), config=config_dict,
                      train_state=st.to_dict(), param_group_names=group_names)

        on_step = on_step_factory(engine=engine, metrics=metrics, task=task) if on_step_factory else None
        try:
            state = train_loop(engine=engine, loader=loader, cfg=cfg.train, state=state, metrics=metrics,
                               micro_batch=cfg.data.batch_size, checkpoint=checkpoint, on_step=on_step)
        finally:
            metrics.close(plot=cfg.train.plot)
        rows = read_metrics(run_dir / "metrics.jsonl") if env.rank == 0 else []
        return {"run": str(run_dir), "step": state.step, "skipped": state.skipped,
                "last": next((r for r in reversed(rows) if "loss" in r), None), "rank": env.rank,
                "world_size": env.world_size, "engine": engine}
    finally:
        if loader is not None:
            loader.close()
        # The process group stays up until the process exits: DeepSpeed caches its groups in module
        # globals, so a second training in the same process (tests, notebooks) must reuse it.
        if env.launcher == "none":  # leave the caller's environment as it was (tests run several trainings)
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _local_world() -> int:
    """Ranks on this machine: torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's LOCAL_SIZE, or SLURM's."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(key, "").split("(")[0]
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1
