"""The one place model code touches ``torch.distributed``: rank queries and a gradient-carrying all-gather.

Contrastive objectives need negatives from the whole global batch, not just this rank's share
(DPC-style per-GPU negatives weaken the objective). :func:`gather_with_grad` concatenates a
tensor from every rank along dim 0 *and* sends the gradients back to the rank that produced each
slice.

Gradient convention (checked by ``tests/test_gather.py`` on two gloo processes):

- each rank computes its loss as the **mean over its own rows** (queries), with the gathered
  global batch as keys/negatives: ``L_r = mean_{i in rank r} l_i``;
- backward of the gather **sums** the incoming gradient over ranks (all-reduce SUM) and keeps this
  rank's slice, because rank s's embeddings appear in every rank's loss: ``dS/dz_s = sum_r dL_r/dz_s``;
- the data-parallel engine (DDP / DeepSpeed) **averages** parameter gradients over ranks.

Then the averaged gradient equals the gradient of ``mean_r L_r = mean over all N = W*B rows``,
which is exactly the single-process loss on the concatenated batch. The per-rank loss *values*
differ from the global one; their mean over ranks equals it (log the all-reduced mean if needed).

When torch.distributed is not initialised, or the world size is 1, everything is the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "get_rank", "get_world_size", "gather_with_grad", "all_reduce_mean"]


def is_distributed() -> bool:
    """True when a process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """Number of ranks (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather in forward; all-reduce SUM of the gradient and own slice in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # x (B, ...) → (W*B, ...)
        world = dist.get_world_size()
        ctx.rank, ctx.batch = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # grad (W*B, ...) → (B, ...)
        grad = grad.contiguous().clone()  # all_reduce works in place; never modify autograd's buffer
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.batch:(ctx.rank + 1) * ctx.batch]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x (B, ...)`` from every rank in rank order → ``(W*B, ...)``, keeping gradients.

    Every rank must pass the same shape. This rank's rows sit at ``rank*B : (rank+1)*B``.
    Identity when not distributed. See the module docstring for the loss/gradient convention.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of a (detached) tensor over ranks, for logging; identity when not distributed."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()
