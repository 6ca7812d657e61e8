"""The compiled-module cache: Cranelift's output for a module, on disk.

Files are keyed by the SHA-256 of the module, the wasmtime version and the
engine configuration. A serialised module is native code, so a file is
deserialised only when its HMAC-SHA256, under a key tallow generated in the
cache directory (``cache.key``), matches. That is only as strong as the
key's secrecy and the directory's, so tallow refuses (``UnsafeCacheError``,
naming the path) a directory or a key that someone else could have written:

- the directory must belong to this user and not be writable by group or
  others. A directory that is writable by others is refused, not repaired:
  a key and modules may already have been planted in it. One that others
  can only read or list (e.g. 0755 from a umask) is tightened to 0700: no
  one else could have written in it, and the key stays unreadable to them.
- ``cache.key`` must be a regular file (opened with O_NOFOLLOW: a symbolic
  link is refused) of exactly 32 bytes, belonging to this user, with no
  permission for group or others.

Every file is opened relative to one descriptor of the checked directory,
so replacing the path after the check changes nothing. The key is made
race-free: written in full to a temporary file (O_EXCL), then link()ed to
``cache.key``; link() never replaces, so when two processes start at once
one key wins and both use it, and no reader ever sees a partial key.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
from pathlib import Path

from . import _wasmtime  # noqa: F401  (first: names tallow[functions] when wasmtime is missing)
from wasmtime import Engine, Module, WasmtimeError

from .engine import ENGINE_SETTINGS, wasmtime_version
from .modules import describe_module

log = logging.getLogger("tallow.functions")

KEY_NAME = "cache.key"
KEY_BYTES = 32


class UnsafeCacheError(PermissionError):
    """The compiled-module cache's directory or key could have been written by someone else."""


