"""Modality-blind data code: the prepare/shard stages, shard writing + manifest, and the batch loader.

Everything that differs per modality lives in ``d2v/modalities/<m>/data.py``; this package only calls it.
"""

from d2v.data.loader import LoaderSpec, ShardLoader, budget_keys, build_loader
from d2v.data.shards import (
    BadInput,
    ShardCommon,
    ShardError,
    iter_shard,
    read_manifest,
    verify_shards,
    write_shards,
)
from d2v.data.stages import PrepareCommon, cli_prepare, cli_shard, data_module, prepare_raw, shard

__all__ = [
    "BadInput",
    "LoaderSpec",
    "PrepareCommon",
    "ShardCommon",
    "ShardError",
    "ShardLoader",
    "budget_keys",
    "build_loader",
    "cli_prepare",
    "cli_shard",
    "data_module",
    "iter_shard",
    "prepare_raw",
    "read_manifest",
    "shard",
    "verify_shards",
    "write_shards",
]
