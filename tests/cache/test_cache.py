"""tallow.cache: the in-process LRU, the null cache, make_cache's dispatch, and
the Redis cache against a real redis-server (tests/redis_server.py), including
Redis dying, hanging and coming back."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import uuid

import numpy as np
import pytest
import redis

from tallow.cache import CacheError, FeatureCache, LRUCache, NullCache, RedisCache, make_cache

DIM = 2048  # ResNet-50 features


def vec(i: float, dim: int = DIM) -> np.ndarray:
    return np.full(dim, i, dtype=np.float32) + np.arange(dim, dtype=np.float32) / dim


def key(i: int) -> str:
    return f"{i:064x}"


class ManualClock:
    """The Redis cache's clock, moved only by the test: its backoff decisions
    then depend on what the test did, not on how fast this machine runs."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


class NetworkCalls:
    """Counts the calls that reached the Redis client (a skipped call never does)."""

    def __init__(self, client):
        self._client = client
        self.count = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        attr = getattr(self._client, name)
        if name not in ("get", "set"):
            return attr

        def counted(*args, **kwargs):
            with self._lock:
                self.count += 1
            return attr(*args, **kwargs)

        return counted


def instrument(cache, monkeypatch) -> tuple[ManualClock, NetworkCalls]:
    import tallow.cache._redis as redis_module

    clock = ManualClock()
    monkeypatch.setattr(redis_module, "time", clock)
    calls = NetworkCalls(cache._client)
    cache._client = calls
    return clock, calls


def assert_bounded_network_calls(cache) -> None:
    """A call that does reach Redis waits at most timeout_s (connect and reply)
    and is never retried by redis-py: with the skips, nothing can hang."""
    kw = cache._client.connection_pool.connection_kwargs
    assert kw["socket_timeout"] == kw["socket_connect_timeout"] == cache.timeout_s
    assert cache._client.get_retry()._retries == 0


@pytest.fixture
def prefix():
    """A key prefix of this test's own on the shared server."""
    return f"tallow-test:{uuid.uuid4().hex}:"


@pytest.fixture
def closing():
    """closing(cache) -> cache, closed after the test."""
    caches: list[FeatureCache] = []

    def add(cache):
        caches.append(cache)
        return cache

    yield add
    for cache in caches:
        cache.close()


@pytest.fixture
def raw_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cache_records(caplog, level):
    return [r for r in caplog.records if r.name == "tallow.cache" and r.levelno == level]


# -- LRU ------------------------------------------------------------------------


def test_lru_round_trip_returns_float32_copies():
    cache = LRUCache()
    assert cache.backend == "lru"
    assert cache.get(key(1)) is None
    original = np.arange(DIM, dtype=np.float64)
    cache.put(key(1), original)
    original[:] = -1  # the cache holds its own copy
    got = cache.get(key(1))
    assert got.dtype == np.float32 and got.shape == (DIM,) and got.flags.writeable
    np.testing.assert_array_equal(got, np.arange(DIM, dtype=np.float32))
    got[:] = 7  # and hands out copies
    np.testing.assert_array_equal(cache.get(key(1)), np.arange(DIM, dtype=np.float32))
    assert cache.stats() == {"backend": "lru", "hits": 2, "misses": 1, "errors": 0, "entries": 1}


def test_lru_accepts_lists_ints_and_strided_views():
    cache = LRUCache()
    cache.put("a", [1, 2, 3])
    cache.put("b", np.arange(10, dtype=np.int64)[::3])
    np.testing.assert_array_equal(cache.get("a"), np.array([1, 2, 3], np.float32))
    np.testing.assert_array_equal(cache.get("b"), np.array([0, 3, 6, 9], np.float32))


