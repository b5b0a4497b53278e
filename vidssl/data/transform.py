"""Stage "sample → row": the per-sample transform (clip plan from metadata, decode, augment).

    in:  a :class:`~vidssl.data.stream.Sample` (metadata, mp4 bytes, label), its dataset number, the epoch
    out: a row {"key", "label", "dataset", window name: (T, C, H, W) uint8 (views: (K·crops, T, C, H, W)),
         "frame_indices": {window: source frame numbers}}

The same code runs in DataLoader workers (``decode_stage: worker``) and, split into
:meth:`SampleProcessor.plan_short` (worker) and :meth:`~SampleProcessor.frames` +
:meth:`~SampleProcessor.finish` (main process), in the main-process decode stage.
"""

from __future__ import annotations

from typing import Any

import torch

from vidssl.data.augment import apply_train_many, eval_views, train_params
from vidssl.data.clips import plan_clip, sample_rng
from vidssl.data.config import DataConfig
from vidssl.data.decode import make_decoder
from vidssl.data.stream import Sample
from vidssl.data.windows import SSL_WINDOWS

__all__ = ["SampleProcessor"]


class SampleProcessor:
    """Turns one :class:`Sample` into a row of tensors. Randomness comes from
    (seed, epoch, dataset, key) only, so a row is the same whichever worker, rank or stage makes it."""

    def __init__(self, cfg: DataConfig, decoder=None) -> None:
        self.cfg = cfg
        self.decoder = decoder if decoder is not None else make_decoder(cfg.backend, cfg.decode_threads, "cpu")

    def plan_short(self, sample: Sample, dataset: int, epoch: int) -> tuple[dict[str, list[int]], bool]:
        """(windows, short): windows {name: source frame numbers}; ``short`` when the video was too
        short and loop/pad changed the indices. Raises ShortVideo under the skip policy."""
        c = self.cfg
        rng = sample_rng(c.seed, epoch, dataset, sample.key, "clip")
        return plan_clip(int(sample.meta["frames"]), mode=c.mode, frames=c.frames, stride=c.stride,
                         future=c.future, gap_min=c.gap_min, gap_max=c.gap_max, views=c.views,
                         short=c.short, rng=rng)

    def frames(self, sample: Sample, windows: dict[str, list[int]]) -> torch.Tensor:
        """Decode every frame the windows need: (N, C, H, W) uint8, rows in window order."""
        idx = [i for w in windows.values() for i in w]
        return self.decoder.decode_tensor(sample.data, idx, sample.meta)  # (N, C, H, W), any strides

    def finish(self, sample: Sample, dataset: int, epoch: int, windows: dict[str, list[int]],
               frames: torch.Tensor) -> dict[str, Any]:
        """Augment decoded frames (N, C, H, W) into the row's windows."""
        return self.finish_many([(sample, dataset, windows, frames)], epoch)[0]

    def finish_many(self, items: list[tuple[Sample, int, dict[str, list[int]], torch.Tensor]],
                    epoch: int) -> list[dict[str, Any]]:
        """:meth:`finish` for several (sample, dataset, windows, frames) at once, on the frames' device:
        every clip's parameters are drawn from its own sample's generator, then all train-augmented
        clips go through one batched :func:`~vidssl.data.augment.apply_train_many` (the main-process
        stage augments a whole batch on the GPU this way; a worker calls it per row)."""
        c = self.cfg
        clips: list[torch.Tensor] = []
        params: list = []

        def train(clip: torch.Tensor, p) -> int:  # queue a train-augmentation job; its result comes later
            clips.append(clip)
            params.append(p)
            return len(clips) - 1

        plans = []
        for sample, dataset, windows, frames in items:
            rng = sample_rng(c.seed, epoch, dataset, sample.key, "augment")
            h, w = frames.shape[-2:]
            row: dict[str, Any] = {"key": sample.key, "label": sample.label, "dataset": dataset}
            fi: dict[str, torch.Tensor] = {}
            if c.mode == "ssl":
                nc, nf = len(windows["context"]), len(windows["future"])
                cf, other = frames[: nc + nf], frames[nc + nf:]
                if c.augment == "train":
                    # One draw for context+future (the future must stay aligned), one for other. Both
                    # windows share the flip: a mirrored window moves the other way, and a positive pair
                    # with opposite motions would teach the model to ignore the direction of motion.
                    p_cf = train_params(h, w, c, rng)
                    p_other = train_params(h, w, c, rng)
                    p_other.flip = p_cf.flip
                    cf, other = train(cf, p_cf), train(other, p_other)
                plans.append((row, nc, [cf, other]))
                for name in SSL_WINDOWS:
                    fi[name] = torch.tensor(windows[name], dtype=torch.int64)
            elif c.mode == "clip":
                video = frames
                if c.augment == "train":
                    video = train(video, train_params(h, w, c, rng))
                elif c.augment == "eval":
                    video = eval_views(video, c.eval_resize, c.crop_size, 1)[0]
                plans.append((row, None, [video]))
                fi["video"] = torch.tensor(windows["video"], dtype=torch.int64)
            else:  # views: K windows (× crops), window-major
                t = c.frames
                out, idx = [], []
                for v in range(c.views):
                    clip = frames[v * t:(v + 1) * t]
                    if c.augment == "train":
                        views = [train(clip, train_params(h, w, c, rng))]
                    elif c.augment == "eval":
                        views = eval_views(clip, c.eval_resize, c.crop_size, c.eval_crops)
                    else:
                        views = [clip]
                    out.extend(views)
                    idx.extend([windows["video"][v * t:(v + 1) * t]] * len(views))
                plans.append((row, None, out))
                fi["video"] = torch.tensor(idx, dtype=torch.int64)  # (K·crops, T)
            row["frame_indices"] = fi
        done = apply_train_many(clips, params, c.crop_size) if clips else []
        rows = []
        for row, nc, parts in plans:
            parts = [done[x] if isinstance(x, int) else x for x in parts]
            if c.mode == "ssl":
                cf, other = parts
                row["context"], row["future"], row["other"] = cf[:nc], cf[nc:], other  # (T|F, C, H, W)
            elif c.mode == "clip":
                row["video"] = parts[0]  # (T, C, H, W)
            else:
                row["video"] = torch.stack(parts)  # (K·crops, T, C, H, W)
            rows.append(row)
        return rows

    def process(self, sample: Sample, dataset: int, epoch: int) -> tuple[dict[str, Any], bool]:
        """(row, short): the finished row, and whether loop/pad stretched its frame indices."""
        windows, short = self.plan_short(sample, dataset, epoch)
        return self.finish(sample, dataset, epoch, windows, self.frames(sample, windows)), short

    def __call__(self, sample: Sample, dataset: int, epoch: int) -> dict[str, Any]:
        """The finished row of ``sample``."""
        return self.process(sample, dataset, epoch)[0]
