"""The dashboard's web app (Starlette): server-rendered pages over `data.py`, charts drawn in the browser by
the vendored uPlot, every table as CSV and every figure's data as JSON. Nothing is fetched from elsewhere.

A page on a running run refreshes its content in place every few seconds (static/dashboard.js). With a
token (required off loopback), every request must carry it: `?token=` once (kept as a cookie) or
`Authorization: Bearer <token>`; anything else is 401.
"""

from __future__ import annotations

import csv
import hmac
import io
import json
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from server.dashboard import charts
from server.dashboard.data import Store, probes, run_detail, run_rows, scenario_name, stores

HERE = Path(__file__).parent
COOKIE = "fedretina_dashboard"
REFRESH_S = 3
TABLES = ("rounds", "replies", "events")


def create_app(root: Path, token: str | None = None) -> Starlette:
    """The dashboard over every run store under `root`."""
    pages = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape())
    pages.filters["duration"] = _duration
    pages.filters["short_seconds"] = _short_seconds
    pages.filters["scenario_name"] = scenario_name

    def find(name: str) -> Store:
        for store in stores(root):
            if store.name == name:
                return store
        raise _NotFound(f"no such run: {name}")

    def render(request: Request, template: str, **context: object) -> Response:
        html = pages.get_template(template).render(request=request, refresh_s=REFRESH_S, **context)
        return Response(html, media_type="text/html")

    async def runs_page(request: Request) -> Response:
        return render(request, "runs.html", runs=run_rows(root), root=root)

    async def run_page(request: Request) -> Response:
        detail = run_detail(find(request.path_params["name"]))
        return render(request, "run.html", d=detail, view=charts.run_view(detail))

    async def compare_page(request: Request) -> Response:
        names = request.query_params.getlist("run") or [r["name"] for r in run_rows(root)[:2]]
        details = [run_detail(find(n)) for n in names]
        return render(request, "compare.html", names=names, view=charts.compare_view(details))

    async def runs_json(request: Request) -> Response:
        return JSONResponse(run_rows(root))

    async def runs_csv(request: Request) -> Response:
        headers = {"Content-Disposition": 'attachment; filename="runs.csv"'}
        return PlainTextResponse(_csv(run_rows(root)), media_type="text/csv", headers=headers)

    async def run_json(request: Request) -> Response:
        return JSONResponse(run_detail(find(request.path_params["name"])))

    async def table_csv(request: Request) -> Response:
        name, table = request.path_params["name"], request.path_params["table"]
        if table not in TABLES:
            raise _NotFound(f"no such table: {table}")
        detail = run_detail(find(name))
        rows = detail["replies"] if table == "replies" else detail[table]
        return PlainTextResponse(
            _csv(rows),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{name.replace("/", "-")}-{table}.csv"'},
        )

    async def probe_png(request: Request) -> Response:
        store, file = find(request.path_params["name"]), request.path_params["file"]
        path = store.path.parent / "probes" / file
        if file not in probes(store):  # only the probes folder's PNGs, never a path from the request
            raise _NotFound(f"no such probe: {file}")
        return FileResponse(path, media_type="image/png")

    # a run's name is its folder below the root, slashes included (compare's arms/federated-<digest>): the
    # routes that end in a file match first, so a name never swallows them
    routes = [
        Route("/", runs_page),
        Route("/compare", compare_page),
        Route("/run/{name:path}/probes/{file}", probe_png),
        Route("/run/{name:path}/{table}.csv", table_csv),
        Route("/run/{name:path}", run_page),
        Route("/runs.csv", runs_csv),
        Route("/api/runs", runs_json),
        Route("/api/run/{name:path}", run_json),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    middleware = [Middleware(_TokenGate, token=token)] if token else []
    return Starlette(routes=routes, middleware=middleware, exception_handlers={LookupError: _not_found})


class _NotFound(LookupError):
    """No such run, table or file."""


async def _not_found(request: Request, exc: Exception) -> Response:
    return PlainTextResponse(str(exc), status_code=404)


class _TokenGate(BaseHTTPMiddleware):
    """Every request must carry the token (query once, then the cookie; or a bearer header)."""

    def __init__(self, app: object, token: str) -> None:
        super().__init__(app)  # type: ignore[arg-type]
        self.token = token

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        given = (
            request.query_params.get("token")
            or request.cookies.get(COOKIE)
            or request.headers.get("authorization", "").removeprefix("Bearer ")
        )
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return PlainTextResponse("401: this dashboard needs its token (?token=...)", status_code=401)
        response = await call_next(request)
        if request.query_params.get("token"):
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
        return response


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, dict | list) else v for k, v in row.items()})
    return out.getvalue()


def _short_seconds(seconds: float | None) -> str:
    """A site's seconds in a round, as the stragglers table shows them: tenths below 10 s (a tiny round's
    0.4 s is not "0"), whole seconds above."""
    if seconds is None:
        return ""
    return f"{seconds:.1f}" if seconds < 10 else f"{seconds:.0f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h {rest // 60:02d}m" if h else f"{rest // 60}m {rest % 60:02d}s"
