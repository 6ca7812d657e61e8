"""The API docs page at ``/docs``: FastAPI's Swagger UI page, with its
JavaScript, style sheet and icon served by this server (``/docs/assets/``,
vendored in ``serve/static/swagger-ui/``; see the README there for the
version and licence). FastAPI's own page loads them from a CDN, so it is a
blank page on a machine without network access. ReDoc (a second docs page
with its own CDN bundle) is not served.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html

from .playground import STATIC, mount_files

SWAGGER_UI = STATIC / "swagger-ui"
ASSETS = {"swagger-ui-bundle.js": "text/javascript; charset=utf-8",
          "swagger-ui.css": "text/css; charset=utf-8",
          "favicon-32x32.png": "image/png"}
DOCS_URL = "/docs"


def mount_docs(app: FastAPI) -> None:
    """GET /docs and GET /docs/assets/{name} (create the app with
    ``docs_url=None, redoc_url=None``: FastAPI's own pages point at a CDN)."""

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request):
        # Mounted under a prefix (another ASGI app's mount), the URLs carry it.
        root = request.scope.get("root_path", "").rstrip("/")
        assets = f"{root}{DOCS_URL}/assets"
        return get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or "/openapi.json"), title=f"{app.title} — API docs",
            swagger_js_url=f"{assets}/swagger-ui-bundle.js", swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon-32x32.png",
            # validatorUrl: no badge fetched from validator.swagger.io
            swagger_ui_parameters={"validatorUrl": None})

    mount_files(app, DOCS_URL + "/assets", SWAGGER_UI, ASSETS, "docs", "public, max-age=86400")
