"""tools/slurm/*.sbatch run for real on a SLURM cluster (one node is enough).

Needs `sbatch` on PATH and a controller that answers `sinfo`; otherwise every test is skipped.
On a Debian/Ubuntu machine (root), `tools/slurm/local-cluster.sh start` makes a one-node cluster.
Jobs run with the submitting environment (`--export=ALL`), with this interpreter's bin folder
first on PATH and VIDSSL pointing at its `vidssl`, in a `tmp_path` working directory (`--chdir`).
Each job waits with `sbatch --wait`; a job past its timeout is cancelled by its unique name.
Inputs and outputs live under pytest's tmp_path, so the jobs must run on this machine (one node).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "tools" / "slurm"
BIN = Path(sys.executable).parent
JOB_TIMEOUT = 600  # seconds one `sbatch --wait` may take (the first DeepSpeed start on CPU takes minutes)


def _cluster_problem() -> str | None:
    """Why SLURM jobs cannot run here, or None."""
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH (start a cluster: tools/slurm/local-cluster.sh start)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo does not answer: {exc}"
    if r.returncode != 0:
        return f"sinfo does not answer: {r.stderr.strip()[:200]}"
    states = r.stdout.split()
    if not any(s.startswith(("idle", "mix", "alloc", "completing")) for s in states):
        return f"no usable SLURM node (states: {states or 'none'})"
    return None


_PROBLEM = _cluster_problem()
pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(_PROBLEM is not None, reason=f"no SLURM cluster: {_PROBLEM}"),
    pytest.mark.timeout(JOB_TIMEOUT + 300),
]


def _vidssl() -> str:
    exe = BIN / "vidssl"
    if exe.exists():
        return str(exe)
    found = shutil.which("vidssl")
    if found is None:
        pytest.fail(f"no vidssl executable next to {sys.executable} nor on PATH")
    return found


def job_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["VIDSSL"] = _vidssl()
    env.update(extra)
    return env


def sbatch_wait(script: Path, args: list[str], *, workdir: Path, flags: list[str], env: dict[str, str],
                output: str) -> subprocess.CompletedProcess:
    """Submit SCRIPT ARGS with `sbatch --wait` from WORKDIR; fail with the job's output files on error.

    OUTPUT is the --output pattern, relative to WORKDIR. Returns sbatch's completed process (exit code
    0 when every task of the job, or of the array, exited 0).
    """
    name = f"vidssl-test-{uuid.uuid4().hex[:10]}"
    (workdir / output).parent.mkdir(parents=True, exist_ok=True)  # SLURM opens it before the script runs
    cmd = ["sbatch", "--wait", "--export=ALL", f"--chdir={workdir}", f"--job-name={name}",
           f"--output={workdir / output}", "--time=20", *flags, str(script), *args]
    try:
        r = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", f"--name={name}"], capture_output=True, timeout=30)
        pytest.fail(f"job {name} still running after {JOB_TIMEOUT}s (cancelled): {' '.join(cmd)}\n"
                    + _job_outputs(workdir, output))
    if r.returncode != 0:
        pytest.fail(f"sbatch exited {r.returncode}: {' '.join(cmd)}\nstdout: {r.stdout}\nstderr: {r.stderr}\n"
                    + _job_outputs(workdir, output))
    return r


def _job_outputs(workdir: Path, pattern: str) -> str:
    """The text of every job output file matching an sbatch --output PATTERN (%j, %A, %a → *)."""
    glob = pattern
    for token in ("%j", "%A", "%a", "%x"):
        glob = glob.replace(token, "*")
    parts = [f"--- {p}\n{p.read_text(errors='replace')[-6000:]}" for p in sorted(workdir.glob(glob))]
    return "\n".join(parts) or f"(no job output file matches {workdir / pattern})"


def _tar_keys(outdir: Path, shard_names: list[str]) -> list[str]:
    keys: list[str] = []
    for name in shard_names:
        with tarfile.open(outdir / name) as tar:
            for member in tar:
                key = member.name.partition(".")[0]
                if not keys or keys[-1] != key:
                    keys.append(key)
    return keys


# ---- shard.sbatch --------------------------------------------------------------------------------


def test_shard_array_merges_and_verifies(digits_dir, tmp_path):
    """A 2-task array shards a footage folder; the last task's index.json lists every sample."""
    n_videos = len(list(csv.DictReader((digits_dir / "labels.csv").open())))
    # The #SBATCH header asks for 16 CPUs and 32G: command-line flags override it for a small node.
    sbatch_wait(SLURM_DIR / "shard.sbatch", [str(digits_dir / "labels.csv"), "shards/digits"],
                workdir=tmp_path, output="logs/shard-%A_%a.out",
                flags=["--array=0-1", "--cpus-per-task=1", "--mem=1G"],
                env=job_env(VIDSSL_SHARD_CONFIG=str(REPO / "configs/shard/digits.yaml")))
    outdir = tmp_path / "shards" / "digits"
    logs = _job_outputs(tmp_path, "logs/shard-%A_%a.out")
    assert len(list((tmp_path / "logs").glob("shard-*_*.out"))) == 2, logs
    if not (outdir / "index.json").exists():  # both tasks saw the other unfinished: merge by hand
        subprocess.run([_vidssl(), "shard", "merge", str(outdir)], check=True, timeout=120)
    index = json.loads((outdir / "index.json").read_text())
    names = [s["name"] for s in index["shards"]]
    assert any("-j0000-" in n for n in names) and any("-j0001-" in n for n in names), names
    assert sorted(p.name for p in outdir.glob("*.tar")) == sorted(names)
    keys = _tar_keys(outdir, names)
    assert len(keys) == len(set(keys)) == n_videos == index["totals"]["samples"], (keys, index["totals"], logs)
    assert sum(s["samples"] for s in index["shards"]) == n_videos
    assert index["totals"]["rejected"] == 0, (outdir / "errors.jsonl").read_text()
    v = subprocess.run([_vidssl(), "shard", "verify", str(outdir)], capture_output=True, text=True, timeout=300)
    assert v.returncode == 0, v.stdout + v.stderr
    assert v.stdout.strip().startswith("OK"), v.stdout


