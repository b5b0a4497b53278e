"""The names of the clip windows in a batch: one table, shared by the loader and the models.

``ssl`` batches carry a ``context`` window, the ``future`` frames right after it and an ``other``
window of the same video at another time (temporal contrast); ``clip`` and ``views`` batches carry
one ``video`` entry. No torch import: configs and the CLI read this too.
"""

from __future__ import annotations

__all__ = ["SSL_WINDOWS", "WINDOWS_BY_MODE", "ALL_WINDOWS"]

#: Windows of a self-supervised (``mode: ssl``) batch, in decode order.
SSL_WINDOWS: tuple[str, ...] = ("context", "future", "other")

#: Window names each loader mode puts into a batch.
WINDOWS_BY_MODE: dict[str, tuple[str, ...]] = {"ssl": SSL_WINDOWS, "clip": ("video",), "views": ("video",)}

#: Every window name any mode uses.
ALL_WINDOWS: tuple[str, ...] = (*SSL_WINDOWS, "video")
