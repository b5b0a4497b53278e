"""Video ViT with tubelet embedding (``vit_tiny``, ``vit_small``, ``vit_base``).

A clip ``(B, C, T, H, W)`` is cut into tubelets of ``tubelet x patch x patch`` (2 x 16 x 16) by a
strided Conv3d, giving a grid of ``T/2 x H/16 x W/16`` tokens. Space-time positions are either
fixed sin-cos (recomputed for each grid size) or learnable (a table for the ``num_frames x
img_size`` grid, trilinearly resized for other clip sizes). Attention goes through
:func:`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU).
No class token: features are token means, so every parameter takes part in every output.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vidssl.models.base import InputShapeError, VideoBackbone
from vidssl.models.registry import OptionError, register_backbone

__all__ = ["VideoViT", "Attention", "Block", "sincos_1d", "sincos_3d"]


def sincos_1d(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Fixed sin-cos embedding of (possibly fractional) positions ``(L,)`` → ``(L, dim)``; ``dim`` even."""
    half = dim // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=positions.device) / half)
    ang = positions.float()[:, None] * freq[None, :]  # (L, dim/2)
    out = torch.cat([ang.sin(), ang.cos()], dim=1)
    if out.shape[1] < dim:  # odd dim: pad one zero column
        out = F.pad(out, (0, dim - out.shape[1]))
    return out


