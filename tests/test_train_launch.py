"""vidssl pretrain under real launchers, 2 CPU ranks with gloo: torchrun, the deepspeed launcher, torchrun
as two nodes (two agents meeting at a c10d rendezvous on 127.0.0.1); a rank that raises ends the job."""

from __future__ import annotations

import json
import os
import shutil
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


# ---- resume on another world size (train.elastic_resume) ---------------------------------------

@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def two_ranks(request, ssl_shards, tmp_path_factory) -> tuple[int, Path]:
    """(stage, run): a ZeRO-2/3 run of 2 ranks, checkpointed at step 2 (2 of the epoch's 3 batches per rank)."""
    run = tmp_path_factory.mktemp("elastic") / "run"
    _run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(_port()), "-m", "vidssl",
          "pretrain", *tiny(ssl_shards, run, "train.max_steps=2", "train.checkpoint_every=2",
                            f"deepspeed.zero_stage={request.param}")])
    return request.param, run


def _client_state(ckpt: Path) -> dict:
    import torch

    # ZeRO-3 names rank 0's file zero_pp_rank_0_mp_rank_00_model_states.pt
    path = next(p for p in (ckpt / "mp_rank_00_model_states.pt", ckpt / "zero_pp_rank_0_mp_rank_00_model_states.pt")
                if p.is_file())
    return torch.load(path, map_location="cpu", weights_only=False)["vidssl"]


def test_resume_on_another_world_size_is_refused_unless_elastic(two_ranks, ssl_shards, tmp_path, capsys):
    from test_train import pretrain

    stage, src = two_ranks
    run = tmp_path / "run"
    shutil.copytree(src, run)
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert pretrain(tiny(ssl_shards, run, "train.max_steps=4", f"deepspeed.zero_stage={stage}")) == 2
    err = capsys.readouterr().err
    assert "written by 2 ranks and this run has 1" in err and "train.elastic_resume=true" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing touched
    # With the switch, --dry-run says what the resume will do.
    assert pretrain(["--dry-run", *tiny(ssl_shards, run, "train.max_steps=4", f"deepspeed.zero_stage={stage}",
                                        "train.elastic_resume=true")]) == 0
    assert "(elastic: written by 2 ranks, re-partitioned for 1)" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


def test_elastic_resume_repartitions_zero_states_from_two_ranks_to_one(two_ranks, ssl_shards, tmp_path):
    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from test_train import pretrain
    from vidssl.train.checkpoint import to_universal
    from vidssl.train.cli import run_pretrain
    from vidssl.train.config import PretrainConfig
    from vidssl.train.runner import parse_run_config

    stage, src = two_ranks
    zero = f"deepspeed.zero_stage={stage}"
    run = tmp_path / "run"
    shutil.copytree(src, run)
    ckpt = run / "checkpoints" / "step_00000002"
    # Reference: the 2-rank checkpoint's per-parameter fp32 weights and Adam moments, whole.
    ref = to_universal(ckpt, tmp_path / "ref" / ckpt.name) / "zero"

    # Resume at the checkpoint's own step: nothing to train, the engine is as loaded.
    cfg = parse_run_config(PretrainConfig, tiny(ssl_shards, run, "train.max_steps=2", zero,
                                                "train.elastic_resume=true"))
    summary = run_pretrain(cfg)
    assert summary["step"] == 2 and summary["world_size"] == 1
    moved = 0
    for name, p in summary["engine"].ds.module.named_parameters():
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            want = torch.load(ref / name / f"{key}.pt", weights_only=False)
            want = want["param"] if isinstance(want, dict) else want  # ZeRO-3's conversion stores the tensor
            got = safe_get_full_fp32_param(p) if key == "fp32" else safe_get_full_optimizer_state(p, key)
            assert torch.equal(got, want.view_as(got)), (name, key)
            moved += key == "exp_avg" and bool(got.abs().sum() > 0)
        if stage < 3:  # fp32: the module holds the masters (ZeRO-3 partitions the module's weights too)
            assert torch.equal(p.detach(), safe_get_full_fp32_param(p)), name
    assert moved > 10  # the moments were really restored, not zeros on both sides
    assert not (run / "checkpoints" / ".universal").exists()  # the conversion is removed after the load

    # Continue for 2 steps on 1 rank: 2 of 3 batches at world size 2 is 4 of 6 at world size 1.
    assert pretrain(tiny(ssl_shards, run, "train.max_steps=4", zero, "train.elastic_resume=true")) == 0
    r = rows(run)
    assert [x["step"] for x in r] == [1, 2, 3, 4] and all(x["loss"] == x["loss"] for x in r)
    last = run / "checkpoints" / "step_00000004"
    assert json.loads((last / "vidssl.json").read_text())["world_size"] == 1
    loader = _client_state(last)["loader"]
    assert (loader["world_size"], loader["epoch"], loader["batches"]) == (1, 0, 6)


@pytest.mark.parametrize("stage", [0, 2])
def test_elastic_resume_from_one_rank_to_two(stage, ssl_shards, tmp_path):
    """ZeRO-0 in fp32 loads its whole optimizer state at any world size; ZeRO-2 goes through the
    universal conversion. 2 of 6 batches at 1 rank are 1 of 3 at 2 ranks."""
    from test_train import pretrain

    run = tmp_path / "run"
    zero = f"deepspeed.zero_stage={stage}"
    # ZeRO-0 also keeps the global batch (4 x 2 micro-batches x 1 rank = 4 x 1 x 2 ranks).
    accum = 2 if stage == 0 else 1
    assert pretrain(tiny(ssl_shards, run, "train.max_steps=2", zero, f"train.grad_accum={accum}")) == 0
    _run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(_port()), "-m", "vidssl",
          "pretrain", *tiny(ssl_shards, run, "train.max_steps=4", zero, "train.elastic_resume=true")])
    r = rows(run)
    assert [x["step"] for x in r] == [1, 2, 3, 4] and all(x["loss"] == x["loss"] for x in r)
    last = run / "checkpoints" / "step_00000004"
    assert json.loads((last / "vidssl.json").read_text())["world_size"] == 2
    state = _client_state(last)
    # ZeRO-2: 2 of 6 micro-batches at 1 rank -> 1 of 3 at 2 ranks, + 2 steps = 3 of 3.
    # ZeRO-0: 4 of 6 -> 2 of 3, + 2 steps: the end of epoch 0, then batch 1 of epoch 1.
    want = (2, 1, 1) if stage == 0 else (2, 0, 3)
    assert (state["loader"]["world_size"], state["loader"]["epoch"], state["loader"]["batches"]) == want
    assert len(state["rng"]) == 2
    assert not (run / "checkpoints" / ".universal").exists()


def test_elastic_resume_of_a_damaged_checkpoint_fails_clearly(two_ranks, ssl_shards, tmp_path, capsys):
    from test_train import pretrain

    stage, src = two_ranks
    run = tmp_path / "run"
    shutil.copytree(src, run)
    part = run / "checkpoints" / "step_00000002" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    assert pretrain(tiny(ssl_shards, run, "train.max_steps=4", f"deepspeed.zero_stage={stage}",
                         "train.elastic_resume=true")) == 2
    err = capsys.readouterr().err
    assert "converting" in err and "to a universal checkpoint for another world size failed" in err
    assert not list((run / "checkpoints" / ".universal").glob("*"))  # no half-written conversion left
    assert [x["step"] for x in rows(run)] == [1, 2]  # nothing trained, nothing logged
