"""Config sections of training: ``run``, ``train`` (loop, optimizer, schedule, checkpoints) and ``deepspeed``.

No torch import here: a bad config fails before anything heavy loads or any worker starts.
Each component receives its own section (the loop gets ``TrainConfig``, the engine gets
``TrainConfig`` + ``DeepSpeedConfig``); :class:`PretrainConfig` is the whole tree of
``vidssl pretrain``.

YAML example::

    run: {dir: runs/digits}
    train: {max_steps: 2000, lr: 1e-3, warmup_steps: 100, checkpoint_every: 500, resume: auto}
    deepspeed: {zero_stage: 2, precision: bf16}
"""

from __future__ import annotations

from typing import Literal

from vidssl.config import Config, ConfigError, dataclass, field, spec
from vidssl.data.config import DataConfig
from vidssl.models.config import ContrastConfig, FutureConfig, ModelConfig, ObjectivesConfig

__all__ = ["RunConfig", "TrainConfig", "DeepSpeedConfig", "PretrainConfig", "KnnConfig", "FinetuneSection", "EvalSection",
           "FinetuneConfig"]


@dataclass(kw_only=True)
class RunConfig(Config):
    """Where a run lives: ``dir`` holds config.yaml, metrics.jsonl, tb/, checkpoints/ and plots."""

    dir: str = field(default="runs/pretrain", metadata=spec(help="run folder (created; reused by a resume)"))
    progress: Literal["bar", "log", "none"] = field(default="bar", metadata=spec(
        help="rank 0 progress: a bar (loss, clips/s, ETA), one log line per log_every steps, or nothing"))
    imports: list[str] = field(default_factory=list, metadata=spec(
        help="Python modules imported on every rank before the model is built, e.g. one that registers a "
             "custom backbone with vidssl.models.register_backbone"))

    def validate(self) -> None:
        if not self.dir.strip():
            raise ConfigError(f"{self._key('dir')}: got {self.dir!r}; expected a folder path such as runs/NAME")


@dataclass(kw_only=True)
class TrainConfig(Config):
    """The loop, the optimizer (AdamW), the schedules (pure functions of the step) and checkpoints."""

    max_steps: int = field(default=1000, metadata=spec(ge=1, help="optimizer steps of the run"))
    grad_accum: int = field(default=1, metadata=spec(
        ge=1, help="micro-batches per optimizer step (global batch = data.batch_size x grad_accum x world size)"))
    # ---- optimizer and schedules ----
    lr: float = field(default=1e-3, metadata=spec(gt=0, help="peak learning rate (reached after warmup)"))
    min_lr: float = field(default=1e-5, metadata=spec(ge=0, help="learning rate at the end of the cosine decay"))
    warmup_steps: int = field(default=100, metadata=spec(ge=0, help="linear warmup from 0 to lr"))
    schedule: Literal["cosine", "constant"] = field(default="cosine", metadata=spec(
        help="after warmup: cosine decay to min_lr at max_steps, or constant lr"))
    weight_decay: float = field(default=0.05, metadata=spec(
        ge=0, help="AdamW weight decay (never on norms, biases, positional embeddings, tokens)"))
    weight_decay_end: float | None = field(default=None, metadata=spec(
        ge=0, help="cosine-schedule the weight decay to this value at max_steps (none: constant)"))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=spec(ge=0, lt=1, help="AdamW betas"))
    eps: float = field(default=1e-8, metadata=spec(gt=0, help="AdamW epsilon"))
    grad_clip: float = field(default=1.0, metadata=spec(ge=0, help="clip the global grad norm (0: off)"))
    ema_momentum_end: float | None = field(default=None, metadata=spec(
        ge=0, le=1, help="EMA target: cosine-increase the momentum from objectives.future.ema_momentum to this "
                         "value at max_steps (none: constant)"))
    # ---- bookkeeping ----
    seed: int = field(default=0, metadata=spec(ge=0, help="seed of model init and every training-side RNG"))
    log_every: int = field(default=10, metadata=spec(ge=1, help="steps between progress lines and TensorBoard flushes"))
    checkpoint_every: int = field(default=500, metadata=spec(ge=0, help="steps between checkpoints (0: only at the end)"))
    keep_checkpoints: int = field(default=3, metadata=spec(ge=1, help="complete checkpoints kept (oldest removed)"))
    resume: str = field(default="auto", metadata=spec(
        help="auto: continue from the newest complete checkpoint in run.dir if there is one; none: start fresh "
             "(refused if run.dir already has checkpoints); or a checkpoint folder path"))
    elastic_resume: bool = field(default=False, metadata=spec(
        help="allow resuming a checkpoint written by another number of ranks: DeepSpeed re-partitions the "
             "model and optimizer states (universal checkpoint), the data continues at the same point of the "
             "epoch (the rest of that epoch is approximate, exact from the next), per-rank RNGs are re-seeded"))
    max_bad_steps: int = field(default=5, metadata=spec(
        ge=1, help="consecutive non-finite losses (each skipped with a warning) that abort the run"))
    device: Literal["auto", "cpu", "cuda"] = field(default="auto", metadata=spec(
        help="auto: cuda when available, else cpu (gloo)"))
    timeout_minutes: float = field(default=10.0, metadata=spec(
        gt=0, help="process-group timeout: a rank stuck in a collective this long fails the job"))
    plot: bool = field(default=True, metadata=spec(help="write loss and throughput curves (PNG) at the end"))

    def validate(self) -> None:
        if self.min_lr > self.lr:
            raise ConfigError(f"{self._key('min_lr')}: got {self.min_lr} > lr {self.lr}; allowed: <= lr")
        r = self.resume.strip()
        if not r:
            raise ConfigError(f"{self._key('resume')}: got {self.resume!r}; allowed: auto, none or a checkpoint path")


