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

from vidssl.data.augment import apply_train, eval_views, train_params
from vidssl.data.clips import plan_clip, sample_rng
from vidssl.data.config import DataConfig
from vidssl.data.decode import make_decoder
from vidssl.data.stream import Sample

__all__ = ["SampleProcessor"]


class SampleProcessor:
    """Turns one :class:`Sample` into a row of tensors. Randomness comes from
    (seed, epoch, dataset, key) only, so a row is the same whichever worker, rank or stage makes it."""

    def __init__(self, cfg: DataConfig, decoder=None) -> None:
        self.cfg = cfg
        self.decoder = decoder if decoder is not None else make_decoder(cfg.backend, cfg.decode_threads)

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
        arr = self.decoder.decode(sample.data, idx, sample.meta)  # (N, H, W, 3), any strides
        # PyAV's frames are (N, 3, H, W) in memory (see decode._FrameSink): the permute makes them a
        # contiguous (N, C, H, W) tensor with no copy; decord's are HWC: a strided view until collated.
        return torch.from_numpy(arr).permute(0, 3, 1, 2)

    def finish(self, sample: Sample, dataset: int, epoch: int, windows: dict[str, list[int]],
               frames: torch.Tensor) -> dict[str, Any]:
        """Augment decoded frames (N, C, H, W) into the row's windows."""
        c = self.cfg
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
                cf = apply_train(cf, p_cf, c.crop_size)
                other = apply_train(other, p_other, c.crop_size)
            row["context"], row["future"], row["other"] = cf[:nc], cf[nc:], other  # (T|F, C, H, W)
            for name in ("context", "future", "other"):
                fi[name] = torch.tensor(windows[name], dtype=torch.int64)
        elif c.mode == "clip":
            video = frames
            if c.augment == "train":
                video = apply_train(video, train_params(h, w, c, rng), c.crop_size)
            elif c.augment == "eval":
                video = eval_views(video, c.eval_resize, c.crop_size, 1)[0]
            row["video"] = video  # (T, C, H, W)
            fi["video"] = torch.tensor(windows["video"], dtype=torch.int64)
        else:  # views: K windows (× crops), window-major
            t = c.frames
            clips = [frames[v * t:(v + 1) * t] for v in range(c.views)]
            out, idx = [], []
            for v, clip in enumerate(clips):
                if c.augment == "train":
                    views = [apply_train(clip, train_params(h, w, c, rng), c.crop_size)]
                elif c.augment == "eval":
                    views = eval_views(clip, c.eval_resize, c.crop_size, c.eval_crops)
                else:
                    views = [clip]
                out.extend(views)
                idx.extend([windows["video"][v * t:(v + 1) * t]] * len(views))
            row["video"] = torch.stack(out)  # (K·crops, T, C, H, W)
            fi["video"] = torch.tensor(idx, dtype=torch.int64)  # (K·crops, T)
        row["frame_indices"] = fi
        return row

    def process(self, sample: Sample, dataset: int, epoch: int) -> tuple[dict[str, Any], bool]:
        """(row, short): the finished row, and whether loop/pad stretched its frame indices."""
        windows, short = self.plan_short(sample, dataset, epoch)
        return self.finish(sample, dataset, epoch, windows, self.frames(sample, windows)), short

    def __call__(self, sample: Sample, dataset: int, epoch: int) -> dict[str, Any]:
        """The finished row of ``sample``."""
        return self.process(sample, dataset, epoch)[0]
