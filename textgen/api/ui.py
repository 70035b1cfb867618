"""What a person opens in a browser: the playground at ``/``, Swagger UI at ``/docs``, ReDoc at ``/redoc``.

Everything is served by the service itself, so the pages work on a machine without internet: the
playground from ``textgen/static/`` (plain HTML, CSS and JavaScript, no build step), Swagger UI and
ReDoc from the files the pinned ``fastapi-offline`` wheel ships (FastAPI's default pages load them from
a CDN, which leaves ``/docs`` blank offline). None of these pages holds data; the API calls they make
go through the usual API-key check.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
STATIC_URL = "/static"
DOCS_ASSETS_URL = "/static/docs"
FAVICON_PATH = f"{STATIC_URL}/favicon.svg"
# ReDoc's sidebar attribution loads its logo from Redocly's CDN, whatever the options say.
REDOC_LOGO_URL = b"https://cdn.redoc.ly/redoc/logo-mini.svg"

# The playground loads nothing from elsewhere; the browser enforces it.
PLAYGROUND_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)

router = APIRouter(include_in_schema=False)


def docs_assets_dir() -> Path:
    """Swagger UI's and ReDoc's bundles, as shipped inside the pinned fastapi-offline wheel."""
    return Path(str(files("fastapi_offline") / "static"))


@lru_cache(maxsize=1)
def redoc_bundle() -> bytes:
    """ReDoc's bundle with its one hard-wired outside request pointed at the service's own icon."""
    return (docs_assets_dir() / "redoc.standalone.js").read_bytes().replace(REDOC_LOGO_URL, FAVICON_PATH.encode())


@router.get("/")
async def playground() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": PLAYGROUND_CSP})


@router.get("/favicon.ico")
async def favicon() -> FileResponse:
    return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{DOCS_ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{FAVICON_PATH}",
        # validatorUrl: null keeps Swagger UI from calling its public validator service.
        swagger_ui_parameters={"validatorUrl": None, "tryItOutEnabled": False, "displayRequestDuration": True},
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{DOCS_ASSETS_URL}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{FAVICON_PATH}",
        with_google_fonts=False,
    )


@router.get(f"{DOCS_ASSETS_URL}/redoc.standalone.js")
async def redoc_js() -> Response:
    return Response(redoc_bundle(), media_type="text/javascript; charset=utf-8")


def install_ui(app: FastAPI) -> None:
    """The pages' routes (ReDoc's patched bundle among them) before their static files, the more specific
    mount first."""
    app.include_router(router)
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=docs_assets_dir()), name="docs-assets")
    app.mount(STATIC_URL, StaticFiles(directory=STATIC_DIR), name="static")
