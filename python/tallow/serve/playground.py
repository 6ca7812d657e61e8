"""The playground page at ``/``: static HTML, JavaScript and CSS shipped in
the package (``serve/static/``; no build step, nothing from a CDN) that
drives the API from a browser — search with filters and the hybrid switch,
RAG with its sources, classification, streaming generation, embedding
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


def mount_playground(app: FastAPI) -> None:
    """GET / (the page) and GET /playground/{app.js,style.css}."""

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8",
                            headers={"Cache-Control": "no-cache"})

    @app.get("/playground/{name}", include_in_schema=False)
    async def playground_asset(name: str):
        if name not in ASSETS:
            raise APIError(404, f"no playground file {name!r}", param="name")
        return FileResponse(STATIC / name, media_type=ASSETS[name], headers={"Cache-Control": "no-cache"})