def sincos_3d(t: int, h: int, w: int, dim: int, device=None) -> torch.Tensor:
    """Space-time sin-cos table for a ``t x h x w`` token grid → ``(t*h*w, dim)`` (t slowest, w fastest).

    The channels are split between time (1/4), height and width (3/8 each, rounded to even).
    """
    dt = 2 * (dim // 8)
    dh = 2 * ((dim - dt) // 4)
    dw = dim - dt - dh
    et = sincos_1d(torch.arange(t, device=device), dt)  # (t, dt)
    eh = sincos_1d(torch.arange(h, device=device), dh)  # (h, dh)
    ew = sincos_1d(torch.arange(w, device=device), dw)  # (w, dw)
    grid = torch.cat([
        et[:, None, None, :].expand(t, h, w, dt),
        eh[None, :, None, :].expand(t, h, w, dh),
        ew[None, None, :, :].expand(t, h, w, dw),
    ], dim=-1)
    return grid.reshape(t * h * w, dim)


class Attention(nn.Module):
    """Multi-head attention through SDPA. Self-attention when ``context`` is None, else cross-attention."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise OptionError("heads", f"embedding width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        b, n, d = x.shape
        ctx = x if context is None else context
        m = ctx.shape[1]
        h = self.heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)  # (B, h, N, d/h)
        k, v = self.kv(ctx).view(b, m, 2, h, d // h).permute(2, 0, 3, 1, 4)  # 2 x (B, h, M, d/h)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, d/h)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float = 4.0) -> None:
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class Block(nn.Module):
    """Pre-norm transformer block; with ``cross=True`` it also attends to a ``context`` sequence."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, cross: bool = False,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.cross = cross
        if cross:
            self.norm_x = nn.LayerNorm(dim)
            self.xattn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)
        self.drop_path = drop_path

    def _dp(self, y: torch.Tensor) -> torch.Tensor:
        # Stochastic depth: drop the residual branch per sample while training (rescaled to keep the mean).
        if not self.training or self.drop_path == 0.0:
            return y
        keep = 1.0 - self.drop_path
        mask = y.new_empty(y.shape[0], *([1] * (y.dim() - 1))).bernoulli_(keep)
        return y * mask / keep

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self._dp(self.attn(self.norm1(x)))
        if self.cross:
            x = x + self._dp(self.xattn(self.norm_x(x), context))
        return x + self._dp(self.mlp(self.norm2(x)))


class VideoViT(VideoBackbone):
    """Video ViT: tubelet embedding, space-time positions, ``depth`` blocks, final LayerNorm; D = ``dim``.

    Args:
        dim, depth, heads: transformer size.
        patch, tubelet: tubelet size ``tubelet x patch x patch``; inputs need T % tubelet == 0 and
            H, W % patch == 0.
        pos_embed: ``"sincos"`` (fixed, computed for each grid) or ``"learnable"`` (a table for the
            ``num_frames x img_size x img_size`` grid, resized trilinearly for other sizes).
        num_frames, img_size: the reference clip size of the learnable table.
        drop_path: stochastic depth rate of the last block (linearly increasing from 0).
    """

    def __init__(self, *, dim: int, depth: int, heads: int, patch: int = 16, tubelet: int = 2,
                 pos_embed: str = "learnable", num_frames: int = 16, img_size: int = 224,
                 drop_path: float = 0.0, in_channels: int = 3) -> None:
        super().__init__()
        if pos_embed not in ("learnable", "sincos"):
            raise OptionError("pos_embed", f"got {pos_embed!r}; allowed: 'learnable', 'sincos'")
        for name, v in (("patch", patch), ("tubelet", tubelet), ("num_frames", num_frames),
                        ("img_size", img_size), ("depth", depth), ("dim", dim), ("heads", heads)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise OptionError(name, f"got {v!r}; expected an integer >= 1")
        if num_frames % tubelet or img_size % patch:
            raise OptionError("num_frames", f"reference clip {num_frames}x{img_size}x{img_size} is not divisible "
                              f"into tubelets of {tubelet}x{patch}x{patch}")
        if not 0.0 <= float(drop_path) < 1.0:
            raise OptionError("drop_path", f"got {drop_path!r}; allowed: 0 <= drop_path < 1")
        self.embed_dim = dim
        self.in_channels = in_channels
        self.patch, self.tubelet = patch, tubelet
        self.pos_kind = pos_embed
        self.patch_embed = nn.Conv3d(in_channels, dim, kernel_size=(tubelet, patch, patch),
                                     stride=(tubelet, patch, patch))
        self.ref_grid = (num_frames // tubelet, img_size // patch, img_size // patch)
        if pos_embed == "learnable":
            t, h, w = self.ref_grid
            # Initialised from the sin-cos table (a good start that already generalises across sizes).
            init = sincos_3d(t, h, w, dim).reshape(t, h, w, dim)
            self.pos = nn.Parameter(init.clone() * 0.02 / init.std())
        dps = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(dim, heads, drop_path=dps[i]) for i in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.checkpoint_blocks = False
        self.apply(self._init)

    supports_activation_checkpointing = True

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Keep only each block's input in the forward pass and recompute the block in the backward
        pass (``torch.utils.checkpoint``, non-reentrant; stochastic depth draws the same masks again).
        Only while gradients are recorded: inference and EMA targets run as before."""
        self.checkpoint_blocks = bool(enabled)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def pos_embed(self, t: int, h: int, w: int, device, dtype) -> torch.Tensor:
        """Positions for a ``t x h x w`` token grid → ``(t*h*w, D)``."""
        if self.pos_kind == "sincos":
            return sincos_3d(t, h, w, self.embed_dim, device=device).to(dtype)
        pos = self.pos  # (t0, h0, w0, D)
        if (t, h, w) != tuple(pos.shape[:3]):
            # (1, D, t0, h0, w0) → (1, D, t, h, w): the table stretched over the new grid.
            pos = F.interpolate(pos.permute(3, 0, 1, 2)[None], size=(t, h, w), mode="trilinear",
                                align_corners=False)[0].permute(1, 2, 3, 0)
        return pos.reshape(t * h * w, self.embed_dim).to(dtype)

    def grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Token grid ``(T', H', W')`` for a clip size; raises InputShapeError when it does not divide."""
        if frames % self.tubelet or height % self.patch or width % self.patch:
            raise InputShapeError(
                f"{type(self).__name__}: clip of {frames} frames at {height}x{width} does not divide into "
                f"tubelets of {self.tubelet}x{self.patch}x{self.patch}: frames must be a multiple of "
                f"{self.tubelet} and height, width multiples of {self.patch}")
        return frames // self.tubelet, height // self.patch, width // self.patch

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        b, _, T, H, W = x.shape
        t, h, w = self.grid(T, H, W)
        z = self.patch_embed(x)  # (B, D, t, h, w)
        z = z.flatten(2).transpose(1, 2)  # (B, t*h*w, D), t slowest
        z = z + self.pos_embed(t, h, w, z.device, z.dtype)[None]
        recompute = self.checkpoint_blocks and torch.is_grad_enabled() and z.requires_grad
        for blk in self.blocks:
            z = checkpoint(blk, z, use_reentrant=False) if recompute else blk(z)
        z = self.norm(z)
        return z.view(b, t, h * w, self.embed_dim)  # (B, T', N, D)

    def out_steps(self, frames: int) -> int:
        return frames // self.tubelet


_SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


def _make(name: str):
    dim, depth, heads = _SIZES[name]

    def build(*, pos_embed: str = "learnable", num_frames: int = 16, img_size: int = 224,
              drop_path: float = 0.0, depth: int = depth, patch: int = 16, tubelet: int = 2) -> VideoViT:
        return VideoViT(dim=dim, depth=depth, heads=heads, patch=patch, tubelet=tubelet, pos_embed=pos_embed,
                        num_frames=num_frames, img_size=img_size, drop_path=drop_path)

    build.__doc__ = f"{name}: width {dim}, {depth} blocks, {heads} heads, patch 16, tubelet 2."
    return build


for _name in _SIZES:
    register_backbone(_name)(_make(_name))