@dataclass(kw_only=True)
class DeepSpeedConfig(Config):
    """How the DeepSpeed engine shards and casts. The engine's JSON is generated from this and ``train``."""

    zero_stage: int = field(default=0, metadata=spec(choices=(0, 1, 2, 3), help="ZeRO stage"))
    precision: Literal["fp32", "bf16", "fp16"] = field(default="fp32", metadata=spec(
        help="fp32 (CPU and GPU), bf16 (GPU; CPU works but is slow), fp16 (GPU only; diverges on video SSL, prefer bf16)"))
    config: str | None = field(default=None, metadata=spec(
        help="a DeepSpeed JSON (e.g. configs/deepspeed/zero2.json) merged into the generated one; a key that "
             "contradicts this config is an error naming both"))
    overlap_comm: bool = field(default=True, metadata=spec(help="ZeRO-2/3: overlap gradient reduction with backward"))
    offload_optimizer: Literal["none", "cpu"] = field(default="none", metadata=spec(
        help="ZeRO-2/3: keep optimizer state in CPU memory"))


@dataclass(kw_only=True)
class KnnConfig(Config):
    """A cheap monitor during pretraining: kNN accuracy of frozen, L2-normalised backbone features
    (k nearest training videos, votes weighted by exp(similarity / temperature), as DINO does)."""

    every: int = field(default=0, metadata=spec(ge=0, help="steps between kNN evaluations (0: off)"))
    train: str = field(default="", metadata=spec(help="labelled shards whose features form the memory bank"))
    val: str = field(default="", metadata=spec(help="labelled shards that are classified"))
    k: int = field(default=20, metadata=spec(ge=1, help="neighbours"))
    temperature: float = field(default=0.07, metadata=spec(gt=0, help="vote weight exp(sim / temperature)"))
    views: int = field(default=1, metadata=spec(ge=1, help="evenly spaced clips per video, features averaged"))
    batch_size: int = field(default=16, metadata=spec(ge=1, help="videos per batch and rank"))
    workers: int = field(default=0, metadata=spec(ge=0, help="loader workers of the kNN passes"))

    def validate(self) -> None:
        if self.every and not (self.train and self.val):
            raise ConfigError(f"{self._key('train')}/{self._key('val')}: both are required with "
                              f"{self._key('every')}={self.every}; got train={self.train!r} val={self.val!r}")


