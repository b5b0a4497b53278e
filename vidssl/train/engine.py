"""The only module that imports DeepSpeed: process group, generated engine config, engine, checkpoint I/O.

Everything else in :mod:`vidssl.train` talks to :class:`Engine`, a thin wrapper whose methods say
what the loop needs (``forward``, ``backward``, ``step``, ``set_schedule``, ``save``, ``load``)
so that the models stay single-device code and the loop never touches DeepSpeed's API.

Facts this module is built around (DeepSpeed 0.19):

- ``init_distributed`` needs RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, or it tries
  MPI discovery. :func:`resolve_env` fills them in from SLURM (``SLURM_PROCID`` ...), from the
  deepspeed launcher's ``--local_rank``, or for a single process with no launcher at all.
- Without a GPU (or with ``train.device=cpu``) DeepSpeed's CPU accelerator runs with gloo.
- ``train_batch_size`` is derived from the real world size; optimizer ``torch_adam`` builds
  ``torch.optim.AdamW`` (no compiler needed, and the same path on CPU and GPU).
- ``save_checkpoint`` must run on every rank; ``load_checkpoint`` of a missing tag only warns and
  returns ``(None, None)``: :meth:`Engine.load` turns that into an error.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from vidssl.config import ConfigError
from vidssl.errors import RuntimeFailure, UserError

log = logging.getLogger("vidssl.train")

__all__ = ["DistEnv", "resolve_env", "resolve_device", "build_ds_config", "Engine", "init_engine",
           "consolidated_state_dict"]


# ---- process environment ---------------------------------------------------------------------

@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, and how it was launched."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "none", "slurm", "torchrun/deepspeed" (RANK set by a launcher)


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list (``node[03-05,9],gpu1`` → ``node03``); ``scontrol`` when available."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=10)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    first = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not first:
        return nodelist
    prefix, ranges = first.group(1), first.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_env(local_rank_arg: int | None = None, environ: dict | None = None) -> DistEnv:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in ``environ`` (default ``os.environ``).

    Order: variables a launcher set (torchrun, deepspeed) win; else SLURM's (``SLURM_PROCID``,
    ``SLURM_NTASKS``, ``SLURM_LOCALID``, first host of ``SLURM_JOB_NODELIST``, port from the job id);
    else a single process on 127.0.0.1 with a free port. ``local_rank_arg`` is the deepspeed
    launcher's ``--local_rank`` (used when LOCAL_RANK is absent).
    """
    env = os.environ if environ is None else environ
    launcher = "torchrun/deepspeed"
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) >= 1:
        launcher = "slurm"
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        if "MASTER_ADDR" not in env:
            env["MASTER_ADDR"] = _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        if "MASTER_PORT" not in env:
            env["MASTER_PORT"] = str(10000 + int(env.get("SLURM_JOB_ID", "0")) % 50000)
    elif "RANK" not in env:
        launcher = "none"
        env["RANK"], env["WORLD_SIZE"] = "0", "1"
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    if "LOCAL_RANK" not in env:
        env["LOCAL_RANK"] = str(local_rank_arg if local_rank_arg is not None else 0)
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in env:
            raise UserError(f"distributed launch: RANK={env['RANK']} is set but {key} is not; launch with "
                            f"torchrun, the deepspeed launcher or srun (tools/slurm/pretrain.sbatch)")
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    except (KeyError, ValueError) as exc:
        raise UserError(f"distributed launch: bad RANK/WORLD_SIZE/LOCAL_RANK ({exc})") from None
    if not (0 <= rank < world):
        raise UserError(f"distributed launch: RANK={rank} outside WORLD_SIZE={world}")
    return DistEnv(rank=rank, world_size=world, local_rank=local, launcher=launcher)


