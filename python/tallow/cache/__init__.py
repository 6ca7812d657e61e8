"""Feature cache: image features keyed by the image's SHA-256 hex digest.

The server computes a ResNet feature vector once per distinct image; a repeat
upload of the same bytes is answered from the cache. Values are 1-D float32
numpy vectors (e.g. 2048-d ResNet-50 features); keys are non-empty strings.

Choose the backend with a URL (``make_cache(url)``; the server's cache URL
setting is passed through unchanged):

* no URL (None or ``""``): ``LRUCache`` -- in this process, least recently used
  entries evicted beyond ``max_entries`` vectors (default 4096) or 256 MiB of
  vector data, whichever comes first.
* ``redis://[:password@]host:port[/db]``, ``rediss://...`` (TLS) or
  ``unix:///path/to/redis.sock``: ``RedisCache`` -- shared by every server
  process using the same Redis; each vector is stored as raw little-endian
  float32 bytes under ``tallow:feat:<sha256>`` and expires after ``ttl_s``
  seconds (default 3600).
* ``none``: ``NullCache`` -- caches nothing.

Any other URL is an error (``CacheError``, a ``ValueError``) naming it.

A cache never fails a request because of its backend. While Redis is
unreachable, slow (over 0.25 s per call) or answering errors, ``get`` misses
and ``put`` does nothing; Redis is then left alone for 1 s, doubling to at most
30 s between retries, so a dead Redis costs requests nothing. The
``tallow.cache`` logger prints one warning per outage and an INFO line when
Redis is back. A corrupt stored value (not a whole number of finite float32s)
is a miss. Only bad arguments raise ``CacheError``: a key that is not a
non-empty str, a value that is not 1-D, is empty, is not numeric or is not
finite as float32, non-positive sizes / TTL / timeouts.

``stats()`` returns ``{"backend": "lru"|"redis"|"none", "hits", "misses",
"errors", "entries"}``; ``errors`` counts calls that could not use Redis
(failed or skipped during an outage) and corrupt values; ``entries`` is None
for Redis. Every cache is thread-safe.

Example::

    from tallow.cache import make_cache

    cache = make_cache("redis://127.0.0.1:6379/0", ttl_s=600)
    feats = cache.get(sha256_hex)
    if feats is None:
        feats = model(image)
        cache.put(sha256_hex, feats)
"""

from __future__ import annotations

from ._base import CacheError, FeatureCache, NullCache
from ._lru import LRUCache
from ._redis import REDIS_SCHEMES, RedisCache, redact_url

__all__ = ["CacheError", "FeatureCache", "LRUCache", "NullCache", "RedisCache", "make_cache"]


def make_cache(url: str | None = None, *, ttl_s: float = 3600, max_entries: int = 4096) -> FeatureCache:
    """The cache a URL names: None or ``""`` -> ``LRUCache(max_entries)``;
    ``redis://``, ``rediss://``, ``unix://`` -> ``RedisCache(url, ttl_s)``;
    ``"none"`` -> ``NullCache()``. Anything else raises ``CacheError`` (a
    ``ValueError``) naming the URL. Does not connect to Redis."""
    if url is None:
        return LRUCache(max_entries=max_entries)
    if not isinstance(url, str):
        raise CacheError(f"cache url must be a str or None, got {type(url).__name__}")
    text = url.strip()
    if not text:
        return LRUCache(max_entries=max_entries)
    if text.lower() == "none":
        return NullCache()
    if text.startswith(REDIS_SCHEMES):
        return RedisCache(text, ttl_s=ttl_s)
    raise CacheError(f"unknown feature cache url {redact_url(url)!r}: expected none, redis://..., rediss://..., "
                     "unix://... or nothing (in-process LRU)")
