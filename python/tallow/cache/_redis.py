"""Redis feature cache (redis-py) that degrades to no cache while Redis is down."""

from __future__ import annotations

import logging
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from .._extras import import_extra
from ._base import CacheError, FeatureCache, check_key, check_positive_float, check_value

log = logging.getLogger("tallow.cache")

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for messages."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
    except ValueError:
        return "<unparsable url>"


# What _acquire answers: skip Redis (outage, in backoff), use it normally, or
# use it as the one probe that decides whether the outage is over.
_SKIP, _NORMAL, _PROBE = 0, 1, 2


class RedisCache(FeatureCache):
    """Feature cache in Redis, shared by every process that uses the same
    server and ``prefix``.

    A value is stored as its raw little-endian float32 bytes under
    ``prefix + key`` with ``SET ... EX ttl_s`` (``PX`` when ``ttl_s`` is not a
    whole number of seconds). A stored value whose length is not a positive
    multiple of 4 bytes, or that holds non-finite numbers, is treated as
    corrupt: a miss (counted as a miss and an error), never an exception.

    Redis being unreachable, slow (beyond ``timeout_s``, which bounds both the
    connect and each reply) or answering errors is never the caller's problem:
    ``get`` returns None (counted as a miss and an error) and ``put`` does
    nothing (counted as an error). After a failure Redis is skipped -- with no
    network call at all -- for ``backoff_s`` seconds, doubling after each failed
    retry up to ``max_backoff_s``; then a single call (the others keep skipping)
    probes it again. Calls skipped during an outage also count as errors. One
    warning is logged per outage on the ``tallow.cache`` logger, and an INFO
    line when Redis is back.

    Constructing the cache does not connect, so a server can start while its
    Redis is down. redis-py's own retries are switched off (the backoff above
    replaces them)."""

    backend = "redis"

    def __init__(self, url: str, ttl_s: float = 3600, prefix: str = "tallow:feat:", timeout_s: float = 0.25,
                 *, backoff_s: float = 1.0, max_backoff_s: float = 30.0):
        super().__init__()
        if not isinstance(url, str) or not url.startswith(REDIS_SCHEMES):
            raise CacheError(f"Redis url must start with one of {', '.join(REDIS_SCHEMES)}, got {url!r}")
        if not isinstance(prefix, str):
            raise CacheError(f"prefix must be a str, got {type(prefix).__name__}")
        self.ttl_s = check_positive_float("ttl_s", ttl_s)
        self.timeout_s = check_positive_float("timeout_s", timeout_s)
        self.backoff_s = check_positive_float("backoff_s", backoff_s)
        self.max_backoff_s = max(self.backoff_s, check_positive_float("max_backoff_s", max_backoff_s))
        self.prefix = prefix
        self.url = redact_url(url)
        if self.ttl_s.is_integer():
            self._ttl_kw = {"ex": int(self.ttl_s)}
        else:
            self._ttl_kw = {"px": max(1, round(self.ttl_s * 1000))}

        redis = import_extra("redis", "redis", "the Redis feature cache")
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        try:
            self._client = redis.Redis.from_url(
                url, socket_timeout=self.timeout_s, socket_connect_timeout=self.timeout_s,
                retry=Retry(NoBackoff(), 0), retry_on_timeout=False, health_check_interval=0,
                decode_responses=False)
        except (ValueError, TypeError) as exc:
            raise CacheError(f"bad Redis url {self.url!r}: {exc}") from None

        self._state_lock = threading.Lock()
        self._closed = False
        self._outage_since: float | None = None  # monotonic time of the first failure; None while up
        self._outage_errors = 0
        self._backoff = 0.0
        self._retry_at = 0.0
        self._probing = False
        self._warned_corrupt = False

    # -- the protocol ---------------------------------------------------------

    def get(self, key: str) -> np.ndarray | None:
        name = self.prefix + check_key(key)
        if self._closed:
            self._count(misses=1)
            return None
        mode = self._acquire()
        if mode == _SKIP:
            self._count(misses=1, errors=1)
            return None
        try:
            raw = self._client.get(name)
        except Exception as exc:  # noqa: BLE001 -- a cache never fails its caller
            self._failed(exc, mode)
            self._count(misses=1, errors=1)
            return None
        self._succeeded(mode)
        if raw is None:
            self._count(misses=1)
            return None
        arr = self._decode(raw)
        if arr is None:
            self._corrupt(name, raw)
            self._count(misses=1, errors=1)
            return None
        self._count(hits=1)
        return arr

    def put(self, key: str, value: np.ndarray) -> None:
        name = self.prefix + check_key(key)
        payload = check_value(value).astype("<f4", copy=False).tobytes()
        if self._closed:
            return
        mode = self._acquire()
        if mode == _SKIP:
            self._count(errors=1)
            return
        try:
            self._client.set(name, payload, **self._ttl_kw)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc, mode)
            self._count(errors=1)
            return
        self._succeeded(mode)

    def close(self) -> None:
        """Closes the connections; later calls miss / do nothing (not errors)."""
        self._closed = True
        try:
            self._client.close()
        except Exception:  # noqa: BLE001
            pass

    def __repr__(self) -> str:
        return f"RedisCache({self.url!r}, ttl_s={self.ttl_s}, prefix={self.prefix!r}, timeout_s={self.timeout_s})"

    # -- values ---------------------------------------------------------------

    @staticmethod
    def _decode(raw: object) -> np.ndarray | None:
        if not isinstance(raw, bytes) or not raw or len(raw) % 4:
            return None
        arr = np.frombuffer(raw, dtype="<f4").astype(np.float32)  # a native-order, writable copy
        if not np.isfinite(arr).all():
            return None
        return arr

    def _corrupt(self, name: str, raw: object) -> None:
        size = len(raw) if isinstance(raw, (bytes, str)) else type(raw).__name__
        if not self._warned_corrupt:
            self._warned_corrupt = True
            log.warning("Redis feature cache %s: value at %r is not a float32 vector (%s bytes); treated as a miss "
                        "(further corrupt values are logged at DEBUG and counted in errors)", self.url, name, size)
        else:
            log.debug("Redis feature cache %s: corrupt value at %r (%s bytes)", self.url, name, size)

    # -- outage handling ------------------------------------------------------

    def _acquire(self) -> int:
        if self._outage_since is None:  # the common case, without taking the lock
            return _NORMAL
        with self._state_lock:
            if self._outage_since is None:
                return _NORMAL
            if self._probing or time.monotonic() < self._retry_at:
                self._outage_errors += 1
                return _SKIP
            self._probing = True
            return _PROBE

    def _succeeded(self, mode: int) -> None:
        if mode != _PROBE:
            return
        with self._state_lock:
            since, errors = self._outage_since, self._outage_errors
            self._outage_since, self._outage_errors = None, 0
            self._backoff = self._retry_at = 0.0
            self._probing = False
        if since is not None:
            log.info("Redis feature cache %s is back after %.1f s (%d failed or skipped calls)",
                     self.url, time.monotonic() - since, errors)

    def _failed(self, exc: BaseException, mode: int) -> None:
        now = time.monotonic()
        with self._state_lock:
            if mode == _PROBE:
                self._probing = False
            new_outage = self._outage_since is None
            if new_outage:
                self._outage_since = now
                self._backoff = self.backoff_s
                self._retry_at = now + self._backoff
            elif mode == _PROBE:
                # only the probe's failure lengthens the backoff: calls that were
                # already in flight when Redis went away do not
                self._backoff = min(self._backoff * 2, self.max_backoff_s)
                self._retry_at = now + self._backoff
            self._outage_errors += 1
            backoff = self._backoff
        if new_outage:
            log.warning("Redis feature cache %s unavailable (%s: %s); serving without it, retrying in %.3g s "
                        "(then backing off up to %.3g s)", self.url, type(exc).__name__, exc, backoff,
                        self.max_backoff_s)
            # drop the other pooled connections too: after a restart they would
            # each fail once more on their dead sockets
            try:
                self._client.connection_pool.disconnect()
            except Exception:  # noqa: BLE001
                pass
        else:
            log.debug("Redis feature cache %s still unavailable (%s: %s); next retry in %.1f s",
                      self.url, type(exc).__name__, exc, backoff)
