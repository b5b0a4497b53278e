"""``vidssl shard``: raw footage → atomic, reproducible WebDataset shards with an index.

Public API (the loader's tests build datasets through it)::

    from vidssl.shard import ShardConfig, run_shard, verify_dataset, merge_index, dataset_info
    cfg = ShardConfig(sources=["/videos", "/lists/train.csv"], output="/data/shards/train",
                      shard_samples=8, short_side=64, gop=8, workers=2)
    summary = run_shard(cfg)            # dict: samples, shards, rejected, seconds, ...
    problems = verify_dataset("/data/shards/train")   # [] when the dataset is consistent

The format written is docs/formats.md; the user guide is docs/sharding.md.

The names are imported on first use (PEP 562): a worker process imports only
``vidssl.shard.transcode``, not the config and pipeline machinery (~60 ms per worker start).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vidssl.shard.config import ShardConfig
    from vidssl.shard.pipeline import dataset_info, merge_index, run_shard
    from vidssl.shard.verify import verify_dataset

_EXPORTS = {"ShardConfig": "vidssl.shard.config", "run_shard": "vidssl.shard.pipeline",
            "merge_index": "vidssl.shard.pipeline", "dataset_info": "vidssl.shard.pipeline",
            "verify_dataset": "vidssl.shard.verify"}

__all__ = ["ShardConfig", "run_shard", "verify_dataset", "merge_index", "dataset_info"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vidssl.shard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