def test_lru_evicts_least_recently_used_by_count():
    cache = LRUCache(max_entries=3)
    for i in range(3):
        cache.put(key(i), vec(i))
    assert cache.get(key(0)) is not None  # 0 is now the most recently used
    cache.put(key(3), vec(3))  # evicts 1
    assert key(1) not in cache
    assert all(cache.get(key(i)) is not None for i in (0, 2, 3))
    assert cache.stats()["entries"] == 3
    cache.put(key(2), vec(20))  # replacing does not evict
    assert len(cache) == 3
    np.testing.assert_array_equal(cache.get(key(2)), vec(20))


def test_lru_evicts_by_bytes():
    one = DIM * 4
    cache = LRUCache(max_entries=100, max_bytes=3 * one)
    for i in range(3):
        cache.put(key(i), vec(i))
    assert cache.nbytes == 3 * one
    cache.put(key(3), vec(3))
    assert key(0) not in cache and len(cache) == 3 and cache.nbytes == 3 * one
    # one bigger vector pushes out as many as it needs
    cache.put(key(4), vec(4, dim=2 * DIM))
    assert [k in cache for k in map(key, (1, 2, 3, 4))] == [False, False, True, True]
    assert cache.nbytes == 3 * one
    # a value over the whole budget is not stored, and drops the old one under its key
    cache.put(key(3), vec(3, dim=4 * DIM))
    assert key(3) not in cache and key(4) in cache and cache.nbytes == 2 * one


def test_lru_close_empties_it():
    cache = LRUCache()
    cache.put("k", vec(1))
    cache.close()
    assert cache.get("k") is None and cache.stats()["entries"] == 0 and cache.nbytes == 0


def test_lru_concurrent_get_put_is_consistent():
    """8 threads hammer 64 keys through a 16-entry cache: every hit is the
    vector that was stored under its key, and the bookkeeping adds up."""
    dim = 64
    cache = LRUCache(max_entries=16, max_bytes=12 * dim * 4)
    n_threads, n_ops = 8, 2000
    wrong: list[str] = []
    barrier = threading.Barrier(n_threads)

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        barrier.wait()
        for _ in range(n_ops):
            i = int(rng.integers(64))
            if rng.random() < 0.5:
                cache.put(key(i), np.full(dim, i, np.float32))
            else:
                got = cache.get(key(i))
                if got is not None and not (got.shape == (dim,) and (got == i).all()):
                    wrong.append(key(i))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
    stats = cache.stats()
    assert stats["errors"] == 0
    assert 0 < stats["hits"] + stats["misses"] < n_threads * n_ops
    assert stats["entries"] == len(cache) <= 12
    assert cache.nbytes == len(cache) * dim * 4


# -- validation -----------------------------------------------------------------

BAD_KEYS = [b"ab", 1, None, "", ("a",)]
BAD_VALUES = [
    pytest.param(np.zeros((2, 3), np.float32), "1-D", id="2d"),
    pytest.param(np.float32(1.0), "1-D", id="scalar"),
    pytest.param(np.zeros(0, np.float32), "empty", id="empty"),
    pytest.param(np.array([1.0, np.nan]), "element 1", id="nan"),
    pytest.param(np.array([np.inf, 1.0], np.float32), "element 0", id="inf"),
    pytest.param(np.array([0.0, 1e39]), "finite as float32", id="overflows-float32"),
    pytest.param(np.array(["1", "2"]), "dtype", id="strings"),
    pytest.param(np.array([1 + 2j]), "dtype", id="complex"),
    pytest.param([[1.0], [2.0, 3.0]], "1-D float array", id="ragged"),
]


def _all_caches(closing):
    # the Redis one points at a port nobody listens on: argument checks come first
    return [LRUCache(), NullCache(), closing(RedisCache(f"redis://127.0.0.1:{_dead_port()}/0"))]


@pytest.mark.parametrize("bad", BAD_KEYS, ids=repr)
def test_bad_keys_raise(bad, closing):
    for cache in _all_caches(closing):
        with pytest.raises(CacheError, match="key"):
            cache.get(bad)
        with pytest.raises(CacheError, match="key"):
            cache.put(bad, vec(1))
        assert cache.stats()["errors"] == 0


