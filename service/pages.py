"""What a browser opens: the demo page at `/` and the API docs at `/docs` and `/redoc`.

Every byte comes from the package (service/static/), so the pages work with no internet: FastAPI's
default docs load Swagger UI and ReDoc from a CDN; here they are vendored (versions and source in
service/static/vendor/README.md). None of these routes is part of the API: they stay out of the
OpenAPI document. URLs are relative, so the pages also work behind a proxy's path prefix.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from service.problems import Problem

STATIC_DIR = Path(__file__).parent / "static"
SWAGGER_UI = "static/vendor/swagger-ui"
REDOC = "static/vendor/redoc"
FAVICON = "static/favicon.svg"

# The browser itself refuses every request off the service: nothing can leak out or hang
# offline (ReDoc 2 shows a logo from cdn.redoc.ly in its sidebar; blocked, it hides itself).
_SELF_ONLY = (
    "default-src 'self'; img-src 'self' data: blob:; font-src 'self' data:; "
    "worker-src 'self' blob:; connect-src 'self'; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'self'"
)
DEMO_HEADERS = {"Content-Security-Policy": _SELF_ONLY}
# Swagger UI and ReDoc start from an inline script and inject inline styles
DOCS_HEADERS = {
    "Content-Security-Policy": f"{_SELF_ONLY}; script-src 'self' 'unsafe-inline'; "
    "style-src 'self' 'unsafe-inline'"
}


def static_assets(root: Path = STATIC_DIR) -> dict[str, Path]:
    """The files `/static/...` may answer with, by URL path: an allow-list, so no request can
    name a file outside it (`..`, symlinks, encoded slashes)."""
    return {path.relative_to(root).as_posix(): path for path in root.rglob("*") if path.is_file()}


def docs_pages(title: str, openapi_url: str) -> tuple[bytes, bytes]:
    """The HTML of Swagger UI and ReDoc pages that load nothing from outside the service."""
    swagger = get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{title} — Swagger UI",
        swagger_js_url=f"{SWAGGER_UI}/swagger-ui-bundle.js",
        swagger_css_url=f"{SWAGGER_UI}/swagger-ui.css",
        swagger_favicon_url=FAVICON,
        # Swagger UI would otherwise send the document to validator.swagger.io for a badge
        swagger_ui_parameters={"validatorUrl": None},
    )
    redoc = get_redoc_html(
        openapi_url=openapi_url,
        title=f"{title} — ReDoc",
        redoc_js_url=f"{REDOC}/redoc.standalone.js",
        redoc_favicon_url=FAVICON,
        with_google_fonts=False,
    )
    return bytes(swagger.body), bytes(redoc.body)


def pages_router(title: str, openapi_url: str | None) -> APIRouter:
    """`/`, `/docs`, `/redoc` and `/static/...`; build the app with `docs_url=None,
    redoc_url=None` so FastAPI's CDN-backed pages are not registered next to these."""
    # relative to /docs and /redoc, which sit at the root like /openapi.json
    swagger, redoc = docs_pages(title, (openapi_url or "/openapi.json").lstrip("/"))
    assets = static_assets()
    pages = APIRouter(include_in_schema=False)

    @pages.get("/")
    async def demo() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers=DEMO_HEADERS)

    # fresh responses each time: middleware may add headers to the one it is given
    @pages.get("/docs")
    async def swagger_ui() -> HTMLResponse:
        return HTMLResponse(swagger, headers=DOCS_HEADERS)

    @pages.get("/redoc")
    async def redoc_ui() -> HTMLResponse:
        return HTMLResponse(redoc, headers=DOCS_HEADERS)

    @pages.get("/static/{asset:path}")
    async def static_asset(asset: str) -> FileResponse:
        path = assets.get(asset)
        if path is None:
            raise Problem(404, "not-found", f"no static file {asset!r}", field="path")
        return FileResponse(path)

    return pages
