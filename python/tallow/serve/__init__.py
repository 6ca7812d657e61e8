"""tallow serve: the HTTP server (FastAPI on uvicorn).

- ``create_app(engine=None, config=None)``: the ASGI app, to run or to mount
  inside another ASGI application (see ``tallow.serve.app``).
- ``load_config(path=None, **overrides)``: settings from tallow.toml.
- ``serve(config)``: runs uvicorn until SIGINT/SIGTERM; in-flight requests
  finish, then the index and metadata are flushed.
"""

from __future__ import annotations

from .app import create_app
from .config import ConfigError, ServeConfig, load_config


class PortInUse(OSError):
    """The address ``tallow serve`` was asked to listen on is taken."""


def bind_listener(host: str, port: int):
    """A listening socket on (host, port), bound before any model loads: a busy
    port is reported at once, not after a minute of loading, and no other
    process can take the port while the models load."""
    import errno
    import socket

    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses TIME_WAIT ports
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUse(exc.errno, f"{host}:{port} is already in use (another tallow serve?): "
                                       f"stop that process, or pick another port with --port N "
                                       f"(or [server] port in tallow.toml)") from None
        raise PortInUse(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def serve(config: ServeConfig, *, config_reason: str = "") -> None:
    """Runs the server until SIGINT/SIGTERM. Raises PortInUse before loading
    anything when the port is taken."""
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
    sock = bind_listener(config.server.host, config.server.port)
    try:
        app = create_app(config=config)
        server = uvicorn.Server(uvicorn.Config(app, host=config.server.host, port=config.server.port,
                                               log_level=config.server.log_level,
                                               timeout_graceful_shutdown=max(1, round(config.server.request_timeout_s))))
        server.run(sockets=[sock])
    finally:
        sock.close()


__all__ = ["create_app", "load_config", "serve", "bind_listener", "PortInUse", "ServeConfig", "ConfigError"]
