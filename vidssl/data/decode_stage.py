"""Stage "raw rows → batch" in the main process (``decode_stage: main``).

    in:   a :class:`~vidssl.data.records.WorkerBatch` whose ``raw`` rows hold compressed bytes and
          frame plans (workers never decode, so CUDA never enters a forked worker)
    out:  (the batch dict the trainer gets, the :class:`~vidssl.data.records.SampleError` of each row
          that failed here)

Rows failing here are substituted like rows failing in a worker (a copy of a good row, valid=False).
"""

from __future__ import annotations

from typing import Any

from vidssl.data.collate import collate
from vidssl.data.config import DataConfig
from vidssl.data.cuda import nvdec_problem
from vidssl.data.decode import DecodeError, make_decoder
from vidssl.data.guards import ThreadGuard
from vidssl.data.records import RawRow, SampleError, WorkerBatch
from vidssl.data.transform import SampleProcessor
from vidssl.errors import RuntimeFailure

__all__ = ["DecodeStage"]


class DecodeStage:
    """Decodes raw batches (bytes + frame plans sent by workers) in the main process, on ``device``,
    and augments the whole batch there at once.

    ``device="cuda"``: torchcodec decodes on NVDEC and the frames never leave the GPU; the batched
    augmentation (:meth:`SampleProcessor.finish_many`) runs on the GPU too. The loader checks
    beforehand that this can work (:mod:`vidssl.data.cuda`). ``device="cpu"``: the same code with
    the CPU decoder the backend names.
    """

    def __init__(self, cfg: DataConfig, epoch: int, device: str = "cpu", backend: str | None = None) -> None:
        self.cfg, self.epoch, self.device = cfg, epoch, device
        self.proc = SampleProcessor(cfg, make_decoder(backend or cfg.backend, cfg.decode_threads, device))
        self.guard = ThreadGuard(cfg.decode_timeout)
        self.capability = None
        if device == "cuda":
            import torch  # noqa: PLC0415

            self.capability = torch.cuda.get_device_capability()
        self.last_good = None

    def _decode(self, raw: RawRow):
        """The row's frames (N, C, H, W) on the device; raises for a stream the device cannot decode."""
        if self.capability is not None:
            bad = nvdec_problem(raw.sample.meta.get("codec"), raw.sample.meta.get("pix_fmt"), self.capability)
            if bad:
                raise DecodeError(bad)
        return self.guard(lambda: self.proc.frames(raw.sample, raw.windows), raw.sample.key)

    def __call__(self, wb: WorkerBatch) -> tuple[dict[str, Any], list[SampleError]]:
        errors: list[SampleError] = []
        decoded: list[tuple[int, RawRow, Any]] = []
        for j, raw in enumerate(wb.raw):
            if raw is None:  # failed in the worker: already counted there
                continue
            try:
                decoded.append((j, raw, self._decode(raw)))
            except Exception as exc:  # noqa: BLE001 - counted skip
                errors.append(SampleError("decode", raw.shard, raw.ordinal, f"sample {raw.sample.key}: {exc}"))
        rows: list[dict[str, Any] | None] = [None] * len(wb.raw)
        valid = [False] * len(wb.raw)
        try:
            done = self.proc.finish_many([(r.sample, r.dataset, r.windows, f) for _, r, f in decoded], self.epoch)
            for (j, raw, _f), row in zip(decoded, done):
                rows[j], valid[j] = row, not raw.pad
        except Exception:  # noqa: BLE001 - find the row that fails, count it, keep the others
            for j, raw, frames in decoded:
                try:
                    rows[j] = self.proc.finish(raw.sample, raw.dataset, self.epoch, raw.windows, frames)
                    valid[j] = not raw.pad
                except Exception as exc:  # noqa: BLE001 - counted skip
                    errors.append(SampleError("decode", raw.shard, raw.ordinal,
                                              f"sample {raw.sample.key}: augment: {exc}"))
        good = [r for r in rows if r is not None] or ([self.last_good] if self.last_good is not None else [])
        if not good:
            first = errors[0].message if errors else "every sample failed in the workers"
            raise RuntimeFailure(f"data: batch {wb.index}: none of its {len(wb.raw)} samples could be decoded "
                                 f"(decode_stage=main, decode_device={self.device}, backend "
                                 f"{self.proc.decoder.name}) and no earlier sample exists to stand in for them; "
                                 f"first error: {first}")
        self.last_good = good[-1]
        rows = [r if r is not None else good[j % len(good)] for j, r in enumerate(rows)]
        return collate(rows, valid, self.cfg.mode), errors
