"""Self-supervised objectives: ``nn.Module``s that take :class:`Views` of an SSL batch and return named losses.

Each objective's ``forward(views)`` returns ``{"loss": scalar with grad, <metric>: detached scalar}``;
:class:`vidssl.models.ssl.SSLModel` prefixes the keys with the objective name and sums the
weighted losses. An objective may define ``on_after_step(backbone)`` (e.g. an EMA target update).
"""

from vidssl.models.objectives.contrast import TemporalContrast, contrastive_loss
from vidssl.models.objectives.future import LatentFuture, LatentPredictor, PixelFuture, build_future
from vidssl.models.objectives.losses import info_nce
from vidssl.models.objectives.views import WINDOWS, Views

__all__ = ["Views", "WINDOWS", "info_nce", "contrastive_loss", "TemporalContrast", "LatentFuture",
           "LatentPredictor", "PixelFuture", "build_future"]