@pytest.mark.parametrize(("bad", "message"), BAD_VALUES)
def test_bad_values_raise(bad, message, closing):
    for cache in _all_caches(closing):
        with pytest.raises(CacheError, match=message):
            cache.put("k", bad)
    assert issubclass(CacheError, ValueError)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_entries": 0}, "max_entries"), ({"max_entries": -1}, "max_entries"),
    ({"max_entries": 1.5}, "max_entries"), ({"max_entries": True}, "max_entries"),
    ({"max_bytes": 0}, "max_bytes"), ({"max_bytes": "1"}, "max_bytes"),
])
def test_lru_bad_sizes_raise(kwargs, message):
    with pytest.raises(CacheError, match=message):
        LRUCache(**kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"ttl_s": 0}, "ttl_s"), ({"ttl_s": -1}, "ttl_s"), ({"ttl_s": float("nan")}, "ttl_s"),
    ({"ttl_s": float("inf")}, "ttl_s"), ({"timeout_s": 0}, "timeout_s"), ({"prefix": 3}, "prefix"),
])
def test_redis_bad_arguments_raise(kwargs, message):
    with pytest.raises(CacheError, match=message):
        RedisCache("redis://127.0.0.1:1/0", **kwargs)


def test_null_cache():
    cache = NullCache()
    cache.put("k", vec(1))
    assert cache.get("k") is None
    assert cache.stats() == {"backend": "none", "hits": 0, "misses": 1, "errors": 0, "entries": 0}


# -- make_cache -----------------------------------------------------------------


@pytest.mark.parametrize("url", [None, ""])
def test_make_cache_default_is_lru(url):
    cache = make_cache(url, max_entries=7)
    assert isinstance(cache, LRUCache) and cache.backend == "lru" and cache.max_entries == 7


@pytest.mark.parametrize("url", ["none", "NONE"])
def test_make_cache_none(url):
    assert isinstance(make_cache(url), NullCache)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "rediss://:pw@cache.example:6380/2",
                                 "unix:///tmp/does-not-exist.sock"])
def test_make_cache_redis_does_not_connect(url):
    cache = make_cache(url, ttl_s=60)
    try:
        assert isinstance(cache, RedisCache) and cache.backend == "redis" and cache.ttl_s == 60
        assert "pw" not in repr(cache)
    finally:
        cache.close()


@pytest.mark.parametrize("url", ["memcached://h:11211", "lru", "http://127.0.0.1:6379", "127.0.0.1:6379",
                                 "redis:/missing-slash"])
def test_make_cache_bad_url_names_it(url):
    with pytest.raises(ValueError, match="unknown feature cache url") as info:
        make_cache(url)
    assert isinstance(info.value, CacheError) and repr(url)[1:-1] in str(info.value)


def test_make_cache_bad_url_hides_password():
    with pytest.raises(CacheError) as info:
        make_cache("memcached://user:s3cret@h:11211")
    assert "s3cret" not in str(info.value) and "memcached://user:***@h:11211" in str(info.value)


# -- Redis (real server) --------------------------------------------------------


def test_redis_round_trip_and_stats(redis_url, prefix, raw_client, closing):
    cache = closing(RedisCache(redis_url, prefix=prefix))
    assert cache.get(key(1)) is None
    value = np.linspace(-1, 1, DIM)  # float64 in, float32 stored
    cache.put(key(1), value)
    got = cache.get(key(1))
    assert got.dtype == np.float32 and got.shape == (DIM,) and got.flags.writeable
    np.testing.assert_array_equal(got, value.astype(np.float32))
    got[:] = 0
    np.testing.assert_array_equal(cache.get(key(1)), value.astype(np.float32))
    # stored as the raw little-endian float32 bytes, with SET ... EX 3600
    assert raw_client.get(prefix + key(1)) == value.astype("<f4").tobytes()
    assert 3590 <= raw_client.ttl(prefix + key(1)) <= 3600
    assert cache.stats() == {"backend": "redis", "hits": 2, "misses": 1, "errors": 0, "entries": None}
    # another prefix is another namespace
    other = closing(RedisCache(redis_url, prefix=prefix + "other:"))
    assert other.get(key(1)) is None


