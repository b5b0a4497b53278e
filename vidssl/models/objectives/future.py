"""Future-frame prediction (``objectives.future``): from the context window, predict the F future frames.

Three variants, chosen by :class:`~vidssl.models.config.FutureConfig`:

- ``target: pixels`` (:class:`PixelFuture`): a light cross-attention decoder reads the context
  tokens ``(B, T', N, D)`` and predicts every future frame at ``pixel_size x pixel_size``, as
  ``pixel_patch`` patches; targets are the future frames resized, each patch normalised to mean 0
  / std 1 (``norm_pix``); loss MSE. Predicting zeros scores ``chance`` (1.0 with norm_pix, less
  when some patches are flat).
- ``target: latent, loss: infonce`` (:class:`LatentFuture`): dense predictive coding. A predictor
  maps the context features ``(B, T', D)`` to the F' future steps; each prediction must pick the
  true future feature of its own clip and step among those of **every clip and step in the
  global batch** (gathered across ranks with gradient); chance ``log(W*B*F')``.
- ``target: latent, loss: regression`` (:class:`LatentFuture`): MSE to the layer-normed future
  features of a target encoder that gets no gradient: the backbone itself (``stopgrad``) or an
  EMA copy (``ema``, updated by :meth:`LatentFuture.on_after_step`). Predicting the batch mean
  scores ``future/target_var`` (also reported as ``chance``).

Each returns ``{"loss": scalar with grad, <metric>: detached scalar, ...}``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from vidssl.models.base import VideoBackbone
from vidssl.models.distributed import gather_with_grad, get_rank
from vidssl.models.heads import ProjectionMLP
from vidssl.models.objectives.losses import info_nce
from vidssl.models.objectives.views import Views
from vidssl.models.vit import Block, sincos_1d

__all__ = ["LatentPredictor", "LatentFuture", "PixelFuture", "build_future"]


class LatentPredictor(nn.Module):
    """Context features ``(B, T', D)`` → predictions for F' future steps ``(B, F', out_dim)``.

    Positions (frame units, see :meth:`Views.step_positions`) tell it where each context step and
    each requested future step lies, so one predictor serves any T' and F'.
    ``kind="transformer"``: context tokens and F' query tokens (a learned token + position) pass
    through bidirectional blocks; the queries' outputs are the predictions.
    ``kind="gru"``: a GRU cell reads the context steps, then one step per future query.
    """

    def __init__(self, in_dim: int, out_dim: int, *, kind: str = "transformer", dim: int = 256,
                 depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.kind, self.dim = kind, dim
        self.in_proj = nn.Linear(in_dim, dim)
        self.query = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        if kind == "transformer":
            self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        elif kind == "gru":
            self.cell = nn.GRUCell(dim, dim)
        else:
            raise ValueError(f"predictor: got {kind!r}; allowed: 'transformer', 'gru'")
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, out_dim)

    def forward(self, ctx: torch.Tensor, ctx_pos: torch.Tensor, fut_pos: torch.Tensor) -> torch.Tensor:
        b, t, _ = ctx.shape
        f = fut_pos.shape[0]
        x = self.in_proj(ctx) + sincos_1d(ctx_pos, self.dim).to(ctx.dtype)  # (B, T', P)
        q = (self.query + sincos_1d(fut_pos, self.dim).to(ctx.dtype)).expand(b, f, self.dim)  # (B, F', P)
        if self.kind == "transformer":
            z = torch.cat([x, q], dim=1)  # (B, T'+F', P)
            for blk in self.blocks:
                z = blk(z)
            y = z[:, t:]  # (B, F', P)
        else:
            h = x.new_zeros(b, self.dim)
            for i in range(t):
                h = self.cell(x[:, i], h)
            outs = []
            for i in range(f):
                h = self.cell(q[:, i], h)
                outs.append(h)
            y = torch.stack(outs, dim=1)  # (B, F', P)
        return self.out(self.norm(y))


class LatentFuture(nn.Module):
    """Predict the backbone features of the future window (InfoNCE/DPC or regression)."""

    def __init__(self, cfg, backbone: VideoBackbone) -> None:
        super().__init__()
        self.cfg = cfg
        d = backbone.embed_dim
        if cfg.loss == "infonce":
            out = cfg.proj_dim
            self.target_proj = ProjectionMLP(d, max(cfg.proj_dim, cfg.predictor_dim), cfg.proj_dim)
        else:
            out = d
            if cfg.target_encoder == "ema":
                # A frozen copy of the online backbone: in state_dict (resumes with the run), never
                # trained by the optimizer (requires_grad False), moved by on_after_step.
                self.target_encoder = copy.deepcopy(backbone)
                for p in self.target_encoder.parameters():
                    p.requires_grad_(False)
        self.predictor = LatentPredictor(d, out, kind=cfg.predictor, dim=cfg.predictor_dim,
                                         depth=cfg.predictor_depth, heads=cfg.predictor_heads)

    def forward(self, views: Views) -> dict[str, torch.Tensor]:
        ctx = views.features("context")  # (B, T', D)
        if self.cfg.loss == "infonce":
            fut = views.features("future")  # (B, F', D), with gradient (DPC trains both ends)
        else:
            fut = self._target_features(views)  # (B, F', D), no gradient
        b, f = fut.shape[:2]
        pred = self.predictor(ctx, views.step_positions("context", ctx.shape[1]),
                              views.step_positions("future", f))  # (B, F', out)
        if self.cfg.loss == "infonce":
            q = F.normalize(pred.float(), dim=-1).reshape(b * f, -1)  # (B*F', E)
            k = F.normalize(self.target_proj(fut).float(), dim=-1).reshape(b * f, -1)  # (B*F', E)
            keys = gather_with_grad(k)  # (W*B*F', E): every clip and step of the global batch
            if self.cfg.negatives == "batch+other":
                # Hard negatives: the other window of the same videos (same digit/scene, another time).
                o = views.features("other")  # (B, T'o, D)
                ko = F.normalize(self.target_proj(o).float(), dim=-1).reshape(-1, k.shape[-1])
                keys = torch.cat([keys, gather_with_grad(ko)], dim=0)  # positives keep their indices
            elif self.cfg.negatives == "batch+reversed":
                # Hard negatives: the future windows backwards (same frames, opposite motion).
                r = views.reversed_features("future")  # (B, F', D)
                kr = F.normalize(self.target_proj(r).float(), dim=-1).reshape(-1, k.shape[-1])
                keys = torch.cat([keys, gather_with_grad(kr)], dim=0)
            pos = get_rank() * b * f + torch.arange(b * f, device=q.device)
            loss, acc = info_nce(q, keys, pos, self.cfg.temperature)
            return {"loss": loss, "acc": acc,
                    "chance": torch.tensor(float(keys.shape[0]), device=q.device).log()}
        target = F.layer_norm(fut.float(), fut.shape[-1:])  # (B, F', D), per-feature-vector normalised
        loss = F.mse_loss(pred.float(), target)
        # Predicting the batch mean would score this; watch it to catch a collapsing target.
        target_var = target.var(dim=0, unbiased=False).mean().detach()
        return {"loss": loss, "target_var": target_var, "chance": target_var.clone()}

    @torch.no_grad()
    def _target_features(self, views: Views) -> torch.Tensor:
        if self.cfg.target_encoder == "ema":
            x = views.input("future")
            dtype = next(self.target_encoder.parameters()).dtype  # fp32 even when the online model is bf16
            return self.target_encoder.forward_features(x.to(dtype)).to(x.dtype)
        return views.backbone.forward_features(views.input("future")).detach()

    def release_target(self) -> nn.Module | None:
        """Take the EMA target encoder out of this module's tree and return it (None without one).

        It stays in use (``self.target_encoder``) but is no longer a registered submodule, so a
        training engine wrapping the model neither casts it to bf16, nor partitions it, nor hands
        it to the optimizer; whoever released it moves it to the device and checkpoints it.
        """
        enc = self._modules.pop("target_encoder", None)
        if enc is not None:
            self.__dict__["target_encoder"] = enc
        return enc

    @torch.no_grad()
    def on_after_step(self, backbone: VideoBackbone, momentum: float | None = None) -> None:
        """EMA update of the target encoder after each optimizer step: ``t ← m·t + (1−m)·online``.

        ``momentum`` defaults to ``cfg.ema_momentum`` (a training loop passes its schedule's value).
        """
        if self.cfg.loss != "regression" or self.cfg.target_encoder != "ema":
            return
        m = self.cfg.ema_momentum if momentum is None else momentum
        for pt, po in zip(self.target_encoder.parameters(), backbone.parameters()):
            pt.lerp_(po.detach().to(pt.dtype), 1.0 - m)
        for bt, bo in zip(self.target_encoder.buffers(), backbone.buffers()):
            bt.copy_(bo)  # normalisation statistics follow the online network


class PixelFuture(nn.Module):
    """Decode the future frames (reduced size, per-patch normalised) from the context tokens; MSE."""

    def __init__(self, cfg, embed_dim: int, channels: int = 3) -> None:
        super().__init__()
        self.cfg = cfg
        s, p, dd = cfg.pixel_size, cfg.pixel_patch, cfg.decoder_dim
        self.grid = s // p
        self.channels = channels
        # LayerNorm first: backbone features share a large common component (post-ReLU); normalising
        # each token lets the decoder see what differs between clips and places.
        self.mem_proj = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, dd))
        self.query_space = nn.Parameter(torch.zeros(self.grid * self.grid, dd))  # (P, dd) one per patch
        nn.init.trunc_normal_(self.query_space, std=0.02)
        self.blocks = nn.ModuleList(Block(dd, cfg.decoder_heads, cross=True) for _ in range(cfg.decoder_depth))
        self.norm = nn.LayerNorm(dd)
        self.out = nn.Linear(dd, p * p * channels)

    def _pe(self, time_pos: torch.Tensor, space_pos: torch.Tensor) -> torch.Tensor:
        """Half the channels encode time (frames), half the spatial index → ``(L_t, L_s, dd)``."""
        dd = self.cfg.decoder_dim
        ht = dd // 2
        et = sincos_1d(time_pos, ht)  # (L_t, dd/2)
        es = sincos_1d(space_pos, dd - ht)  # (L_s, dd/2)
        return torch.cat([et[:, None].expand(-1, es.shape[0], -1), es[None].expand(et.shape[0], -1, -1)], -1)

    def targets(self, views: Views) -> torch.Tensor:
        """Future frames → ``(B, F, P, p*p*C)`` patches at ``pixel_size``, normalised per patch if ``norm_pix``."""
        x = views.input("future").float()  # (B, C, F, H, W)
        b, c, f = x.shape[:3]
        s, p, g = self.cfg.pixel_size, self.cfg.pixel_patch, self.grid
        x = F.interpolate(x, size=(f, s, s), mode="area")  # (B, C, F, S, S)
        x = x.view(b, c, f, g, p, g, p).permute(0, 2, 3, 5, 4, 6, 1).reshape(b, f, g * g, p * p * c)
        if self.cfg.norm_pix:
            mean = x.mean(dim=-1, keepdim=True)
            var = x.var(dim=-1, keepdim=True, unbiased=False)
            x = (x - mean) / (var + 1e-6).sqrt()
        return x

    def forward(self, views: Views) -> dict[str, torch.Tensor]:
        tok = views.tokens("context")  # (B, T', N, D)
        b, t, n, _ = tok.shape
        dev = tok.device
        mem_pe = self._pe(views.step_positions("context", t), torch.arange(n, device=dev, dtype=torch.float32))
        mem = (self.mem_proj(tok) + mem_pe.to(tok.dtype)).reshape(b, t * n, -1)  # (B, T'*N, dd)
        with torch.no_grad():
            target = self.targets(views)  # (B, F, P, p*p*C)
        f, npatch = target.shape[1:3]
        fut_pos = views.step_positions("future", f)  # one step per future frame
        q_pe = self._pe(fut_pos, torch.zeros(1, device=dev))[:, 0]  # (F, dd): time half (+ constant)
        q = (q_pe[:, None] + self.query_space[None]).reshape(1, f * npatch, -1)  # (1, F*P, dd)
        z = q.to(mem.dtype).expand(b, -1, -1)
        for blk in self.blocks:
            z = blk(z, mem)
        pred = self.out(self.norm(z)).view(b, f, npatch, -1)  # (B, F, P, p*p*C)
        loss = F.mse_loss(pred.float(), target)
        # Predicting zeros scores this: 1.0 with norm_pix, less where patches are flat (they normalise to 0).
        return {"loss": loss, "chance": target.pow(2).mean()}


def build_future(cfg, backbone: VideoBackbone) -> nn.Module:
    """The future-prediction objective for a :class:`~vidssl.models.config.FutureConfig`."""
    if cfg.target == "pixels":
        return PixelFuture(cfg, backbone.embed_dim, backbone.in_channels)
    return LatentFuture(cfg, backbone)
