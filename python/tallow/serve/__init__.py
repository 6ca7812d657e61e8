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


def serve(config: ServeConfig) -> None:
    import logging

    import uvicorn

    logging.basicConfig(level=config.server.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(config=config)
    uvicorn.run(app, host=config.server.host, port=config.server.port, log_level=config.server.log_level,
                timeout_graceful_shutdown=max(1, round(config.server.request_timeout_s)))


__all__ = ["create_app", "load_config", "serve", "ServeConfig", "ConfigError"]
