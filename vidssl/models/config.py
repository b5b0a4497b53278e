"""Config sections of the model code: ``model`` (:class:`ModelConfig`) and ``objectives`` (:class:`ObjectivesConfig`).

Importing this module does not import torch (backbone names come from the registry's static list,
``registry._BUILTIN``, the one place built-in names are listed).
Each component receives its own section: backbones and heads get ``ModelConfig``, the SSL model
gets ``ModelConfig`` + ``ObjectivesConfig``, each objective its ``FutureConfig`` / ``ContrastConfig``.

YAML example::

    model:
      backbone: vit_small
      backbone_kwargs: {pos_embed: sincos}
      head: {kind: mlp, dropout: 0.5}
    objectives:
      future: {target: latent, loss: infonce, weight: 1.0}
      contrast: {enabled: true, temperature: 0.1}
"""

from __future__ import annotations

from typing import Any, Literal

from vidssl.config import Config, ConfigError, dataclass, field, spec
from vidssl.models.registry import available_backbones, builtin_backbones

__all__ = ["HeadConfig", "ModelConfig", "FutureConfig", "ContrastConfig", "ObjectivesConfig"]


@dataclass(kw_only=True)
class HeadConfig(Config):
    """Classification head on pooled backbone features (action recognition)."""

    kind: Literal["linear", "mlp"] = field(default="linear", metadata=spec(
        help="linear: dropout + Linear; mlp: Linear + GELU + dropout + Linear"))
    hidden_dim: int = field(default=512, metadata=spec(ge=1, help="hidden width of the mlp head"))
    dropout: float = field(default=0.0, metadata=spec(ge=0.0, lt=1.0, help="dropout before the last Linear"))


