"""``DataConfig``: the ``data`` section of the typed config (see docs/data.md for every field)."""

from __future__ import annotations

from vidssl.config import Config, ConfigError, dataclass, field, spec

__all__ = ["DataConfig"]


@dataclass(kw_only=True)
class DataConfig(Config):
    """How to stream, cut, decode, augment and batch clips from one or more shard datasets."""

    # ---- sources ----------------------------------------------------------------------------
    dataset: list[str] | str = field(default="", metadata=spec(
        help="dataset folder or URL holding index.json (local path, http(s)://, or any fsspec URL); "
             "a list mixes several datasets"))
    weights: list[float] = field(default_factory=list, metadata=spec(
        gt=0, help="one weight per dataset. Epoch mode: fraction (0, 1] of each dataset used per epoch "
                   "(a different subset each epoch); resampled mode: relative sampling probability"))

    # ---- what a sample becomes --------------------------------------------------------------
    mode: str = field(default="ssl", metadata=spec(
        choices=("ssl", "clip", "views"),
        help="ssl: context + future + other window; clip: one random window; views: K evenly spaced windows"))
    frames: int = field(default=8, metadata=spec(ge=1, help="frames per window (T)"))
    stride: int = field(default=2, metadata=spec(ge=1, help="step between sampled frames, in source frames"))
    future: int = field(default=4, metadata=spec(ge=0, help="ssl: frames after the context window (F)"))
    gap_min: int = field(default=8, metadata=spec(
        ge=0, help="ssl: smallest distance in frames between the starts of the context and other windows"))
    gap_max: int = field(default=64, metadata=spec(
        ge=0, help="ssl: largest distance in frames between the starts of the context and other windows"))
    views: int = field(default=4, metadata=spec(ge=1, help="views: evenly spaced windows per video (K)"))
    short: str = field(default="loop", metadata=spec(
        choices=("loop", "pad", "skip"),
        help="videos too short for a plan: loop (wrap around), pad (repeat the last frame) or skip (counted)"))

    # ---- order and batching -----------------------------------------------------------------
    batch_size: int = field(default=8, metadata=spec(ge=1, help="samples per batch on each rank"))
    drop_last: bool = field(default=True, metadata=spec(
        help="true: drop the tail that does not fill a batch on every rank; false: pad with repeated "
             "samples (marked valid=False)"))
    shuffle: bool = field(default=True, metadata=spec(
        help="permute shards each epoch and shuffle samples through the buffer (turn off for evaluation)"))
    shuffle_buffer: int = field(default=64, metadata=spec(ge=1, help="samples held by each worker's shuffle buffer"))
    seed: int = field(default=0, metadata=spec(ge=0, help="seed of the epoch plan, clip plans and augmentation"))
    resampled: bool = field(default=False, metadata=spec(
        help="infinite streaming: draw shards with replacement, steps_per_epoch batches per epoch"))
    steps_per_epoch: int = field(default=0, metadata=spec(ge=0, help="batches per rank per epoch (resampled mode)"))

    # ---- workers and decoding ---------------------------------------------------------------
    workers: int = field(default=2, metadata=spec(ge=0, help="DataLoader worker processes (0: in the main process)"))
    prefetch: int = field(default=2, metadata=spec(ge=1, help="batches prefetched per worker"))
    backend: str = field(default="auto", metadata=spec(
        choices=("auto", "pyav", "decord", "torchcodec"),
        help="decoder: auto (PyAV on the CPU, torchcodec on cuda), pyav, decord (CPU), or torchcodec "
             "(CPU or NVDEC; needs the system FFmpeg libraries); the one that ran is in loader.stats['backend']"))
    decode_threads: int = field(default=1, metadata=spec(ge=1, help="decoder threads per worker"))
    decode_timeout: float = field(default=60.0, metadata=spec(
        gt=0, help="seconds one sample's decode may take before it is abandoned and counted"))
    decode_stage: str = field(default="worker", metadata=spec(
        choices=("worker", "main"),
        help="where decoding runs: in the workers, or in the main process on bytes the workers send"))
    decode_device: str = field(default="cpu", metadata=spec(
        choices=("cpu", "cuda"), help="main-stage decoding and augmentation device (cuda: torchcodec on "
                                      "NVDEC, augmentation on the GPU; needs decode_stage=main)"))
    decode_fallback: str = field(default="error", metadata=spec(
        choices=("error", "cpu"), help="when decode_device=cuda cannot be had: error (before any batch, "
                                       "saying what is missing) or cpu (decode on the CPU, with a warning)"))
    pin_memory: bool = field(default=False, metadata=spec(help="pin batch memory (for GPU training)"))

    # ---- augmentation -----------------------------------------------------------------------
    augment: str = field(default="train", metadata=spec(
        choices=("train", "eval", "none"),
        help="train: random resized crop, flip, colour jitter, grayscale; eval: resize + crop(s); "
             "none: native-size clips untouched"))
    crop_size: int = field(default=112, metadata=spec(ge=8, help="output height and width"))
    scale: tuple[float, float] = field(default=(0.35, 1.0), metadata=spec(
        gt=0, le=1, help="random resized crop: area fraction range"))
    ratio: tuple[float, float] = field(default=(0.75, 1.3333), metadata=spec(
        gt=0, help="random resized crop: aspect ratio (w/h) range"))
    flip: bool = field(default=True, metadata=spec(
        help="random horizontal flip (turn off for direction-sensitive classes)"))
    jitter: float = field(default=0.4, metadata=spec(
        ge=0, le=1, help="colour jitter strength for brightness, contrast and saturation"))
    hue: float = field(default=0.0, metadata=spec(ge=0, le=0.5, help="colour jitter hue range"))
    jitter_p: float = field(default=0.8, metadata=spec(ge=0, le=1, help="probability of colour jitter"))
    grayscale_p: float = field(default=0.2, metadata=spec(ge=0, le=1, help="probability of grayscale"))
    channel_shuffle_p: float = field(default=0.0, metadata=spec(
        ge=0, le=1, help="probability of a random RGB channel order (breaks colour as a shortcut for "
                         "self-supervision; every frame of a window gets the same order)"))
    eval_resize: int = field(default=128, metadata=spec(ge=8, help="eval: short side before cropping"))
    eval_crops: int = field(default=1, metadata=spec(choices=(1, 3), help="eval: centre crop (1) or three crops (3)"))

    # ---- bad data ---------------------------------------------------------------------------
    max_error_fraction: float = field(default=0.01, metadata=spec(
        ge=0, le=1, help="stop when more than this fraction of the epoch's planned samples on a rank failed"))
    read_timeout: float = field(default=60.0, metadata=spec(gt=0, help="seconds a stalled network read may take"))
    retries: int = field(default=1, metadata=spec(ge=0, le=10, help="reopen attempts of a shard whose read broke"))

    def validate(self) -> None:
        if isinstance(self.dataset, str):
            object.__setattr__(self, "dataset", [self.dataset] if self.dataset else [])
        if not self.dataset or any(not d.strip() for d in self.dataset):
            raise ConfigError(self._key("dataset") + f": got {self.dataset!r}; expected a dataset folder or URL "
                              "holding index.json (for example shards/digits)")
        if self.weights and len(self.weights) != len(self.dataset):
            raise ConfigError(self._key("weights") + f": got {len(self.weights)} weights {self.weights!r} for "
                              f"{len(self.dataset)} datasets; allowed: one per dataset, or none")
        if self.weights and not self.resampled and any(w > 1 for w in self.weights):
            raise ConfigError(self._key("weights") + f": got {self.weights!r}; allowed in epoch mode: fractions "
                              "in (0, 1] (a sample appears at most once per epoch; use resampled=true to oversample)")
        if self.gap_min > self.gap_max:
            raise ConfigError(self._key("gap_min") + f": got {self.gap_min} > gap_max {self.gap_max}; "
                              "allowed: gap_min <= gap_max")
        if self.resampled and self.steps_per_epoch < 1:
            raise ConfigError(self._key("steps_per_epoch") + f": got {self.steps_per_epoch}; allowed with "
                              "resampled=true: >= 1")
        if self.scale[0] > self.scale[1]:
            raise ConfigError(self._key("scale") + f": got {list(self.scale)}; allowed: [low, high] with low <= high")
        if self.ratio[0] > self.ratio[1]:
            raise ConfigError(self._key("ratio") + f": got {list(self.ratio)}; allowed: [low, high] with low <= high")
        if self.decode_device == "cuda" and self.decode_stage != "main":
            raise ConfigError(self._key("decode_device") + ": got 'cuda' with decode_stage 'worker'; allowed: "
                              "decode_stage=main (CUDA must never be initialised in forked workers)")
        if self.decode_device == "cuda" and self.backend in ("pyav", "decord"):
            raise ConfigError(self._key("backend") + f": got {self.backend!r} with decode_device 'cuda'; allowed: "
                              "torchcodec or auto (the only GPU decoder), or decode_device=cpu")
        if self.eval_crops == 3 and self.mode != "views":
            raise ConfigError(self._key("eval_crops") + f": got 3 with mode {self.mode!r}; allowed: 3 only with "
                              "mode=views (one clip per sample otherwise)")
        if self.mode == "ssl" and self.augment == "eval":
            raise ConfigError(self._key("augment") + ": got 'eval' with mode 'ssl'; allowed: train or none")

    @property
    def logical_workers(self) -> int:
        """Streams per rank in the epoch plan: ``workers``, or 1 when loading in the main process."""
        return max(1, self.workers)
