"""The dashboard routes: `GET /v1/dashboard` (feedback records), `GET /v1/eval`, `GET /v1/eval/{run_id}` and
`GET /v1/eval/{run_id}/plots/{name}` (a PNG). HTML from Jinja2 templates with autoescape on.

Auth is the API's (`AuthDep`): a scoped key sees only the records of adapters it may use; the eval pages need an
admin key, since a run's summary and plots span several adapters. Links are relative, so the pages also work behind a
proxy that mounts the API under a prefix. Handlers are plain `def`: FastAPI runs them in its thread pool, so the file
reads do not block the event loop.

Not here: reading and paging files (claas.dashboard.records, claas.dashboard.runs).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

import jinja2
from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, HTMLResponse

from claas.auth import AuthScope
from claas.dashboard import records as record_files
from claas.dashboard import runs as eval_runs
from claas.deps import AuthDep, SettingsDep
from claas.errors import ForbiddenError
from claas.training.storage import validate_lora_id

router = APIRouter(tags=["dashboard"])

MAX_PAGE = 100_000
MAX_PER_PAGE = 200
DEFAULT_PER_PAGE = 20
TEMPLATES_DIR = Path(__file__).parent / "templates"

#: The pages load nothing but themselves and same-origin images; inline CSS only, no scripts.
_HTML_HEADERS = {
    "Cache-Control": "private, no-store",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; base-uri 'none'; "
        "frame-ancestors 'none'"
    ),
}


@router.get("/v1/dashboard", response_class=HTMLResponse)
def feedback_dashboard(
    settings: SettingsDep,
    auth: AuthDep,
    page: Annotated[int, Query(ge=1, le=MAX_PAGE, description="1-based page number.")] = 1,
    per_page: Annotated[int, Query(ge=1, le=MAX_PER_PAGE, description="Records per page.")] = DEFAULT_PER_PAGE,
    lora_id: Annotated[str | None, Query(max_length=256, description="Show only this adapter's records.")] = None,
) -> HTMLResponse:
    adapter = (lora_id or "").strip() or None  # the filter form sends an empty value for "all adapters"
    if adapter is not None:
        validate_lora_id(adapter, allow_version=True)
        auth.require(adapter)
    result = record_files.read_page(
        settings.feedback_log_dir,
        page=page,
        per_page=per_page,
        lora_id=adapter,
        allows=None if auth.is_admin else auth.allows,
    )

    def link(target: int) -> str:
        return _query(page=target, per_page=per_page, lora_id=adapter)

    return _render(
        "dashboard.html.j2",
        active="dashboard",
        auth=auth,
        result=result,
        lora_id=adapter,
        per_page=per_page,
        log_dir=str(settings.feedback_log_dir) if auth.is_admin else None,
        prev_url=link(page - 1) if page > 1 else None,
        next_url=link(page + 1) if result.has_next else None,
        first_url=link(1) if page > 1 else None,
        adapter_url=lambda target: _query(per_page=per_page, lora_id=target),
    )


@router.get("/v1/eval", response_class=HTMLResponse)
def eval_list(settings: SettingsDep, auth: AuthDep) -> HTMLResponse:
    _require_admin(auth)
    runs = eval_runs.list_runs(settings.eval_dir)
    return _render("eval_list.html.j2", active="eval", auth=auth, runs=runs, eval_dir=str(settings.eval_dir))


@router.get("/v1/eval/{run_id}", response_class=HTMLResponse)
def eval_run(run_id: str, settings: SettingsDep, auth: AuthDep) -> HTMLResponse:
    _require_admin(auth)
    run = eval_runs.load_run(settings.eval_dir, run_id)
    plots = eval_runs.plot_names(settings.eval_dir, run_id)
    return _render("eval_run.html.j2", active="eval", auth=auth, run=run, plots=plots, root="../")


@router.get("/v1/eval/{run_id}/plots/{name}")
def eval_plot(run_id: str, name: str, settings: SettingsDep, auth: AuthDep) -> FileResponse:
    _require_admin(auth)
    path = eval_runs.plot_path(settings.eval_dir, run_id, name)
    headers = {"Cache-Control": "private, no-cache", "X-Content-Type-Options": "nosniff"}
    return FileResponse(path, media_type="image/png", headers=headers)


def _require_admin(auth: AuthScope) -> None:
    if not auth.is_admin:
        raise ForbiddenError("the eval dashboard needs an admin API key: eval runs and their plots span adapters")


def _query(**params: Any) -> str:
    return "?" + urlencode({key: value for key, value in params.items() if value is not None})


def _render(template: str, **context: Any) -> HTMLResponse:
    context.setdefault("root", "")  # relative prefix from the page to /v1/ (for the navigation links)
    return HTMLResponse(_environment().get_template(template).render(**context), headers=_HTML_HEADERS)


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    # autoescape=True explicitly: select_autoescape() would not match names ending in ".html.j2".
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=format_number, change=format_change, ms=format_ms, when=format_time, pretty=pretty_json)
    env.tests["scalar"] = lambda value: value is None or isinstance(value, (str, int, float, bool))
    return env


def format_number(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"  # as in the JSON file
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return value if isinstance(value, str) else pretty_json(value)


def format_change(value: float | None) -> str:
    if value is None:
        return "—"
    return "0" if value == 0 else f"{value:+.4g}"


def format_ms(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return format_number(value)
    return f"{value:,.1f} ms"


def format_time(value: str | None) -> str:
    """An ISO timestamp as `YYYY-MM-DD HH:MM:SS` (+ zone); anything else unchanged."""
    if not value:
        return "—"
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return value
    zone = moment.tzname() or ""
    return moment.strftime("%Y-%m-%d %H:%M:%S") + (f" {zone}" if zone else "")


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str, sort_keys=False)