@dataclass(kw_only=True)
class ModelConfig(Config):
    """The backbone (by registry name), its options, input normalisation and the classification head."""

    backbone: str = field(default="cnn3d_small", metadata=spec(
        help=f"backbone name: built-in {', '.join(builtin_backbones())}; or one registered with "
             f"vidssl.models.register_backbone (e.g. in a run.imports module)"))
    backbone_kwargs: dict[str, Any] = field(default_factory=dict, metadata=spec(
        help="options of the backbone (e.g. vit: pos_embed, num_frames, img_size, drop_path; "
             "cnn3d_small: width, norm); checked when the model is built"))
    weights_path: str | None = field(default=None, metadata=spec(
        help="local state dict file to load into the backbone (torchvision or vidssl); never downloads"))
    mean: tuple[float, ...] = field(default=(0.43216, 0.394666, 0.37645), metadata=spec(
        help="per-channel mean of 0..1 pixels, subtracted on the training device"))
    std: tuple[float, ...] = field(default=(0.22803, 0.22145, 0.216989), metadata=spec(
        gt=0.0, help="per-channel std of 0..1 pixels, divided on the training device"))
    activation_checkpointing: bool = field(default=False, metadata=spec(
        help="recompute each transformer block in the backward pass instead of storing its activations: "
             "much less activation memory for about a third more compute (ViT backbones)"))
    head: HeadConfig = field(default_factory=HeadConfig, metadata=spec(help="classification head"))

    def validate(self) -> None:
        names = available_backbones()
        if self.backbone not in names:
            raise ConfigError(f"{self._key('backbone')}: got {self.backbone!r}; allowed: {', '.join(names)}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if len(v) not in (1, 3):
                raise ConfigError(f"{self._key(name)}: got {list(v)!r}; expected 3 values (R, G, B) or 1")
        if "weights_path" in self.backbone_kwargs:
            raise ConfigError(f"{self._key('backbone_kwargs')}.weights_path: set {self._key('weights_path')} instead")


@dataclass(kw_only=True)
class FutureConfig(Config):
    """Future-frame prediction: from the context window, predict the F future frames (pixels or latents)."""

    enabled: bool = field(default=True, metadata=spec(help="switch the objective on/off"))
    weight: float = field(default=1.0, metadata=spec(ge=0.0, help="weight of its loss in the total"))
    target: Literal["pixels", "latent"] = field(default="latent", metadata=spec(
        help="pixels: decode future frames (reduced size, per-patch normalised, MSE); "
             "latent: predict the backbone features of the future frames"))
    loss: Literal["infonce", "regression"] = field(default="infonce", metadata=spec(
        help="latent target only. infonce: dense predictive coding against every clip and time step of "
             "the global batch; regression: MSE to layer-normed features of a stop-grad or EMA encoder"))
    target_encoder: Literal["ema", "stopgrad"] = field(default="ema", metadata=spec(
        help="latent regression only: an EMA copy of the backbone, or the backbone itself without gradient"))
    ema_momentum: float = field(default=0.996, metadata=spec(ge=0.0, le=1.0, help="EMA target momentum per step"))
    predictor: Literal["transformer", "gru"] = field(default="transformer", metadata=spec(
        help="latent predictor over the context time steps"))
    predictor_dim: int = field(default=256, metadata=spec(ge=8, help="predictor width"))
    predictor_depth: int = field(default=2, metadata=spec(ge=1, help="transformer blocks of the predictor"))
    predictor_heads: int = field(default=4, metadata=spec(ge=1, help="attention heads of the predictor"))
    proj_dim: int = field(default=128, metadata=spec(ge=1, help="infonce: embedding width of predictions/targets"))
    negatives: Literal["batch", "batch+other", "batch+reversed"] = field(default="batch", metadata=spec(
        help="infonce: batch: every future step of every clip in the global batch; batch+other: also every step "
             "of the 'other' windows, hard negatives from the same videos (same appearance, other time), so "
             "appearance alone cannot pick the true future; batch+reversed: also every step of the future "
             "windows played backwards (the same frames and augmentation, the opposite motion)"))
    temperature: float = field(default=0.1, metadata=spec(gt=0.0, help="infonce temperature"))
    pixel_size: int = field(default=32, metadata=spec(ge=4, help="pixels: future frames resized to this square"))
    pixel_patch: int = field(default=8, metadata=spec(ge=1, help="pixels: patch size for per-patch normalisation"))
    norm_pix: bool = field(default=True, metadata=spec(help="pixels: normalise each target patch (mean 0, std 1)"))
    decoder_dim: int = field(default=192, metadata=spec(ge=8, help="pixels: decoder width"))
    decoder_depth: int = field(default=2, metadata=spec(ge=1, help="pixels: decoder blocks"))
    decoder_heads: int = field(default=4, metadata=spec(ge=1, help="pixels: decoder attention heads"))

    def validate(self) -> None:
        if self.pixel_size % self.pixel_patch:
            raise ConfigError(f"{self._key('pixel_patch')}: got {self.pixel_patch}; must divide "
                              f"{self._key('pixel_size')}={self.pixel_size}")
        if self.predictor_dim % self.predictor_heads:
            raise ConfigError(f"{self._key('predictor_heads')}: got {self.predictor_heads}; must divide "
                              f"{self._key('predictor_dim')}={self.predictor_dim}")
        if self.decoder_dim % self.decoder_heads:
            raise ConfigError(f"{self._key('decoder_heads')}: got {self.decoder_heads}; must divide "
                              f"{self._key('decoder_dim')}={self.decoder_dim}")


@dataclass(kw_only=True)
class ContrastConfig(Config):
    """Temporal contrast: the context window against the other window of the same video (InfoNCE)."""

    enabled: bool = field(default=True, metadata=spec(help="switch the objective on/off"))
    weight: float = field(default=1.0, metadata=spec(ge=0.0, help="weight of its loss in the total"))
    proj_dim: int = field(default=128, metadata=spec(ge=1, help="output width of the projection MLP"))
    proj_hidden: int = field(default=512, metadata=spec(ge=1, help="hidden width of the projection MLP"))
    temperature: float = field(default=0.1, metadata=spec(gt=0.0, help="InfoNCE temperature"))
    symmetric: bool = field(default=True, metadata=spec(
        help="average context→other and other→context losses (else context→other only)"))
    negatives: Literal["batch", "batch+reversed"] = field(default="batch", metadata=spec(
        help="batch: the other windows of every clip in the global batch; batch+reversed: also every other "
             "window played backwards, a hard negative with the same frames and the opposite motion, so "
             "appearance alone cannot find the positive"))


@dataclass(kw_only=True)
class ObjectivesConfig(Config):
    """The self-supervised objectives; each can be switched off, at least one must stay on."""

    future: FutureConfig = field(default_factory=FutureConfig, metadata=spec(help="future-frame prediction"))
    contrast: ContrastConfig = field(default_factory=ContrastConfig, metadata=spec(help="temporal contrast"))

    def validate(self) -> None:
        if not any(c.enabled and c.weight > 0 for c in (self.future, self.contrast)):
            raise ConfigError(f"{self._key('future')}.enabled/{self._key('contrast')}.enabled: every objective is "
                              f"off or has weight 0; enable at least one with weight > 0")