def resolve_device(requested: str) -> str:
    """``auto`` → ``cuda`` when a GPU is usable, else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch  # noqa: PLC0415

    has_cuda = torch.cuda.is_available()
    if requested == "cuda" and not has_cuda:
        raise ConfigError("train.device: got 'cuda' but no CUDA device is available; allowed here: auto, cpu")
    return "cuda" if requested == "cuda" or (requested == "auto" and has_cuda) else "cpu"


# ---- the generated DeepSpeed config -----------------------------------------------------------


def build_ds_config(train, ds, *, micro_batch: int, world_size: int, device: str) -> dict[str, Any]:
    """The DeepSpeed JSON for a :class:`TrainConfig` + :class:`DeepSpeedConfig`, with ``ds.config`` merged in.

    ``train_batch_size = micro_batch × grad_accum × world_size`` (the real world size). A key of
    the user JSON that contradicts a generated one raises :class:`ConfigError` naming both; keys
    the typed config does not set (bucket sizes, communication options) are taken as given.
    """
    if ds.precision == "fp16" and device != "cuda":
        raise ConfigError("deepspeed.precision: got 'fp16' on CPU; fp16 needs a GPU (DeepSpeed's CPU accelerator "
                          "does not support it); allowed on CPU: fp32, bf16")
    cfg: dict[str, Any] = {
        "train_batch_size": micro_batch * train.grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": train.lr, "betas": list(train.betas), "eps": train.eps, "weight_decay": train.weight_decay,
            # torch.optim.AdamW: no C++/CUDA op to compile, the same update on CPU and GPU.
            "torch_adam": True, "adam_w_mode": True}},
        "zero_optimization": {"stage": ds.zero_stage},
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "steps_per_print": 10**9,  # progress is ours (metrics.jsonl, TensorBoard, the bar)
        "wall_clock_breakdown": False,
    }
    if ds.precision == "fp16":
        cfg["fp16"].update({"loss_scale": 0, "initial_scale_power": 16})
    if ds.precision != "fp32":
        # DeepSpeed >= 0.19 casts parameters only; BatchNorm then meets bf16 weights and inputs with fp32
        # running statistics and fails. Cast buffers too (what module.bfloat16() used to do).
        cfg["data_types"] = {"buffer_dtype": "bf16" if ds.precision == "bf16" else "fp16"}
    if ds.zero_stage >= 2:
        cfg["zero_optimization"]["overlap_comm"] = ds.overlap_comm
    if ds.offload_optimizer != "none":
        if ds.zero_stage < 2:
            raise ConfigError(f"deepspeed.offload_optimizer: got {ds.offload_optimizer!r} with zero_stage "
                              f"{ds.zero_stage}; allowed: zero_stage 2 or 3")
        cfg["zero_optimization"]["offload_optimizer"] = {"device": ds.offload_optimizer}
    if ds.config:
        user = _read_user_json(ds.config)
        cfg = _merge_user(cfg, user, ds.config)
    return cfg


def _read_user_json(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"deepspeed.config: file {path!r} does not exist") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"deepspeed.config: cannot read {path!r} as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"deepspeed.config: {path!r} must hold a JSON object, got {type(data).__name__}")
    return data


# Which typed key sets each generated DeepSpeed key (for the conflict message).
_SOURCE = {
    "train_batch_size": "data.batch_size x train.grad_accum x world size (derived at launch; remove it)",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "gradient_clipping": "train.grad_clip",
    "optimizer": "train.lr/betas/eps/weight_decay (AdamW)",
    "zero_optimization.stage": "deepspeed.zero_stage",
    "zero_optimization.overlap_comm": "deepspeed.overlap_comm",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "bf16.enabled": "deepspeed.precision",
    "fp16.enabled": "deepspeed.precision",
}


def _merge_user(gen: dict[str, Any], user: Mapping[str, Any], path: str, prefix: str = "") -> dict[str, Any]:
    out = copy.deepcopy(gen)
    for k, v in user.items():
        key = f"{prefix}{k}"
        if k == "scheduler" and not prefix:
            raise ConfigError(f"deepspeed.config {path!r}: 'scheduler' is not allowed; the learning rate is a pure "
                              f"function of the step set from train.lr, train.warmup_steps, train.schedule")
        if v == "auto":  # Hugging Face-style placeholders: the generated value stands
            continue
        if k not in out:
            out[k] = copy.deepcopy(v)
            continue
        if isinstance(v, Mapping) and isinstance(out[k], Mapping) and key != "optimizer":
            out[k] = _merge_user(out[k], v, path, key + ".")
            continue
        if key == "optimizer" and isinstance(v, Mapping):
            if str(v.get("type", "AdamW")).lower() not in ("adamw", "adam"):
                raise ConfigError(f"deepspeed.config {path!r}: optimizer.type={v.get('type')!r} contradicts "
                                  f"{_SOURCE['optimizer']}; vidssl trains with AdamW")
            for pk, pv in dict(v.get("params", {})).items():
                have = out["optimizer"]["params"].get(pk)
                if pk in out["optimizer"]["params"] and not _same(pv, have):
                    raise ConfigError(f"deepspeed.config {path!r}: optimizer.params.{pk}={pv!r} contradicts "
                                      f"{have!r} from {_SOURCE['optimizer']}; set it there instead")
                out["optimizer"]["params"][pk] = pv
            continue
        if not _same(v, out[k]):
            src = _SOURCE.get(key, "the typed config")
            raise ConfigError(f"deepspeed.config {path!r}: {key}={v!r} contradicts {out[k]!r} from {src}; "
                              f"remove it from the JSON or change the typed setting")
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


# ---- the engine -------------------------------------------------------------------------------

def _init_process_group(env: DistEnv, device: str, timeout_minutes: float) -> None:
    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed picks an accelerator
    # DeepSpeed JIT-builds a small op with ninja. A process started as .venv/bin/vidssl without the venv on
    # PATH finds the system's ninja; one started with it finds the venv's; the two disagree about the build
    # log and rebuild the op (about a minute on 2 cores) every time the other built it. Use this
    # interpreter's bin folder first, so every start agrees.
    bindir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if bindir and path.split(os.pathsep)[:1] != [bindir]:
        os.environ["PATH"] = bindir + (os.pathsep + path if path else "")
    import deepspeed  # noqa: PLC0415
    import torch  # noqa: PLC0415
    from deepspeed.utils import logger as ds_logger  # noqa: PLC0415

    # DeepSpeed logs every config key at INFO; keep it for -v (DEBUG) only.
    if not log.isEnabledFor(logging.DEBUG):
        ds_logger.setLevel(logging.WARNING)
    if device == "cuda":
        torch.cuda.set_device(env.local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False,
                               timeout=datetime.timedelta(minutes=timeout_minutes), verbose=False)


class Engine:
    """DeepSpeed engine around a task module; the loop's only handle on distributed training."""

    def __init__(self, ds_engine, ds_config: dict[str, Any], env: DistEnv, device: str) -> None:
        self.ds = ds_engine
        self.ds_config = ds_config
        self.env = env
        self.device = ds_engine.device if device == "cuda" else __import__("torch").device("cpu")
        self.precision = "bf16" if ds_config["bf16"]["enabled"] else ("fp16" if ds_config["fp16"]["enabled"] else "fp32")
        self.zero_stage = int(ds_config["zero_optimization"]["stage"])

    # -- what the loop calls --
    @property
    def module(self):
        """The task module (single-device code), as DeepSpeed holds it (cast to bf16 under bf16)."""
        return self.ds.module

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    def forward(self, batch):
        return self.ds(batch)

    def backward(self, loss) -> None:
        """Backward of one micro-batch; the engine divides by the accumulation steps itself."""
        self.ds.backward(loss)

    def step(self) -> tuple[bool, float | None]:
        """Engine step on every micro-batch (DeepSpeed applies the optimizer at accumulation
        boundaries). Returns ``(boundary, grad_norm)``; at a boundary whose update DeepSpeed skipped
        (non-finite gradients under bf16/fp16) the norm is ``nan``."""
        boundary = self.ds.is_gradient_accumulation_boundary()
        norm = self._grad_norm() if boundary and self._norm_is_ours() else None
        skipped_before = self.ds.skipped_steps
        self.ds.step()
        if not boundary:
            return False, None
        if self.ds.skipped_steps > skipped_before:
            return True, float("nan")
        ds_norm = self.ds.get_global_grad_norm()
        if ds_norm is not None:
            norm = float(ds_norm)
        return True, norm

    def _norm_is_ours(self) -> bool:
        # ZeRO and the bf16/fp16 optimizers report the norm they clip with; plain fp32 ZeRO-0 does not.
        return self.zero_stage == 0 and self.precision == "fp32"

    def _grad_norm(self) -> float:
        import torch  # noqa: PLC0415

        grads = [p.grad.detach().float().norm() for p in self.ds.module.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def set_schedule(self, lr: float, weight_decay: float) -> None:
        """Write this step's lr and weight decay into every parameter group (times its ``lr_scale``/``wd_scale``)."""
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            group["weight_decay"] = weight_decay * group.get("wd_scale", 1.0)

    def all_true(self, flag: bool) -> bool:
        """True on every rank iff ``flag`` is true on every rank (one tiny all-reduce)."""
        import torch  # noqa: PLC0415
        import torch.distributed as dist  # noqa: PLC0415

        if self.world_size == 1:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=self.device)
        dist.all_reduce(t)
        return bool(t.item() == 0)

    def mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Mean of each named float over ranks (for logging); identity on one rank."""
        import torch  # noqa: PLC0415
        import torch.distributed as dist  # noqa: PLC0415

        if self.world_size == 1 or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        t /= self.world_size
        return dict(zip(keys, t.tolist()))

    def gather_objects(self, obj: Any) -> list[Any]:
        """``obj`` from every rank, in rank order (e.g. RNG states for a checkpoint)."""
        import torch.distributed as dist  # noqa: PLC0415

        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        import torch.distributed as dist  # noqa: PLC0415

        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist  # noqa: PLC0415

        if self.world_size > 1:
            dist.barrier()

    # -- checkpoint I/O (vidssl.train.checkpoint decides names, atomicity and retention) --
    def save(self, save_dir: str, tag: str, client_state: dict[str, Any]) -> None:
        """Every rank must call this (sharded optimizer state under ZeRO)."""
        self.ds.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)

    def load(self, load_dir: str, tag: str) -> dict[str, Any]:
        path, client = self.ds.load_checkpoint(load_dir, tag=tag, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeFailure(f"resume: DeepSpeed could not load checkpoint {os.path.join(load_dir, tag)!r}")
        return client or {}


def init_distributed(env: DistEnv, device: str, timeout_minutes: float) -> None:
    """Start the process group (gloo on CPU, NCCL on GPU) with the configured timeout."""
    _init_process_group(env, device, timeout_minutes)


def init_engine(task, param_groups: list[dict[str, Any]], ds_config: dict[str, Any], env: DistEnv,
                device: str) -> Engine:
    """Wrap ``task`` (an ``nn.Module`` whose ``forward(batch)`` returns ``{"loss", ...}``) in a DeepSpeed engine.

    Call :func:`init_distributed` first. Under ZeRO-3, ``initialize`` partitions the built task's
    parameters across ranks (each rank first holds a full copy while it is built).
    """
    import deepspeed  # noqa: PLC0415

    ds_engine, _opt, _, _ = deepspeed.initialize(model=task, model_parameters=param_groups,
                                                 config=copy.deepcopy(ds_config))
    return Engine(ds_engine, ds_config, env, device)


# ---- consolidated weights (export) --------------------------------------------------------------

def consolidated_state_dict(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The fp32 state dict of the whole task from one checkpoint folder (a DeepSpeed tag folder).

    ZeRO partitions and bf16/fp16 runs keep their fp32 master weights in the optimizer files:
    those are merged with DeepSpeed's ``zero_to_fp32``. A fp32 ZeRO-0 checkpoint holds them in
    the module file already. Buffers (BatchNorm statistics) come from the module file either way.
    """
    import torch  # noqa: PLC0415

    d = Path(checkpoint_dir)
    module_files = sorted(d.glob("*model_states.pt"))
    if not module_files:
        raise UserError(f"export: {str(d)!r} holds no DeepSpeed model states (*model_states.pt)")
    state = torch.load(module_files[0], map_location="cpu", weights_only=False)
    module = {k: v for k, v in state["module"].items()}
    optim = state.get("optimizer") if isinstance(state.get("optimizer"), dict) else {}
    names = (state.get("vidssl") or {}).get("param_group_names")
    if optim.get("fp32_groups") and names:
        # bf16/fp16 without ZeRO: the fp32 masters sit in the module file, one list per parameter group,
        # in the order of the groups the task gave (recorded by the trainer as param_group_names).
        for group_names, masters in zip(names, optim["fp32_groups"]):
            for name, master in zip(group_names, masters):
                if name in module and tuple(module[name].shape) == tuple(master.shape):
                    module[name] = master
    elif list(d.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # noqa: PLC0415

        fp32 = get_fp32_state_dict_from_zero_checkpoint(str(d.parent), tag=d.name)
        module.update({k: v for k, v in fp32.items()})
    return {k: (v.detach().float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in module.items()}
