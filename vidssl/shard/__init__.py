"""``vidssl shard``: raw footage → atomic, reproducible WebDataset shards with an index.

Public API (the loader's tests build datasets through it)::

    from vidssl.shard import ShardConfig, run_shard, verify_dataset, merge_index, dataset_info
    cfg = ShardConfig(sources=["/videos", "/lists/train.csv"], output="/data/shards/train",
                      shard_samples=8, short_side=64, gop=8, workers=2)
    summary = run_shard(cfg)            # dict: samples, shards, rejected, seconds, ...
    problems = verify_dataset("/data/shards/train")   # [] when the dataset is consistent

The format written is docs/formats.md; the user guide is docs/sharding.md.
"""

from vidssl.shard.config import ShardConfig
from vidssl.shard.pipeline import dataset_info, merge_index, run_shard
from vidssl.shard.verify import verify_dataset

__all__ = ["ShardConfig", "run_shard", "verify_dataset", "merge_index", "dataset_info"]
