"""The compiled-module cache trusts nothing someone else could have written:
a compiled module is native code, and its HMAC key lives beside it."""

from __future__ import annotations

import os
import secrets
import shutil
import threading

import pytest

from fn_helpers import spec

from tallow.functions.runtime import FnRequest, ModuleCache, UnsafeCacheError

OTHER_UID = 54321  # a user that is not us (the tests may run as root: chown works)


def _chown_other(path, **kw):
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user")
    os.chown(path, OTHER_UID, OTHER_UID, **kw)


def _filled(tmp_path, make_runtime, name="c"):
    """A cache directory holding hello's compiled module and a key, made by tallow."""
    d = tmp_path / name
    make_runtime(spec("hello"), cache_dir=d)
    return d


@pytest.mark.parametrize("mode", [0o770, 0o777, 0o720, 0o702])
def test_a_directory_others_can_write_is_refused_not_repaired(tmp_path, mode):
    d = tmp_path / "shared"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(UnsafeCacheError, match=rf"{d}.*writable by group or others"):
        ModuleCache(d)
    assert (d.stat().st_mode & 0o777) == mode  # not silently chmod-ed: what is in it may not be ours
    assert not (d / "cache.key").exists()


def test_a_directory_only_others_can_read_is_tightened(tmp_path):
    d = tmp_path / "readable"
    d.mkdir()
    os.chmod(d, 0o755)
    ModuleCache(d)
    assert (d.stat().st_mode & 0o777) == 0o700 and ((d / "cache.key").stat().st_mode & 0o777) == 0o600


def test_a_planted_key_and_module_in_a_shared_directory_are_never_loaded(tmp_path, make_runtime):
    """Someone who can write in the directory plants a key of theirs and a module MAC'd with it."""
    planted = _filled(tmp_path, make_runtime, "attacker")
    victim = tmp_path / "victim"
    victim.mkdir()
    os.chmod(victim, 0o777)
    for f in planted.iterdir():
        shutil.copy(f, victim / f.name)
        _chown_other(victim / f.name)
    with pytest.raises(UnsafeCacheError, match="writable by group or others"):
        make_runtime(spec("hello"), cache_dir=victim)


def test_a_key_owned_by_another_user_is_refused(tmp_path, make_runtime):
    d = _filled(tmp_path, make_runtime)
    _chown_other(d / "cache.key")
    with pytest.raises(UnsafeCacheError, match=rf"{d / 'cache.key'} belongs to uid {OTHER_UID}"):
        ModuleCache(d)


def test_a_directory_owned_by_another_user_is_refused(tmp_path, make_runtime):
    d = _filled(tmp_path, make_runtime)
    _chown_other(d)
    with pytest.raises(UnsafeCacheError, match=rf"{d} belongs to uid {OTHER_UID}"):
        ModuleCache(d)


def test_a_key_others_could_read_or_a_symlinked_key_is_refused(tmp_path, make_runtime):
    d = _filled(tmp_path, make_runtime)
    os.chmod(d / "cache.key", 0o644)
    with pytest.raises(UnsafeCacheError, match=r"cache.key has mode 0644"):
        ModuleCache(d)
    elsewhere = tmp_path / "key"
    elsewhere.write_bytes(secrets.token_bytes(32))
    os.chmod(elsewhere, 0o600)
    (d / "cache.key").unlink()
    (d / "cache.key").symlink_to(elsewhere)
    with pytest.raises(UnsafeCacheError, match=r"cache.key is a symbolic link"):
        ModuleCache(d)


def test_a_short_key_is_refused(tmp_path, make_runtime):
    d = _filled(tmp_path, make_runtime)
    os.chmod(d / "cache.key", 0o600)
    (d / "cache.key").write_bytes(b"")
    with pytest.raises(UnsafeCacheError, match=r"cache.key is 0 bytes long"):
        ModuleCache(d)


def test_a_key_being_made_is_never_read_half_written(tmp_path, monkeypatch):
    """Two caches start at once on a new directory: the one that is slow between creating its key
    file and writing it (held in os.fdopen, which any implementation calls between the two) never
    shows the other a partial key; both end up with the same key."""
    from tallow.functions import cache as cache_module

    d = tmp_path / "new"
    gate, slow_started = threading.Event(), threading.Event()
    first = threading.Lock()

    class SlowFdopen:  # the cache module's os, its first fdopen held until the gate opens
        def __getattr__(self, name):
            return getattr(os, name)

        @staticmethod
        def fdopen(*args, **kwargs):
            if first.acquire(blocking=False):  # only the first caller is slow
                slow_started.set()
                assert gate.wait(30)
            return os.fdopen(*args, **kwargs)

    monkeypatch.setattr(cache_module, "os", SlowFdopen())
    made: dict = {}

    def make(name):
        try:
            made[name] = ModuleCache(d)._mac_key
        except BaseException as exc:  # noqa: BLE001 - reported below
            made[name] = exc

    slow = threading.Thread(target=make, args=("slow",))
    d.mkdir(mode=0o700)
    slow.start()
    assert slow_started.wait(30)
    make("fast")  # runs while the slow one is between creating its key and writing it
    gate.set()
    slow.join(30)
    assert isinstance(made["fast"], bytes), made["fast"]
    assert isinstance(made["slow"], bytes), made["slow"]
    assert made["fast"] == made["slow"] == (d / "cache.key").read_bytes() and len(made["fast"]) == 32
    assert sorted(p.name for p in d.iterdir()) == ["cache.key"]  # no temporary file left


def test_a_cache_that_passes_the_checks_still_loads(tmp_path, make_runtime):
    d = _filled(tmp_path, make_runtime)
    rt = make_runtime(spec("hello"), cache_dir=d)
    assert rt.functions["hello"].from_cache and rt.call("hello", FnRequest()).status == 200