# ---- pretrain.sbatch -------------------------------------------------------------------------------

# No GPU here: --gpus-per-node=0 overrides the script's --gpus-per-node=8 (--gres=none does not).
CPU_FLAGS = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]

STUB = """#!/bin/bash
# Stands in for vidssl: records what one srun task was given.
{
  echo "args=$*"
  for v in SLURM_PROCID SLURM_NTASKS SLURM_LOCALID SLURM_JOB_ID MASTER_ADDR MASTER_PORT RANK WORLD_SIZE LOCAL_RANK; do
    echo "$v=${!v-<unset>}"
  done
} > "task-$SLURM_PROCID.env"
"""


@pytest.mark.parametrize("master_port", [None, "12345"])
def test_pretrain_sbatch_task_environment(tmp_path, master_port):
    """One srun task per process, each with its own SLURM_PROCID; one MASTER_ADDR:MASTER_PORT for all;
    no RANK/WORLD_SIZE leaking in from the submitting shell; the arguments passed through unchanged."""
    stub = tmp_path / "stub-vidssl"
    stub.write_text(STUB)
    stub.chmod(0o755)
    extra = {"VIDSSL": str(stub), "RANK": "7", "WORLD_SIZE": "9", "LOCAL_RANK": "3"}
    if master_port:
        extra["MASTER_PORT"] = master_port
    env = job_env(**extra)
    if not master_port:
        env.pop("MASTER_PORT", None)
    env.pop("MASTER_ADDR", None)
    sbatch_wait(SLURM_DIR / "pretrain.sbatch", ["cfg.yaml", "run.dir=runs/x", "note=a b"], workdir=tmp_path,
                output="pretrain-%j.out", flags=CPU_FLAGS, env=env)
    log = _job_outputs(tmp_path, "pretrain-%j.out")
    tasks = []
    for p in sorted(tmp_path.glob("task-*.env")):
        tasks.append(dict(line.split("=", 1) for line in p.read_text().splitlines()))
    assert len(tasks) == 2, log
    assert sorted(t["SLURM_PROCID"] for t in tasks) == ["0", "1"]
    assert sorted(t["SLURM_LOCALID"] for t in tasks) == ["0", "1"]
    assert {t["SLURM_NTASKS"] for t in tasks} == {"2"}
    first_host = subprocess.run(["scontrol", "show", "hostnames", _nodelist(tasks[0]["SLURM_JOB_ID"])],
                                capture_output=True, text=True, timeout=30).stdout.split()[0]
    assert {t["MASTER_ADDR"] for t in tasks} == {first_host}
    want_port = master_port or str(10000 + int(tasks[0]["SLURM_JOB_ID"]) % 50000)
    assert {t["MASTER_PORT"] for t in tasks} == {want_port}
    for t in tasks:
        assert t["RANK"] == t["WORLD_SIZE"] == t["LOCAL_RANK"] == "<unset>", t
        assert t["args"] == "pretrain cfg.yaml run.dir=runs/x note=a b"
    assert f"rendezvous {first_host}:{want_port}" in log


def _nodelist(job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    for word in out.split():
        if word.startswith("NodeList="):
            return word.split("=", 1)[1]
    # Finished jobs leave the controller after MinJobAge; the test cluster keeps them for 300 s.
    pytest.fail(f"job {job_id}: no NodeList in scontrol output: {out[:500]}")


def test_pretrain_two_ranks(digits_dir, tmp_path):
    """`vidssl pretrain` under srun: 2 CPU ranks, 2 steps, metrics.jsonl written with increasing steps."""
    pytest.importorskip("vidssl.train")
    shards = tmp_path / "shards" / "digits"
    shards.parent.mkdir()
    subprocess.run([_vidssl(), "-q", "shard", str(digits_dir / "labels.csv"), "-o", str(shards),
                    str(REPO / "configs/shard/digits.yaml"), "workers=1", "progress=none"],
                   check=True, timeout=300)
    config = tmp_path / "pretrain.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "data": {"dataset": str(shards), "batch_size": 4, "workers": 0},
        "train": {"warmup_steps": 0, "checkpoint_every": 0, "log_every": 1, "device": "cpu", "plot": False},
    }, indent=1))
    run_dir = tmp_path / "run"
    sbatch_wait(SLURM_DIR / "pretrain.sbatch", [str(config), f"run.dir={run_dir}", "train.max_steps=2"],
                workdir=tmp_path, output="logs/pretrain-%j.out", flags=CPU_FLAGS,
                env=job_env())
    log = _job_outputs(tmp_path, "logs/pretrain-%j.out")
    metrics = run_dir / "metrics.jsonl"
    assert metrics.exists(), log
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in rows]
    assert len(rows) == 2, (rows, log)
    assert steps == sorted(steps) and len(set(steps)) == 2, (steps, log)
