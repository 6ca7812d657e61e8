"""tallow serve: the HTTP server (FastAPI on uvicorn).

- ``create_app(engine=None, config=None)``: the ASGI app, to run or to mount
  inside another ASGI application (see ``tallow.serve.app``).
- ``load_config(path=None, **overrides)``: settings from tallow.toml.
- ``serve(config)``: runs uvicorn until SIGINT/SIGTERM; in-flight requests
  finish, then the index and metadata are flushed.
"""

from __future__ import annotations

from .._extras import require

require("serve", "tallow serve (the HTTP server and its ASGI app)")

from .app import create_app  # noqa: E402  (after the check: fastapi may be missing)
from .config import ConfigError, ServeConfig, load_config


class ListenError(OSError):
    """``tallow serve`` cannot listen where it was asked to (a port in use, an
    address this machine does not have); the message says which and what to do."""


def bind_listeners(host: str, port: int) -> list:
    """Listening sockets on every address ``host`` resolves to (as uvicorn's own
    ``loop.create_server`` would bind: IPv6 sockets v6-only, addresses reused),
    bound before any model loads: a busy port is reported at once, not after a
    minute of loading, and no other process can take it while models load."""
    import errno
    import socket

    where = f"{host}:{port}"
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(errno.EADDRNOTAVAIL, f"cannot listen on {where}: {exc.strerror}") from None
    sockets: list = []
    try:
        for family, address in dict.fromkeys((info[0], info[4][:2]) for info in infos):  # once each
            sockets.append(socket.create_server(address, family=family, backlog=2048))
    except OSError as exc:
        for sock in sockets:
            sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ListenError(exc.errno, f"{where} is already in use (another tallow serve?): stop that process, "
                                         "or pick another port with --port N (or [server] port in tallow.toml)") from None
        raise ListenError(exc.errno, f"cannot listen on {where}: {exc.strerror or exc}") from None
    return sockets


def serve(config: ServeConfig, *, config_reason: str = "") -> None:
    """Runs the server until SIGINT/SIGTERM. Raises ListenError before loading
    anything when it cannot listen (the port is taken)."""
    import logging

    import uvicorn

    logging.basicConfig(level=config.server.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("tallow.serve")
    if config.source:
        log.info("configuration: %s%s", config.source, f" ({config_reason})" if config_reason else "")
    else:
        log.info("configuration: no file read%s", f" ({config_reason})" if config_reason else
                 " (the embedded defaults)")
    sockets = bind_listeners(config.server.host, config.server.port)
    try:
        app = create_app(config=config)
        server = uvicorn.Server(uvicorn.Config(app, host=config.server.host, port=config.server.port,
                                               log_level=config.server.log_level,
                                               timeout_graceful_shutdown=max(1, round(config.server.request_timeout_s))))
        server.run(sockets=sockets)
    finally:
        for sock in sockets:
            sock.close()


__all__ = ["create_app", "load_config", "serve", "bind_listeners", "ListenError", "ServeConfig", "ConfigError"]
