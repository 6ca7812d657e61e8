"""The playground page at ``/``: static HTML, JavaScript and CSS shipped in
the package (``serve/static/``; no build step, nothing from a CDN) that
drives the API from a browser — search with filters and the hybrid switch,
RAG with its sources, classification, streaming generation, a streamed
chat (/v1/chat/completions, the conversation kept in the page), embedding
similarity, image search with the timing breakdown, live metrics.

It sends the API key it is given (``Authorization: Bearer``) on every
request, and asks for one when a request is answered 401 or 403; the key
stays in the tab's sessionStorage. Panels whose model is not configured
show the server's own 503 message.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

from .errors import APIError

STATIC = Path(__file__).with_name("static")
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


def mount_files(app: FastAPI, url: str, directory: Path, assets: dict[str, str], what: str,
                cache_control: str) -> None:
    """GET ``url``/{name} for the files named in ``assets`` (name -> media type)
    from ``directory``; any other name is a 404 naming it (never a path)."""

    @app.get(url + "/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in assets:
            raise APIError(404, f"no {what} file {name!r}", param="name")
        return FileResponse(directory / name, media_type=assets[name], headers={"Cache-Control": cache_control})


def mount_playground(app: FastAPI) -> None:
    """GET / (the page) and GET /playground/{app.js,style.css}."""

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})

    mount_files(app, "/playground", STATIC, ASSETS, "playground", "no-cache")