def _pretrain_data() -> DataConfig:
    # The demo's recipe (configs/pretrain/demo_cpu.yaml; docs/ssl.md says why): stride 2, strong colour
    # augmentation drawn independently for the two windows, no flip (direction is what the model must learn).
    return DataConfig(dataset="runs/demo/shards/train", mode="ssl", frames=8, stride=2, future=4, gap_min=2,
                      gap_max=8, batch_size=16, crop_size=56, scale=(0.5, 1.0), flip=False, jitter=0.4, jitter_p=0.8,
                      grayscale_p=0.5, channel_shuffle_p=0.5, workers=2)


def _pretrain_objectives() -> ObjectivesConfig:
    # Temporal contrast with reversed hard negatives; future prediction off (docs/ssl.md: it added compute
    # and no probe accuracy here). Its settings stay those that worked best when it is switched on.
    return ObjectivesConfig(future=FutureConfig(enabled=False, target="latent", loss="infonce", predictor_dim=64,
                                                predictor_heads=4, proj_dim=64),
                            contrast=ContrastConfig(proj_dim=64, proj_hidden=128, negatives="batch+reversed"))


@dataclass(kw_only=True)
class PretrainConfig(Config):
    """Everything ``vidssl pretrain`` needs; each component gets its own section."""

    run: RunConfig = field(default_factory=RunConfig, metadata=spec(help="run folder and progress display"))
    data: DataConfig = field(default_factory=_pretrain_data, metadata=spec(help="loader (mode must be ssl)"))
    model: ModelConfig = field(default_factory=ModelConfig, metadata=spec(help="backbone"))
    objectives: ObjectivesConfig = field(default_factory=_pretrain_objectives, metadata=spec(
        help="self-supervised objectives"))
    train: TrainConfig = field(default_factory=TrainConfig, metadata=spec(help="loop, optimizer, checkpoints"))
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig, metadata=spec(help="DeepSpeed engine"))
    knn: KnnConfig = field(default_factory=KnnConfig, metadata=spec(help="kNN accuracy monitor (off by default)"))

    def validate(self) -> None:
        if self.data.mode != "ssl":
            raise ConfigError(f"{self._key('data')}.mode: got {self.data.mode!r}; pretraining needs 'ssl' "
                              f"(context, future and other windows)")
        fut = self.objectives.future
        uses_ema = fut.enabled and fut.weight > 0 and fut.target == "latent" and fut.loss == "regression" \
            and fut.target_encoder == "ema"
        if uses_ema and self.deepspeed.zero_stage == 3:
            raise ConfigError(f"{self._key('deepspeed')}.zero_stage: got 3 with an EMA target encoder "
                              f"(objectives.future.target_encoder=ema); ZeRO-3 partitions the online weights the "
                              f"EMA reads: use zero_stage <= 2, or target_encoder=stopgrad")
        if self.train.ema_momentum_end is not None and self.train.ema_momentum_end < fut.ema_momentum:
            raise ConfigError(f"{self._key('train')}.ema_momentum_end: got {self.train.ema_momentum_end} < "
                              f"objectives.future.ema_momentum {fut.ema_momentum}; allowed: >= the start momentum")


# ---- fine-tuning (vidssl finetune / evaluate) ---------------------------------------------------