def test_redis_ttl_expires(redis_url, prefix, raw_client, closing):
    cache = closing(RedisCache(redis_url, ttl_s=1, prefix=prefix))
    cache.put("k", vec(1))
    assert cache.get("k") is not None
    frac = closing(RedisCache(redis_url, ttl_s=0.5, prefix=prefix))  # sub-second: SET ... PX 500
    frac.put("f", vec(2))
    assert 0 < raw_client.pttl(prefix + "f") <= 500
    time.sleep(1.1)
    assert cache.get("k") is None and frac.get("f") is None
    assert raw_client.exists(prefix + "k", prefix + "f") == 0


@pytest.mark.parametrize("raw", [b"abc", b"", b"\x00" * 6, np.array([1, np.nan], "<f4").tobytes()],
                         ids=["3-bytes", "empty", "6-bytes", "nan"])
def test_redis_corrupt_value_is_a_miss(raw, redis_url, prefix, raw_client, closing, caplog):
    caplog.set_level(logging.DEBUG, logger="tallow.cache")
    cache = closing(RedisCache(redis_url, prefix=prefix))
    raw_client.set(prefix + "k", raw)
    assert cache.get("k") is None
    assert cache.get("k") is None
    assert cache.stats() == {"backend": "redis", "hits": 0, "misses": 2, "errors": 2, "entries": None}
    assert len(_cache_records(caplog, logging.WARNING)) == 1  # once per cache, then DEBUG
    # still usable: a good value overwrites it
    cache.put("k", vec(3))
    np.testing.assert_array_equal(cache.get("k"), vec(3))


def test_redis_concurrent_get_put(redis_url, prefix, closing):
    cache = closing(RedisCache(redis_url, prefix=prefix))
    wrong: list[int] = []

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(150):
            i = int(rng.integers(16))
            if rng.random() < 0.5:
                cache.put(key(i), np.full(256, i, np.float32))
            else:
                got = cache.get(key(i))
                if got is not None and not (got.shape == (256,) and (got == i).all()):
                    wrong.append(i)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong and cache.stats()["errors"] == 0


def test_redis_close_then_calls_are_quiet(redis_url, prefix):
    cache = RedisCache(redis_url, prefix=prefix)
    cache.put("k", vec(1))
    cache.close()
    cache.put("k", vec(2))
    assert cache.get("k") is None
    assert cache.stats()["errors"] == 0
    cache.close()


def test_redis_never_reachable(closing, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="tallow.cache")
    cache = closing(RedisCache(f"redis://127.0.0.1:{_dead_port()}/0"))
    clock, calls = instrument(cache, monkeypatch)
    for i in range(20):
        assert cache.get(key(i)) is None
        cache.put(key(i), vec(i))
    assert calls.count == 1  # the first call found it down; the others skipped it within the backoff
    assert_bounded_network_calls(cache)
    assert cache.stats() == {"backend": "redis", "hits": 0, "misses": 20, "errors": 40, "entries": None}
    clock.now += cache.backoff_s  # the backoff has passed: one probe, which fails too
    assert cache.get(key(0)) is None and cache.get(key(1)) is None
    assert calls.count == 2
    warnings = _cache_records(caplog, logging.WARNING)
    assert len(warnings) == 1 and "unavailable" in warnings[0].getMessage()


