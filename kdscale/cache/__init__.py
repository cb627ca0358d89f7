"""The teacher-logit cache: computed once by `kdscale cache`, read by every student run.

See `kdscale.cache.format` for the on-disk layout.
"""

from kdscale.cache.collator import TeacherLogitsCollator
from kdscale.cache.format import CacheError, CacheManifest, CacheMismatchError, read_manifest
from kdscale.cache.reader import LogitCache
from kdscale.cache.writer import CacheWriter

__all__ = [
    "CacheError",
    "CacheManifest",
    "CacheMismatchError",
    "CacheWriter",
    "LogitCache",
    "TeacherLogitsCollator",
    "read_manifest",
]
