"""vidssl pretrain under real launchers, 2 CPU ranks with gloo: torchrun, the deepspeed launcher, torchrun
as two nodes (two agents meeting at a c10d rendezvous on 127.0.0.1); a rank that raises ends the job."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from test_train import rows, tiny

BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# 27 samples over 2 ranks x batch 4: 3 batches per rank and epoch, so 4 steps cross an epoch.
STEPS = ["train.max_steps=4", "train.checkpoint_every=2"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _run(cmd: list[str], env=None, timeout: float = 600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or _env())
    assert res.returncode == 0, f"{' '.join(cmd[:6])} ... exit {res.returncode}\n{res.stderr[-4000:]}"
    return res


@pytest.fixture(scope="module")
def torchrun_losses(ssl_shards, tmp_path_factory) -> list[float]:
    run = tmp_path_factory.mktemp("torchrun") / "run"
    _run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(_port()), "-m", "vidssl",
          "pretrain", *tiny(ssl_shards, run, *STEPS)])
    r = rows(run)
    assert [x["step"] for x in r] == [1, 2, 3, 4]
    assert r[-1]["epoch"] >= 1  # crossed into the second epoch
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    return [x["loss"] for x in r]


def test_torchrun_two_processes(torchrun_losses):
    assert len(torchrun_losses) == 4 and all(x == x for x in torchrun_losses)


def test_deepspeed_launcher_two_processes_gives_the_same_losses(ssl_shards, tmp_path, torchrun_losses):
    run = tmp_path / "run"
    # The launcher appends --local_rank=N before the verb (python -m vidssl --local_rank=0 pretrain ...).
    _run([str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(_port()), "--module", "vidssl",
          "pretrain", *tiny(ssl_shards, run, *STEPS)])
    assert [x["loss"] for x in rows(run)] == pytest.approx(torchrun_losses, rel=1e-6)


def test_torchrun_two_nodes_with_c10d_rendezvous_gives_the_same_losses(ssl_shards, tmp_path, torchrun_losses):
    run = tmp_path / "run"
    port = _port()
    cmd = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"vidssl-test-{port}", "-m", "vidssl", "pretrain",
           *tiny(ssl_shards, run, *STEPS)]
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
              for _ in range(2)]
    outs = [a.communicate(timeout=600) for a in agents]
    for a, (_o, err) in zip(agents, outs):
        assert a.returncode == 0, err[-4000:]
    assert [x["loss"] for x in rows(run)] == pytest.approx(torchrun_losses, rel=1e-6)


FAIL_PLUGIN = """
import os
from vidssl.models.cnn3d import SmallCNN3d
from vidssl.models.registry import register_backbone


class FailingCNN(SmallCNN3d):
    calls = 0

    def forward_tokens(self, x):
        FailingCNN.calls += 1
        if os.environ.get("RANK") == "1" and FailingCNN.calls > 4:  # rank 1, during step 2
            raise RuntimeError("injected failure on rank 1")
        return super().forward_tokens(x)


@register_backbone("test_failing")
def build(*, width: int = 8):
    return FailingCNN(width=width)
"""


def test_a_rank_that_raises_ends_the_whole_job_non_zero_in_bounded_time(ssl_shards, tmp_path):
    (tmp_path / "plug").mkdir()
    (tmp_path / "plug" / "failing_backbone.py").write_text(textwrap.dedent(FAIL_PLUGIN))
    env = _env(PYTHONPATH=f"{tmp_path / 'plug'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    args = [a for a in tiny(ssl_shards, tmp_path / "run", "train.max_steps=50", "train.timeout_minutes=1")
            if not a.startswith("model.backbone_kwargs")]
    t = time.monotonic()
    res = subprocess.run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(_port()), "-m",
                          "vidssl", "pretrain", *args, "run.imports=[failing_backbone]", "model.backbone=test_failing"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode != 0
    assert "injected failure on rank 1" in res.stderr
    assert time.monotonic() - t < 240
    r = rows(tmp_path / "run")
    assert len(r) < 50
