"""The web chat page: ``/`` (``static/index.html``) and its own files under ``/static/`` (the page's scripts and
styles, and the vendored renderers in ``static/vendor/``: marked, DOMPurify, KaTeX, highlight.js).

Everything comes from the package's ``static`` folder and nothing else: a path is looked up among the files that
folder holds when the app is built (so ``..``, absolute paths, links out and files added later are all 404), and
only known suffixes are served, each with its fixed content type. The page's Content-Security-Policy forbids every
load from elsewhere and every inline script: the page works with no network, and model output rendered into it
can neither run nor fetch anything (the page sanitizes it too; the policy is the second wall).
"""

from __future__ import annotations

import sys
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from ...errors import RouteNotFound

if sys.version_info >= (3, 11):
    from importlib.resources.abc import Traversable
else:                                   # importlib.abc's name is deprecated from 3.12
    from importlib.abc import Traversable

#: The page's policy: its own scripts, styles and fonts only; images and videos also from ``data:`` and ``blob:``
#: (what the user attaches); style attributes allowed (KaTeX positions its glyphs with them), style elements and
#: inline scripts not; no plugins, no base URL, no forms posted anywhere, never framed.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; style-src-attr 'unsafe-inline'; "
    "img-src 'self' data: blob:; media-src 'self' data: blob:; font-src 'self'; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

#: The suffixes served, with their content types (a module script needs a JavaScript type, a font its own).
CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".woff2": "font/woff2",
    ".md": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    "LICENSE": "text/plain; charset=utf-8",
}


def _content_type(name: str) -> str | None:
    for suffix, content_type in CONTENT_TYPES.items():
        if name.endswith(suffix):
            return content_type
    return None


def _static_files(folder: Traversable, prefix: str = "") -> dict[str, Traversable]:
    """Every servable file under ``folder`` by its relative path (``vendor/katex/katex.min.css``)."""
    files: dict[str, Traversable] = {}
    for entry in folder.iterdir():
        name = prefix + entry.name
        if entry.is_dir():
            files.update(_static_files(entry, name + "/"))
        elif entry.is_file() and _content_type(entry.name) is not None:
            files[name] = entry
    return files


def page_router() -> APIRouter:
    """The router of ``/`` and ``/static/{path}``; the files are read once, here."""
    static = resources.files("internvl_runtime.serving").joinpath("static")
    index = static.joinpath("index.html").read_text(encoding="utf-8")
    files = {path: (entry.read_bytes(), _content_type(entry.name) or "")
             for path, entry in _static_files(static).items()}
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(index, headers=_HEADERS)

    @router.get("/static/{path:path}", include_in_schema=False)
    async def static_file(path: str) -> Response:
        found = files.get(path)
        if found is None:
            raise RouteNotFound(f"no file /static/{path}")
        body, content_type = found
        return Response(body, media_type=content_type, headers=_HEADERS)

    return router