@dataclass(kw_only=True)
class FinetuneSection(Config):
    """What is trained and from which weights."""

    mode: Literal["linear", "attentive", "full"] = field(default="linear", metadata=spec(
        help="linear: frozen backbone + linear head; attentive: frozen backbone + cross-attention probe; "
             "full: all weights, layer-wise lr decay"))
    pretrained: str = field(default="none", metadata=spec(
        help="a pretraining run folder, an exported backbone file (vidssl export), or none (random init)"))
    label_fraction: float = field(default=1.0, metadata=spec(
        gt=0, le=1, help="train on a stratified fraction of the labelled samples (>= 1 per class), "
                         "deterministic for train.seed; the chosen keys are written to the run folder"))
    label_smoothing: float = field(default=0.0, metadata=spec(ge=0, lt=1, help="cross-entropy label smoothing"))
    mixup: float = field(default=0.0, metadata=spec(ge=0, help="mixup alpha (0: off); one mix per clip"))
    cutmix: float = field(default=0.0, metadata=spec(ge=0, help="cutmix alpha (0: off); one box for every frame"))
    mix_prob: float = field(default=1.0, metadata=spec(ge=0, le=1, help="probability of mixing a batch"))
    layer_decay: float = field(default=0.75, metadata=spec(
        gt=0, le=1, help="full mode: lr scale decay^(L+1-i) for layer i (1: no decay)"))
    attentive_heads: int = field(default=4, metadata=spec(ge=1, help="attentive probe: attention heads"))
    head_norm: bool = field(default=True, metadata=spec(
        help="linear mode: BatchNorm1d without affine on the pooled features before the linear layer"))


@dataclass(kw_only=True)
class EvalSection(Config):
    """Multi-view evaluation at the end of fine-tuning (and by ``vidssl evaluate``)."""

    dataset: list[str] | str = field(default_factory=list, metadata=spec(
        help="validation dataset (labelled shards); empty: no evaluation at the end"))
    views: int = field(default=5, metadata=spec(ge=1, help="K evenly spaced temporal clips per video"))
    crops: int = field(default=1, metadata=spec(choices=(1, 3), help="spatial crops per clip (1 centre, or 3)"))
    batch_size: int = field(default=8, metadata=spec(ge=1, help="videos per evaluation batch and rank"))
    workers: int = field(default=2, metadata=spec(ge=0, help="loader workers for evaluation"))
    eval_resize: int = field(default=128, metadata=spec(ge=8, help="short side before cropping"))

    def validate(self) -> None:
        if isinstance(self.dataset, str):
            object.__setattr__(self, "dataset", [self.dataset] if self.dataset else [])


def _finetune_data() -> DataConfig:
    return DataConfig(dataset="runs/demo/shards/train", mode="clip", frames=8, stride=2, batch_size=16, crop_size=56,
                      scale=(0.5, 1.0), flip=False, workers=2)


def _finetune_train() -> TrainConfig:
    return TrainConfig(max_steps=300, lr=1e-3, warmup_steps=20, weight_decay=0.0, checkpoint_every=100,
                       keep_checkpoints=2)


@dataclass(kw_only=True)
class FinetuneConfig(Config):
    """Everything ``vidssl finetune`` needs."""

    run: RunConfig = field(default_factory=lambda: RunConfig(dir="runs/finetune"), metadata=spec(
        help="run folder and progress display"))
    data: DataConfig = field(default_factory=_finetune_data, metadata=spec(
        help="labelled training shards (mode clip, augment train)"))
    model: ModelConfig = field(default_factory=ModelConfig, metadata=spec(help="backbone and head"))
    finetune: FinetuneSection = field(default_factory=FinetuneSection, metadata=spec(help="mode and weights"))
    eval: EvalSection = field(default_factory=EvalSection, metadata=spec(help="evaluation at the end"))
    train: TrainConfig = field(default_factory=_finetune_train, metadata=spec(help="loop, optimizer, checkpoints"))
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig, metadata=spec(help="DeepSpeed engine"))

    def validate(self) -> None:
        if self.data.mode != "clip":
            raise ConfigError(f"{self._key('data')}.mode: got {self.data.mode!r}; fine-tuning trains on one clip per "
                              f"sample: 'clip'")
        if self.finetune.mode != "full" and (self.finetune.mixup or self.finetune.cutmix):
            raise ConfigError(f"{self._key('finetune')}.mixup/cutmix: got {self.finetune.mixup}/{self.finetune.cutmix} "
                              f"with mode {self.finetune.mode!r}; allowed only with mode full")
