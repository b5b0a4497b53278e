"""The gradient-carrying all-gather: 2 gloo processes == 1 process on the concatenated batch."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn.functional as F

from vidssl.models.distributed import gather_with_grad, get_rank, get_world_size
from vidssl.models.objectives import contrastive_loss
from vidssl.models.objectives.losses import info_nce

WORLD, B, DIN, E, STEPS = 2, 3, 10, 6, 2


def _setup(seed=0):
    """Same encoder and data on every process: (encoder, context inputs (W*B, DIN), other inputs, future)."""
    torch.manual_seed(seed)
    enc = torch.nn.Sequential(torch.nn.Linear(DIN, 16), torch.nn.Tanh(), torch.nn.Linear(16, E))
    g = torch.Generator().manual_seed(seed + 1)
    xa = torch.randn(WORLD * B, DIN, generator=g)
    xb = xa + 0.3 * torch.randn(WORLD * B, DIN, generator=g)
    xf = torch.randn(WORLD * B, 2, DIN, generator=g)  # 2 "future steps" per clip (dense InfoNCE)
    return enc, xa, xb, xf


def _loss(enc, xa, xb, xf):
    """Contrast (symmetric) + a DPC-style dense InfoNCE whose keys are every clip and step of the global batch."""
    loss_c, _, _ = contrastive_loss(enc(xa), enc(xb), temperature=0.2, symmetric=True)
    q = F.normalize(enc(xa), dim=-1)[:, None].expand(-1, 2, -1).reshape(-1, E)  # (B*2, E)
    k = F.normalize(enc(xf), dim=-1).reshape(-1, E)  # (B*2, E)
    keys = gather_with_grad(k)  # (W*B*2, E)
    pos = get_rank() * k.shape[0] + torch.arange(k.shape[0])
    loss_f, _ = info_nce(q, keys, pos, 0.5)
    return loss_c + loss_f


def _worker(rank, port, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        enc, xa, xb, xf = _setup()
        opt = torch.optim.SGD(enc.parameters(), lr=0.5)
        sl = slice(rank * B, (rank + 1) * B)  # this rank's share of the global batch
        losses, grads = [], []
        for _ in range(STEPS):  # two steps: the second starts from parameters updated with averaged grads
            opt.zero_grad()
            loss = _loss(enc, xa[sl], xb[sl], xf[sl])
            loss.backward()
            for p in enc.parameters():  # what DDP / DeepSpeed do: average gradients over ranks
                dist.all_reduce(p.grad)
                p.grad /= WORLD
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            losses.append((mean_loss / WORLD).item())
            grads.append([p.grad.clone() for p in enc.parameters()])
            opt.step()
        torch.save({"losses": losses, "grads": grads, "world": get_world_size(), "rank": get_rank()},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gather_is_identity_without_process_group():
    x = torch.randn(4, 3, requires_grad=True)
    assert gather_with_grad(x) is x
    assert get_rank() == 0 and get_world_size() == 1


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_two_gloo_ranks_match_one_process_on_concatenated_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)

    # Reference: one process, the whole batch, same loss definition (mean over all rows).
    enc, xa, xb, xf = _setup()
    opt = torch.optim.SGD(enc.parameters(), lr=0.5)
    ref_losses, ref_grads = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = _loss(enc, xa, xb, xf)
        loss.backward()
        ref_losses.append(loss.item())
        ref_grads.append([p.grad.clone() for p in enc.parameters()])
        opt.step()

    for rank in range(WORLD):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        assert res["world"] == WORLD and res["rank"] == rank
        assert res["losses"] == pytest.approx(ref_losses, rel=1e-5)
        for step in range(STEPS):
            for g, r in zip(res["grads"][step], ref_grads[step]):
                assert torch.allclose(g, r, rtol=1e-4, atol=1e-6), (rank, step, (g - r).abs().max())
    assert all(g.abs().sum() > 0 for g in ref_grads[0])  # the comparison is over non-trivial gradients
