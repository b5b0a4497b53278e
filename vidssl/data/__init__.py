"""``vidssl.data``: the streaming clip loader (see docs/data.md).

    from vidssl.data import DataConfig, build_loader
    loader = build_loader(DataConfig(dataset="shards/digits", mode="ssl"), rank=0, world_size=1)

Importing this package is cheap: torch and the decoders load when a loader is built.
"""

from vidssl.data.config import DataConfig

__all__ = ["DataConfig", "build_loader", "VideoLoader"]


def __getattr__(name):
    if name in ("build_loader", "VideoLoader"):
        from vidssl.data import loader  # noqa: PLC0415 - keeps `vidssl --help` free of torch

        return getattr(loader, name)
    raise AttributeError(f"module 'vidssl.data' has no attribute {name!r}")
