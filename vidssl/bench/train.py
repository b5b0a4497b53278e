"""``vidssl bench train``: throughput of ``vidssl pretrain`` and the DeepSpeed engine's overhead.

Config: ``configs/pretrain/demo_cpu.yaml`` unless a YAML is given, then ``key=value`` overrides,
exactly as ``vidssl pretrain`` takes them (e.g. ``data.dataset=/tmp/shards``).

1. **The real path** (target: data wait < 5% of step time). ``--repeats`` runs of
   ``python -m vidssl pretrain CONFIG ... train.max_steps=--steps`` in a subprocess each (a fresh
   process group, a fresh temporary ``run.dir``; ``run.progress=none train.plot=false
   train.checkpoint_every=0``, so only the end-of-run checkpoint is written, after the last timed
   step). Read back from each run's ``metrics.jsonl``, leaving out the first ``--warmup`` steps:
   median clips/s, median step time, and the data-wait share of the time (total time waiting for
   the loader / total step time over those steps; the per-step median is reported too). The
   report gives the median of the per-run figures and their range.
2. **Engine vs plain PyTorch** (target: engine step time <= 1.10x plain). One process, the same
   torch thread count for both sides (``--threads``; 0: what ``vidssl pretrain`` uses for one
   process: ``OMP_NUM_THREADS``, else the usable cores). ``--compare-batches`` batches are read
   once from the real loader (then the loader is closed, so no worker competes for the cores) and
   cycled from memory.
   Each repeat builds, with the same seed, (a) a :class:`~vidssl.train.task.PretrainTask` wrapped by
   :func:`vidssl.train.engine.init_engine` (single-process gloo group) and stepped as
   :func:`vidssl.train.loop.train_loop` does it (``set_schedule``, forward, the finite-loss check,
   ``backward``, ``step``, ``after_step``, reading the logged values) and (b) the same task with
   ``torch.optim.AdamW`` over the same parameter groups and settings, the same schedules, the same
   finite-loss check, ``clip_grad_norm_`` and ``step``. Steps of (a) and (b) alternate one by one
   (the order flips every step) on the same batches, each side with its own torch RNG stream, so
   load from other jobs hits both alike and both compute the same losses (reported as a check).
   ``--compare-warmup`` steps per side are left out; the ratio is the median over repeats of
   (median engine step / median plain step) in that repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vidssl.errors import RuntimeFailure, UserError

__all__ = ["register", "run"]

DATA_WAIT_TARGET = 0.05  # data wait under 5% of step time
ENGINE_RATIO_TARGET = 1.10  # engine step within 10% of a plain PyTorch step

# Launcher variables: every measurement here is a single process, whatever launched the bench.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE")


def register(sub) -> None:
    from vidssl.cli import add_command  # noqa: PLC0415

    p = add_command(sub, "train", help="vidssl pretrain clips/s and data wait; DeepSpeed engine vs plain PyTorch",
                    description=__doc__)
    p.add_argument("config", nargs="*", metavar="[config.yaml] [key=value]",
                   help="a pretrain YAML (default configs/pretrain/demo_cpu.yaml) and/or dotted overrides, "
                        "e.g. data.dataset=/tmp/shards")
    p.add_argument("--steps", type=int, default=30, help="steps per vidssl pretrain run (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="first steps of each run left out (default 5)")
    p.add_argument("--repeats", type=int, default=3,
                   help="vidssl pretrain runs, and engine-vs-plain repeats (default 3)")
    p.add_argument("--compare-steps", type=int, default=15,
                   help="timed steps per side and repeat of the engine-vs-plain comparison (default 15)")
    p.add_argument("--compare-warmup", type=int, default=3,
                   help="untimed steps per side first, in each repeat (default 3)")
    p.add_argument("--compare-batches", type=int, default=8,
                   help="batches read once from the loader and cycled in memory (default 8)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads of the comparison (0: as vidssl pretrain sets them for one process: "
                        "OMP_NUM_THREADS, else the usable cores)")
    p.add_argument("--skip-pretrain", action="store_true", help="leave out part 1 (the vidssl pretrain runs)")
    p.add_argument("--skip-compare", action="store_true", help="leave out part 2 (engine vs plain PyTorch)")
    p.add_argument("--keep", default=None, help="keep the run folders under this folder (default: removed)")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.set_defaults(func=run)


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _items(config: list[str]) -> list[str]:
    """The user's config items with the default YAML first when none is given (paths made absolute,
    so the subprocess reads the same file)."""
    items = list(config)
    yamls = [i for i in items if "=" not in i]
    if not yamls:
        default = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "demo_cpu.yaml"
        if not default.is_file():
            raise UserError(f"no config given and the default {default} is missing; pass a pretrain YAML")
        items.insert(0, str(default))
    return [str(Path(i).resolve()) if "=" not in i and Path(i).is_file() else i for i in items]


# ---- part 1: the real vidssl pretrain path ------------------------------------------------------

def _pretrain_run(items: list[str], run_dir: Path, steps: int, warmup: int) -> dict:
    """One ``python -m vidssl pretrain`` subprocess; figures from its metrics.jsonl after ``warmup`` steps."""
    from vidssl.train.metrics import read_metrics  # noqa: PLC0415

    cmd = [sys.executable, "-m", "vidssl", "pretrain", *items, f"run.dir={run_dir}", f"train.max_steps={steps}",
           "run.progress=none", "train.plot=false", "train.checkpoint_every=0", "train.resume=none"]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    log_path = run_dir.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    if code != 0:
        tail = log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
        raise RuntimeFailure(f"vidssl pretrain exited with {code}: {' '.join(cmd)}\n" + "\n".join(tail))
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "step_time" in r]
    timed = [r for r in rows if r["step"] > warmup]
    if not timed:
        raise RuntimeFailure(f"{run_dir}/metrics.jsonl: no step after the {warmup} warm-up steps")
    total = sum(r["step_time"] for r in timed)
    waited = sum(r["data_wait"] * r["step_time"] for r in timed)
    return {"steps_timed": len(timed), "wall_s": round(wall, 2),
            "clips_per_s": _median([r["clips_per_s"] for r in timed]),
            "step_time_s": _median([r["step_time"] for r in timed]),
            "data_wait_share": waited / total,
            "data_wait_median": _median([r["data_wait"] for r in timed]),
            "data_wait_max": max(r["data_wait"] for r in timed),
            "warmup_step_times_s": [round(r["step_time"], 3) for r in rows if r["step"] <= warmup],
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def _part_pretrain(items, args, root: Path) -> dict:
    runs = []
    for r in range(args.repeats):
        res = _pretrain_run(items, root / f"run{r}", args.steps, args.warmup)
        runs.append(res)
        print(f"pretrain run {r + 1}/{args.repeats}: {res['clips_per_s']:.2f} clips/s, step "
              f"{res['step_time_s']:.3f} s, data wait {100 * res['data_wait_share']:.2f}% of step time "
              f"(median step {100 * res['data_wait_median']:.2f}%, worst step {100 * res['data_wait_max']:.1f}%), "
              f"{res['wall_s']:.0f} s wall, load {res['load_avg_1m']}", flush=True)
    keys = ("clips_per_s", "step_time_s", "data_wait_share", "data_wait_median")
    summary = {k: _median([r[k] for r in runs]) for k in keys}
    summary["range"] = {k: [min(r[k] for r in runs), max(r[k] for r in runs)] for k in keys}
    summary["data_wait_met"] = summary["data_wait_share"] < DATA_WAIT_TARGET
    return {"runs": runs, **summary}


# ---- part 2: the engine against a plain PyTorch loop --------------------------------------------

class _Side:
    """One training loop under test: its task, its step function and its own torch RNG stream."""

    def __init__(self, name, task, step_fn, rng_state):
        self.name, self.task, self.step_fn, self.rng = name, task, step_fn, rng_state
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self, i: int, batches, sync) -> None:
        import torch  # noqa: PLC0415

        torch.set_rng_state(self.rng)
        sync()
        t0 = time.perf_counter()
        loss = self.step_fn(i, batches)
        sync()
        self.times.append(time.perf_counter() - t0)
        self.rng = torch.get_rng_state()
        self.losses.append(loss)


def _engine_side(cfg, ds_config, env, device, rng):
    """(a): the task in the DeepSpeed engine, stepped as vidssl.train.loop.train_loop does."""
    import torch  # noqa: PLC0415

    from vidssl.train.engine import init_engine  # noqa: PLC0415
    from vidssl.train.loop import to_device  # noqa: PLC0415
    from vidssl.train.schedule import lr_at, weight_decay_at  # noqa: PLC0415
    from vidssl.train.task import PretrainTask  # noqa: PLC0415

    torch.manual_seed(cfg.train.seed)
    task = PretrainTask(cfg.model, cfg.objectives, cfg.train)
    engine = init_engine(task, task.param_groups(), ds_config, env, device)
    task.place(engine.device)
    module, tc = engine.module, cfg.train
    module.train()

    def step(i, batches):
        engine.set_schedule(lr_at(i, tc), weight_decay_at(i, tc))
        total = 0.0
        for m in range(tc.grad_accum):
            out = engine.forward(to_device(batches[(i * tc.grad_accum + m) % len(batches)], engine.device))
            loss = out["loss"]
            if not engine.all_true(bool(torch.isfinite(loss.detach()).all())):
                raise RuntimeFailure(f"engine: non-finite loss at step {i + 1}")
            engine.backward(loss)
            engine.step()
            values = {k: float(v.detach()) for k, v in out.items()}  # what the loop logs
            total += values["loss"]
        module.after_step(i)
        return total / tc.grad_accum

    return _Side("engine", task, step, rng), engine


def _plain_side(cfg, device, rng):
    """(b): the same task, torch.optim.AdamW over the same groups and settings, plain clip and step."""
    import torch  # noqa: PLC0415

    from vidssl.train.loop import to_device  # noqa: PLC0415
    from vidssl.train.schedule import lr_at, weight_decay_at  # noqa: PLC0415
    from vidssl.train.task import PretrainTask  # noqa: PLC0415

    torch.manual_seed(cfg.train.seed)
    task = PretrainTask(cfg.model, cfg.objectives, cfg.train).to(device)
    task.place(torch.device(device))
    task.train()
    tc = cfg.train
    groups = task.param_groups()
    # The same call DeepSpeed makes for optimizer AdamW with torch_adam (foreach left to torch).
    opt = torch.optim.AdamW(groups, lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps, weight_decay=tc.weight_decay)
    params = [p for g in groups for p in g["params"]]
    dev = torch.device(device)

    def step(i, batches):
        lr, wd = lr_at(i, tc), weight_decay_at(i, tc)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
            g["weight_decay"] = wd * g.get("wd_scale", 1.0)
        total = 0.0
        for m in range(tc.grad_accum):
            out = task(to_device(batches[(i * tc.grad_accum + m) % len(batches)], dev))
            loss = out["loss"]
            if not bool(torch.isfinite(loss.detach()).all()):
                raise RuntimeFailure(f"plain: non-finite loss at step {i + 1}")
            (loss / tc.grad_accum if tc.grad_accum > 1 else loss).backward()
            values = {k: float(v.detach()) for k, v in out.items()}
            total += values["loss"]
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        task.after_step(i)
        return total / tc.grad_accum

    return _Side("plain", task, step, rng)


def _part_compare(cfg, args) -> dict:
    import gc  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from vidssl.data import build_loader  # noqa: PLC0415
    from vidssl.train.engine import build_ds_config, init_distributed, resolve_device, resolve_env  # noqa: PLC0415
    from vidssl.train.loop import endless_batches  # noqa: PLC0415
    from vidssl.train.runner import seed_everything  # noqa: PLC0415

    device = resolve_device(cfg.train.device)
    # What vidssl pretrain uses for one process: OMP_NUM_THREADS when set (torch's default honours it),
    # else the cores this process may run on.
    threads = args.threads or (torch.get_num_threads() if "OMP_NUM_THREADS" in os.environ
                               else max(1, len(os.sched_getaffinity(0))))
    need = max(args.compare_batches, 1)
    seed_everything(cfg.train.seed)
    loader = build_loader(cfg.data, rank=0, world_size=1)
    t0 = time.perf_counter()
    try:
        it = endless_batches(loader)
        batches = [next(it) for _ in range(need)]
    finally:
        loader.close()  # no worker left to compete for the cores while the loops are timed
    read_s = time.perf_counter() - t0
    print(f"compare: {len(batches)} batches of {cfg.data.batch_size} read in {read_s:.1f} s and held in memory; "
          f"{threads} torch threads on both sides", flush=True)
    same_math = cfg.deepspeed.precision == "fp32" and cfg.deepspeed.zero_stage == 0
    if not same_math:
        print(f"compare: note: the plain side is fp32 AdamW without sharding; the engine runs "
              f"{cfg.deepspeed.precision} ZeRO-{cfg.deepspeed.zero_stage}, so the ratio includes that difference",
              flush=True)

    env = resolve_env()
    init_distributed(env, device, cfg.train.timeout_minutes)
    ds_config = build_ds_config(cfg.train, cfg.deepspeed, micro_batch=cfg.data.batch_size, world_size=1,
                                device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    repeats = []
    for r in range(args.repeats):
        torch.set_num_threads(threads)
        seed_everything(cfg.train.seed * 1000 + 1)
        rng = torch.get_rng_state()
        (a, engine) = _engine_side(cfg, ds_config, env, device, rng.clone())
        b = _plain_side(cfg, device, rng.clone())
        sides = [a, b]
        thread_counts = set()
        for i in range(args.compare_warmup + args.compare_steps):
            # Alternate one step each, flipping the order every step and every repeat.
            for side in (sides if (i + r) % 2 == 0 else sides[::-1]):
                thread_counts.add(torch.get_num_threads())
                side.step(i, batches, sync)
        if thread_counts != {threads}:
            raise RuntimeFailure(f"torch thread count changed during the comparison: {sorted(thread_counts)}")
        w = args.compare_warmup
        ea, pb = _median(a.times[w:]), _median(b.times[w:])
        diff = max(abs(x - y) for x, y in zip(a.losses, b.losses))
        # Steps i of (a) and (b) ran back to back: their ratios see the same load.
        paired = _median([x / y for x, y in zip(a.times[w:], b.times[w:])])
        rep = {"engine_step_s": ea, "plain_step_s": pb, "ratio": ea / pb, "paired_ratio": paired,
               "engine_range_s": [min(a.times[w:]), max(a.times[w:])],
               "plain_range_s": [min(b.times[w:]), max(b.times[w:])],
               "max_abs_loss_diff": diff,
               "max_abs_loss_diff_first3": max(abs(x - y) for x, y in zip(a.losses[:3], b.losses[:3])),
               "first_loss": a.losses[0], "last_loss": a.losses[-1],
               "threads": threads, "load_avg_1m": round(os.getloadavg()[0], 2)}
        repeats.append(rep)
        if same_math and device == "cpu" and rep["max_abs_loss_diff_first3"] > 1e-4 * abs(a.losses[0]) + 1e-6:
            print(f"compare: WARNING: the engine and the plain loop disagree on the first losses "
                  f"({rep['max_abs_loss_diff_first3']:.2e}): they are not computing the same steps", flush=True)
        print(f"compare repeat {r + 1}/{args.repeats}: engine {ea:.3f} s/step, plain {pb:.3f} s/step, ratio "
              f"{rep['ratio']:.3f} (step by step {paired:.3f}); |loss difference| "
              f"{rep['max_abs_loss_diff_first3']:.1e} over "
              f"the first 3 steps, {diff:.1e} over all (loss {a.losses[0]:.3f} -> {a.losses[-1]:.3f}); "
              f"load {rep['load_avg_1m']}", flush=True)
        del a, b, sides, engine
        gc.collect()
    ratios = [x["ratio"] for x in repeats]
    return {"device": device, "threads": threads, "batches": len(batches), "batch_size": cfg.data.batch_size,
            "grad_accum": cfg.train.grad_accum, "precision": cfg.deepspeed.precision,
            "zero_stage": cfg.deepspeed.zero_stage, "steps": args.compare_steps, "warmup": args.compare_warmup,
            "repeats": repeats,
            "engine_step_s": _median([x["engine_step_s"] for x in repeats]),
            "plain_step_s": _median([x["plain_step_s"] for x in repeats]),
            "ratio": _median(ratios), "ratio_range": [min(ratios), max(ratios)],
            "paired_ratio": _median([x["paired_ratio"] for x in repeats]),
            "ratio_met": _median(ratios) <= ENGINE_RATIO_TARGET}


# ---- the command --------------------------------------------------------------------------------

def _versions() -> dict:
    import importlib.metadata as md  # noqa: PLC0415
    import platform  # noqa: PLC0415

    out = {"python": platform.python_version(), "cpu_count": os.cpu_count()}
    for name in ("torch", "deepspeed"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def _fmt_range(lo, hi, scale=1.0, digits=2):
    return f"{lo * scale:.{digits}f}–{hi * scale:.{digits}f}"


def run(args: argparse.Namespace) -> int:
    import shutil  # noqa: PLC0415

    from vidssl.train.config import PretrainConfig  # noqa: PLC0415
    from vidssl.train.runner import parse_run_config, preflight  # noqa: PLC0415

    for name in ("steps", "repeats", "compare_steps", "compare_batches"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')}: got {getattr(args, name)}; allowed: >= 1")
    for name in ("warmup", "compare_warmup", "threads"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')}: got {getattr(args, name)}; allowed: >= 0")
    if args.warmup >= args.steps:
        raise UserError(f"--warmup {args.warmup} >= --steps {args.steps}: no step would be timed")
    if args.skip_pretrain and args.skip_compare:
        raise UserError("--skip-pretrain and --skip-compare together leave nothing to measure")
    for k in _LAUNCH_VARS:  # a single-process benchmark, whatever launched it
        os.environ.pop(k, None)
    # DeepSpeed's CPU backend JIT-builds a small op (shm comm) with whichever `ninja` is on PATH, in
    # a cache shared by every process of this user. Two ninja versions (the venv's and the system's)
    # disagree on the build log, so processes alternating between them rebuild it at every start
    # (~30-50 s on 2 cores). Use the venv's tools, as an activated venv does, in every run here.
    bindir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bindir:
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")

    items = _items(args.config)
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vidssl-bench-train-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        cfg = parse_run_config(PretrainConfig, [*items, f"run.dir={root / 'preflight'}", "train.resume=none"])
        preflight(cfg)  # a missing dataset or a bad config fails here, in one line, before anything runs
        result = {"config": items, "machine": _versions(), "load_avg_1m_start": round(os.getloadavg()[0], 2),
                  "batch_size": cfg.data.batch_size, "backbone": cfg.model.backbone, "workers": cfg.data.workers}
        if not args.skip_pretrain:
            result["pretrain"] = {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
                                  **_part_pretrain(items, args, root)}
        if not args.skip_compare:
            result["compare"] = _part_compare(cfg, args)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    result["load_avg_1m_end"] = round(os.getloadavg()[0], 2)

    m = result["machine"]
    print(f"\n{cfg.model.backbone}, batch {cfg.data.batch_size}, {cfg.data.frames} frames at {cfg.data.crop_size}px, "
          f"{cfg.data.workers} loader workers, {cfg.deepspeed.precision} ZeRO-{cfg.deepspeed.zero_stage}; "
          f"{m['cpu_count']} cores, torch {m['torch']}, deepspeed {m['deepspeed']}; load "
          f"{result['load_avg_1m_start']} -> {result['load_avg_1m_end']}")
    print(f"{'measure':<44} {'median':>12} {'range over runs':>18} {'target':>10} {'status':>8}")
    if "pretrain" in result:
        p = result["pretrain"]
        rg = p["range"]
        print(f"vidssl pretrain ({p['repeats']} run(s) x {p['steps'] - p['warmup']} timed steps, "
              f"{p['warmup']} warm-up)")
        print(f"{'  clips/s':<44} {p['clips_per_s']:>12.2f} {_fmt_range(*rg['clips_per_s']):>18}")
        print(f"{'  step time (s)':<44} {p['step_time_s']:>12.3f} {_fmt_range(*rg['step_time_s'], digits=3):>18}")
        print(f"{'  data wait, % of step time':<44} {100 * p['data_wait_share']:>12.2f} "
              f"{_fmt_range(*rg['data_wait_share'], scale=100):>18} {'< 5%':>10} "
              f"{'met' if p['data_wait_met'] else 'NOT MET':>8}")
        print(f"{'  data wait, median step, %':<44} {100 * p['data_wait_median']:>12.2f} "
              f"{_fmt_range(*rg['data_wait_median'], scale=100):>18}")
    if "compare" in result:
        c = result["compare"]
        er = [x["engine_step_s"] for x in c["repeats"]]
        pr = [x["plain_step_s"] for x in c["repeats"]]
        print(f"engine vs plain PyTorch ({len(c['repeats'])} repeat(s) x {c['steps']} steps per side, batches in "
              f"memory, {c['threads']} threads)")
        print(f"{'  engine step (s)':<44} {c['engine_step_s']:>12.3f} {_fmt_range(min(er), max(er), digits=3):>18}")
        print(f"{'  plain PyTorch step (s)':<44} {c['plain_step_s']:>12.3f} "
              f"{_fmt_range(min(pr), max(pr), digits=3):>18}")
        print(f"{'  ratio engine / plain':<44} {c['ratio']:>12.3f} "
              f"{_fmt_range(*c['ratio_range'], digits=3):>18} {'<= 1.10':>10} "
              f"{'met' if c['ratio_met'] else 'NOT MET':>8}")
        pr2 = [x["paired_ratio"] for x in c["repeats"]]
        print(f"{'  ratio of back-to-back steps (median)':<44} {c['paired_ratio']:>12.3f} "
              f"{_fmt_range(min(pr2), max(pr2), digits=3):>18}")
        print(f"{'  |loss difference|, first 3 steps / all':<44} "
              f"{max(x['max_abs_loss_diff_first3'] for x in c['repeats']):>12.1e} "
              f"{max(x['max_abs_loss_diff'] for x in c['repeats']):>18.1e}   (rounding, amplified by training)")
        if "pretrain" in result:
            share = result["pretrain"]["step_time_s"] / c["engine_step_s"]
            result["loader_fed_vs_in_memory"] = share
            print(f"{'  pretrain step / in-memory engine step':<44} {share:>12.3f}   "
                  f"(loader workers on the same cores; compare only at equal load)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0
