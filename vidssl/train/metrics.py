"""What a run records: ``metrics.jsonl``, TensorBoard events, the rank-0 progress bar and end-of-run curves.

Only rank 0 writes; :func:`open_metrics` gives other ranks a writer that does nothing, so the
loop calls the same methods everywhere. On a resume from step S, rows after S (written by the
interrupted run past its last checkpoint) are dropped from ``metrics.jsonl`` and TensorBoard
purges its events after S, so both read as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from vidssl.fsio import atomic_write_text

log = logging.getLogger("vidssl.train")

__all__ = ["open_metrics", "Metrics", "NullMetrics", "read_metrics", "plot_curves"]


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (a torn last line, from a killed run, is ignored)."""
    rows = []
    p = Path(path)
    if not p.is_file():
        return rows
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class NullMetrics:
    """The writer of ranks other than 0."""

    def log(self, row: dict[str, Any]) -> None:
        pass

    def event(self, row: dict[str, Any]) -> None:
        pass

    def close(self, plot: bool = False) -> None:
        pass


class Metrics(NullMetrics):
    """Rank 0's writer: one JSON row per step, TensorBoard scalars, progress display."""

    def __init__(self, run_dir: Path, *, start_step: int, max_steps: int, progress: str, log_every: int,
                 name: str = "train") -> None:
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        # Keep the rows up to the resumed step; a fresh run starts an empty file.
        kept = [r for r in read_metrics(self.path) if start_step > 0 and r.get("step", math.inf) <= start_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        self.progress, self.log_every, self.max_steps, self.name = progress, log_every, max_steps, name
        self._bar = None
        if progress == "bar":
            from tqdm import tqdm  # noqa: PLC0415

            self._bar = tqdm(total=max_steps, initial=start_step, desc=name, unit="step", dynamic_ncols=True,
                             file=sys.stderr, smoothing=0.1)
        self._t0 = time.perf_counter()

    def log(self, row: dict[str, Any]) -> None:
        """One step's row: must hold ``step``; every other number goes to TensorBoard as ``train/<key>``."""
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()  # a killed run leaves every finished step on disk
        step = int(row["step"])
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self.tb.add_scalar(f"{self.name}/{k}", v, step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}",
                                  clips_s=f"{row.get('clips_per_s', 0):.1f}", refresh=False)
        if step % self.log_every == 0 or step == self.max_steps:
            self.tb.flush()
            if self.progress == "log":
                shown = " ".join(f"{k}={v:.4g}" for k, v in row.items()
                                 if k in ("loss", "lr", "grad_norm", "clips_per_s", "data_wait") and
                                 isinstance(v, (int, float)))
                log.info("%s step %d/%d %s", self.name, step, self.max_steps, shown)

    def event(self, row: dict[str, Any]) -> None:
        """A non-step record (evaluation, kNN accuracy): same file, with ``step`` and ``kind``; numbers to
        TensorBoard under ``<kind>/``."""
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        step = int(row.get("step", 0))
        for k, v in row.items():
            if k not in ("step", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.tb.add_scalar(f"{row.get('kind', 'eval')}/{k}", v, step)
        self.tb.flush()

    def close(self, plot: bool = False) -> None:
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        self.tb.close()
        if plot:
            try:
                out = plot_curves(read_metrics(self.path), self.run_dir / "curves.png")
                log.info("curves: %s", out)
            except Exception as exc:  # noqa: BLE001 - a plot never fails a finished run
                log.warning("could not plot the curves: %s", exc)


def open_metrics(rank: int, run_dir: Path, **kwargs) -> NullMetrics:
    return Metrics(run_dir, **kwargs) if rank == 0 else NullMetrics()


def plot_curves(rows: list[dict[str, Any]], out: Path) -> Path:
    """PNG of every loss (and its chance level where known), learning rate, clips/s and data wait."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = [r for r in rows if "step" in r and "loss" in r]
    if not rows:
        raise ValueError("no step rows to plot")
    steps = [r["step"] for r in rows]
    losses = [k for k in rows[-1] if k == "loss" or k.endswith("/loss")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    for k in losses:
        ax.plot(steps, [r.get(k, math.nan) for r in rows], label=k, lw=1)
        chance = k.replace("/loss", "/chance")
        if chance != k and chance in rows[-1]:
            ax.axhline(rows[-1][chance], ls="--", lw=0.8, color=ax.lines[-1].get_color(), label=f"{chance}")
    ax.set_xlabel("step")
    ax.set_title("losses")
    ax.legend(fontsize=7)
    ax = axes[1]
    ax.plot(steps, [r.get("clips_per_s", math.nan) for r in rows], lw=1)
    ax.set_xlabel("step")
    ax.set_title("clips/s (global)")
    ax2 = ax.twinx()
    ax2.plot(steps, [100 * r.get("data_wait", math.nan) for r in rows], lw=0.8, color="tab:red")
    ax2.set_ylabel("data wait % of step", color="tab:red")
    ax = axes[2]
    ax.plot(steps, [r.get("lr", math.nan) for r in rows], lw=1)
    ax.set_xlabel("step")
    ax.set_title("learning rate")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