def test_redis_backoff_doubles_up_to_the_cap(closing):
    cache = closing(RedisCache(f"redis://127.0.0.1:{_dead_port()}/0", backoff_s=0.05, max_backoff_s=0.2))
    seen: list[float] = []
    last_retry = None
    deadline = time.monotonic() + 5
    while len(seen) < 4 and time.monotonic() < deadline:
        cache.get("k")
        if not seen or cache._backoff != seen[-1] or cache._retry_at != last_retry:
            seen.append(cache._backoff)
            last_retry = cache._retry_at
        time.sleep(0.01)
    assert seen == [0.05, 0.1, 0.2, 0.2]


def test_redis_outage_and_recovery_on_the_same_port(redis_server_factory, caplog, closing, monkeypatch):
    """Redis stopped mid-use: calls skip it and stay quiet, errors are counted,
    one warning; a new server on the same port is used again once the
    backoff (default 1 s, on the cache's clock) has passed, with an INFO line."""
    caplog.set_level(logging.INFO, logger="tallow.cache")
    server = redis_server_factory()
    cache = closing(RedisCache(server.url))
    clock, calls = instrument(cache, monkeypatch)
    cache.put("a", vec(1))
    np.testing.assert_array_equal(cache.get("a"), vec(1))

    server.stop()
    before = calls.count
    for _ in range(5):
        assert cache.get("a") is None
        cache.put("b", vec(2))
    assert calls.count == before + 1  # one call found it down, the others skipped it
    assert cache.stats() == {"backend": "redis", "hits": 1, "misses": 5, "errors": 10, "entries": None}
    assert len(_cache_records(caplog, logging.WARNING)) == 1

    redis_server_factory(port=server.port)  # a fresh (empty) server on the same port
    clock.now += cache.backoff_s * 0.9
    cache.put("c", vec(3))
    assert cache.get("c") is None  # within the backoff the restarted server is not tried yet
    assert calls.count == before + 1
    clock.now += cache.backoff_s * 0.1
    cache.put("c", vec(3))  # the probe: the server is back
    got = cache.get("c")
    assert got is not None, "the cache did not use the restarted Redis"
    np.testing.assert_array_equal(got, vec(3))
    infos = [r for r in _cache_records(caplog, logging.INFO) if "is back" in r.getMessage()]
    assert len(infos) == 1
    assert len(_cache_records(caplog, logging.WARNING)) == 1
    errors = cache.stats()["errors"]
    assert cache.get("a") is None  # the new server is empty: a plain miss
    cache.put("d", vec(4))
    assert cache.get("d") is not None and cache.stats()["errors"] == errors


def test_redis_hung_server_costs_one_timeout(redis_server_factory, closing, monkeypatch):
    """A frozen Redis (SIGSTOP: connects succeed, replies never come): the
    calls in flight time out after timeout_s, every later call skips Redis
    without waiting, and after SIGCONT the cache recovers."""
    server = redis_server_factory()
    cache = closing(RedisCache(server.url, timeout_s=0.2, backoff_s=0.5))
    clock, calls = instrument(cache, monkeypatch)
    cache.put("a", vec(1))
    assert cache.get("a") is not None
    before = calls.count
    os.kill(server.pid, signal.SIGSTOP)
    try:
        results: list = []
        lock = threading.Lock()

        def worker() -> None:
            for _ in range(10):
                got = cache.get("a")
                with lock:
                    results.append(got)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a call hung on the frozen Redis"
        assert len(results) == 80 and all(r is None for r in results)
        # Only calls already in flight when the first timed out (one per thread at most) waited on
        # Redis; the clock has not moved, so every later call skipped it (not 80 x timeout_s).
        assert 1 <= calls.count - before <= 8
        assert_bounded_network_calls(cache)
        assert cache.stats()["errors"] == 80
    finally:
        os.kill(server.pid, signal.SIGCONT)
    for _ in range(5):  # probes until the thawed server answers (a stale socket may fail one)
        clock.now += cache._backoff
        if cache.get("a") is not None:
            break
    np.testing.assert_array_equal(cache.get("a"), vec(1))
