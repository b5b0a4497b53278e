"""``ShardConfig``: every option of ``vidssl shard``, typed and validated on construction."""

from __future__ import annotations

import os
from typing import Any

from vidssl.config import Config, ConfigError, dataclass, field, parse_size, spec

# Options that change what is written. Everything else (workers, timeout, overwrite, progress)
# only changes how fast or how robustly it is written, so a resumed run may change them.
OUTPUT_KEYS = (
    "prefix", "clip_seconds", "clip_stride", "min_seconds", "short_side", "fps", "codec",
    "crf", "preset", "gop", "bframes", "threads", "copy", "shard_size", "shard_samples", "classes",
    "num_jobs",
)

CODECS = {"h264": "libx264", "hevc": "libx265", "vp9": "libvpx-vp9", "av1": "libsvtav1"}
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


def default_workers() -> int:
    """Cores this process may use (respects taskset / cgroups affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(kw_only=True)
class ShardConfig(Config):
    """Options of ``vidssl shard`` (see docs/sharding.md for the long form)."""

    sources: list[str] = field(default_factory=list, metadata=spec(
        help="video files, directories (recursive), globs, or manifests (.csv/.jsonl with a 'path' column)"))
    output: str = field(default="", metadata=spec(help="output folder (OUTDIR); created with its parents if missing"))
    prefix: str = field(default="", metadata=spec(help="shard name prefix (default: OUTDIR's folder name)"))
    # ---- clip plan
    clip_seconds: float | None = field(default=None, metadata=spec(
        gt=0, help="cut fixed windows of this length (default: whole video, or the manifest's start/end)"))
    clip_stride: float | None = field(default=None, metadata=spec(
        gt=0, help="seconds between window starts (default: clip_seconds, i.e. no overlap)"))
    min_seconds: float = field(default=0.5, metadata=spec(
        ge=0, help="drop (and count) clips shorter than this"))
    # ---- transcode
    short_side: int | None = field(default=None, metadata=spec(
        ge=2, help="resize so the short side is this many pixels (even; aspect kept); default: keep size"))
    fps: float | None = field(default=None, metadata=spec(
        gt=0, le=1000, help="output frame rate (constant); default: the source's average rate"))
    codec: str = field(default="h264", metadata=spec(
        choices=tuple(CODECS), help="output codec (needs the encoder in PyAV's FFmpeg build)"))
    crf: int = field(default=23, metadata=spec(ge=0, le=63, help="constant rate factor (quality)"))
    preset: str = field(default="veryfast", metadata=spec(choices=PRESETS, help="encoder speed preset"))
    gop: int = field(default=16, metadata=spec(ge=1, le=1000, help="fixed keyframe interval in frames"))
    bframes: int = field(default=3, metadata=spec(
        ge=0, le=16, help="B-frames between references (the loader skips the ones a clip does not keep)"))
    threads: int = field(default=1, metadata=spec(
        ge=1, le=64, help="encoder threads per worker (part of the output: x264 output depends on it)"))
    copy: bool = field(default=False, metadata=spec(
        help="stream copy: no re-encode; cuts land on keyframes (needs short_side/fps unset)"))
    # ---- shards
    shard_size: str = field(default="512MB", metadata=spec(help="close a shard before it exceeds this size"))
    shard_samples: int = field(default=1000, metadata=spec(ge=1, help="close a shard at this many samples"))
    classes: list[str] | None = field(default=None, metadata=spec(
        help="fixed class list (label indices follow it); default: sorted label names found"))
    # ---- running
    workers: int = field(default=0, metadata=spec(ge=0, help="worker processes (0: all cores)"))
    timeout: float = field(default=600.0, metadata=spec(
        gt=0, help="seconds one input may take (probe+decode+encode) before its worker is killed"))
    num_jobs: int = field(default=1, metadata=spec(ge=1, help="split inputs over this many jobs (machines)"))
    job_index: int = field(default=0, metadata=spec(ge=0, help="which job this is (0-based)"))
    overwrite: bool = field(default=False, metadata=spec(
        help="replace an OUTDIR made with other settings (default: refuse)"))
    progress: str = field(default="auto", metadata=spec(
        choices=("auto", "bar", "log", "none"), help="tqdm bar on a terminal (auto), log lines, or nothing"))
    log_every: float = field(default=30.0, metadata=spec(gt=0, help="seconds between progress log lines"))

    def validate(self) -> None:
        parse_size(self.shard_size, self._key("shard_size"))
        if self.short_side is not None and self.short_side % 2:
            raise ConfigError(self._key("short_side") + f": got {self.short_side}; allowed: an even number "
                              "(yuv420p needs even dimensions)")
        if self.job_index >= self.num_jobs:
            raise ConfigError(self._key("job_index") + f": got {self.job_index}; allowed: 0 .. num_jobs-1 "
                              f"(num_jobs={self.num_jobs})")
        if self.clip_stride is not None and self.clip_seconds is None:
            raise ConfigError(self._key("clip_stride") + f": got {self.clip_stride}; allowed only with "
                              "clip_seconds set")
        if self.copy and (self.short_side is not None or self.fps is not None):
            which = "short_side" if self.short_side is not None else "fps"
            raise ConfigError(self._key("copy") + f": got true with {which}={getattr(self, which)}; stream "
                              "copy cannot resize or resample: unset them or set copy=false")
        if self.prefix and not all(c.isalnum() or c in "_-" for c in self.prefix):
            raise ConfigError(self._key("prefix") + f": got {self.prefix!r}; allowed: letters, digits, '_', '-'")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ConfigError(self._key("classes") + f": got {self.classes!r}; names must be unique")

    # ---- derived values
    @property
    def shard_bytes(self) -> int:
        return parse_size(self.shard_size, self._key("shard_size"))

    @property
    def n_workers(self) -> int:
        return self.workers or default_workers()

    @property
    def encoder(self) -> str:
        return CODECS[self.codec]

    def output_settings(self) -> dict[str, Any]:
        """The settings that determine the bytes written (compared on resume, stored in index.json)."""
        data = self.to_dict()
        return {k: data[k] for k in OUTPUT_KEYS}