def default_cache_dir() -> Path:
    env = os.environ.get("TALLOW_WASM_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tallow" / "wasm"


_NATIVE = "a compiled module is native code: tallow loads it only from a directory no one else can write to"


class ModuleCache:
    _fd = -1  # the directory, opened (a class default: close() works however __init__ ended)

    def __init__(self, directory: str | Path | None = None):
        self.dir = Path(directory) if directory is not None else default_cache_dir()
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = self._open_dir()
        try:
            self._mac_key = self._key_file()
        except BaseException:
            self.close()
            raise

    # -- the directory and the key --------------------------------------------------------------

    def _open_dir(self) -> int:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            me = os.geteuid()
            if st.st_uid != me:
                raise UnsafeCacheError(f"the module cache {self.dir} belongs to uid {st.st_uid}, not to this user "
                                       f"(uid {me}): not using it ({_NATIVE}). Set TALLOW_WASM_CACHE to a "
                                       f"directory of your own")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o022:
                raise UnsafeCacheError(f"the module cache {self.dir} is writable by group or others (mode "
                                       f"{mode:04o}): not using it ({_NATIVE}; files in it may not be tallow's). "
                                       f"Remove it (tallow makes it again, mode 0700)")
            if mode & 0o077:
                os.fchmod(fd, 0o700)
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _key_file(self) -> bytes:
        path = self.dir / KEY_NAME
        while True:
            try:
                fd = os.open(KEY_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self._fd)
            except FileNotFoundError:
                key = self._create_key()
                if key is not None:
                    return key
                continue  # another process made the key first: use it
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UnsafeCacheError(f"{path} is a symbolic link, not a key tallow wrote: not using the "
                                           f"module cache ({_NATIVE}). Remove {self.dir}") from None
                raise
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                why = None
                if not stat.S_ISREG(st.st_mode):
                    why = "is not a regular file"
                elif st.st_uid != os.geteuid():
                    why = f"belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()})"
                elif stat.S_IMODE(st.st_mode) & 0o077:
                    why = f"has mode {stat.S_IMODE(st.st_mode):04o} (tallow writes it 0600)"
                elif st.st_size != KEY_BYTES:
                    why = f"is {st.st_size} bytes long (tallow writes {KEY_BYTES})"
                data = f.read(KEY_BYTES + 1) if why is None else b""
                if why is None and len(data) != KEY_BYTES:
                    why = f"is {len(data)} bytes long (tallow writes {KEY_BYTES})"
            if why is not None:
                raise UnsafeCacheError(f"{path} {why}: not a key tallow wrote, not using the module cache "
                                       f"({_NATIVE}). Remove {self.dir}")
            return data

    def _create_key(self) -> bytes | None:
        """A new key, written whole before it appears under its name; None if another appeared first."""
        key = secrets.token_bytes(KEY_BYTES)
        return key if self._publish(KEY_NAME, key, replace=False) else None

    def _publish(self, name: str, blob: bytes, *, replace: bool) -> bool:
        """``blob`` under ``name`` in the directory, appearing whole or not at all:
        written to a fresh private file (O_EXCL, 0600, no symlink followed), then
        renamed over ``name`` (``replace``) or linked to it only if it does not exist
        yet (False when it does: another process published first)."""
        tmp = f".{name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=self._fd)
        published = False
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            if replace:
                os.replace(tmp, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
                published = True
                return True
            try:
                os.link(tmp, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
            except FileExistsError:
                return False
            return True
        finally:
            if not published:  # the renamed file is gone from tmp; a linked one has two names
                os.unlink(tmp, dir_fd=self._fd)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self):
        self.close()

    # -- compiled modules -----------------------------------------------------------------------

    @staticmethod
    def key(wasm: bytes) -> str:
        h = hashlib.sha256(wasm)
        h.update(b"\0wasmtime=" + wasmtime_version().encode() + b"\0" + ENGINE_SETTINGS.encode())
        return h.hexdigest()

    def _mac(self, key: str, data: bytes, manifest: bytes) -> bytes:
        h = hmac.new(self._mac_key, key.encode() + b"\0", hashlib.sha256)
        h.update(hashlib.sha256(data).digest())
        h.update(manifest)
        return h.digest()

    @staticmethod
    def names(key: str) -> tuple[str, str]:
        """The serialised module, and tallow's manifest: 32 bytes of HMAC, then the
        module's imports and exports as JSON (so a load needs no introspection)."""
        return f"{key}.cwasm", f"{key}.manifest"

    def _read(self, name: str) -> bytes | None:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=self._fd)
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                return None
            return f.read()

    def load(self, engine: Engine, key: str) -> tuple[Module, dict] | None:
        """The cached module and its description, or None (absent, or not written by tallow: ignored)."""
        data_name, manifest_name = self.names(key)
        data, raw = self._read(data_name), self._read(manifest_name)
        if data is None or raw is None:
            return None
        mac, manifest = raw[:32], raw[32:]
        if not hmac.compare_digest(mac, self._mac(key, data, manifest)):
            log.warning("ignoring %s: its HMAC does not match (not written by this tallow)", self.dir / data_name)
            return None
        try:
            return Module.deserialize(engine, data), json.loads(manifest)
        except (WasmtimeError, ValueError) as exc:
            log.warning("ignoring %s: %s", self.dir / data_name, exc)
            return None

    def store(self, key: str, module: Module, description: dict) -> None:
        data = bytes(module.serialize())
        manifest = json.dumps(description, sort_keys=True).encode()
        for name, blob in zip(self.names(key), (data, self._mac(key, data, manifest) + manifest)):
            self._publish(name, blob, replace=True)

    def get_or_compile(self, engine: Engine, wasm: bytes) -> tuple[Module, dict, bool]:
        """(module, its description, True when it came from the cache)."""
        key = self.key(wasm)
        hit = self.load(engine, key)
        if hit is not None:
            return hit[0], hit[1], True
        module = Module(engine, wasm)
        description = describe_module(module)
        try:
            self.store(key, module, description)
        except OSError as exc:
            log.warning("cannot write the compiled module to %s: %s", self.dir, exc)
        return module, description, False
