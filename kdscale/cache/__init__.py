"""The teacher-logit cache: computed once by `kdscale cache`, read by every student run.

See `kdscale.cache.format` for the on-disk layout and `kdscale.cache.writer` for how several
processes write one cache.
"""

from kdscale.cache.collator import TeacherLogitsCollator
from kdscale.cache.format import CacheError, CacheManifest, CacheMismatchError, read_manifest
from kdscale.cache.reader import LogitCache, TopK
from kdscale.cache.sidecar import finished_shards
from kdscale.cache.writer import CacheWriter, clear_partial, finalize_cache, write_shard

__all__ = [
    "CacheError",
    "CacheManifest",
    "CacheMismatchError",
    "CacheWriter",
    "LogitCache",
    "TeacherLogitsCollator",
    "TopK",
    "clear_partial",
    "finalize_cache",
    "finished_shards",
    "read_manifest",
    "write_shard",
]
