"""``/ui``: the dashboard's pages, its forms and its event streams.

Every page reads through the API's own route functions (``conveyor.api.jobs`` and the
others), called with the session's key after the same scope check the ``/v1`` routes
declare (:func:`conveyor.api.auth.require_scope`): what a key sees and may do here is
exactly what it sees and may do over the API, ownership included. Their errors become
the API's problem+json answers (a read-only key posting anyway gets 403). The one
exception is the overview's count of the hour's dead letters, which asks the store for
a count under the same owner filter (``conveyor.keys.owner_filter``) rather than read
a page of them.

Every POST carries the session's CSRF token and an ``Origin`` (else a ``Referer``)
that must be this site's; the session cookie is SameSite=Strict besides.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit

from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from jinja2 import Environment, FileSystemLoader
from pydantic import BaseModel, TypeAdapter, ValidationError
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from conveyor.api import (
    breakers,
    dead_letters,
    events,
    jobs,
    pipelines,
    queues,
    schedules,
    throughput,
)
from conveyor.api import workers as worker_routes
from conveyor.api.auth import require_scope
from conveyor.api.dashboard.drawing import pipeline_graph, throughput_chart
from conveyor.api.dashboard.sessions import COOKIE, COOKIE_PATH, Session, Sessions
from conveyor.api.schemas import NameText, PurgeRequest, ReplayRequest, SchedulePatch, Timestamp
from conveyor.api.state import api_state
from conveyor.jobs import JobStatus
from conveyor.keys import allows, owner_filter
from conveyor.settings import Settings
from conveyor.store import ApiKey, DeadLetterFilter

PREFIX = "/ui"
STATIC_URL = f"{PREFIX}/static"
PAGE_SIZE = 50
#: The overview's chart: jobs ended per minute over this many minutes.
CHART_MINUTES = 30
#: The overview counts the last hour's dead letters up to this many.
DEAD_COUNT_CAP = 10_000

_HERE = Path(str(files("conveyor.api.dashboard")))
_templates = Environment(loader=FileSystemLoader(_HERE / "templates"), autoescape=True)


def _pretty(value: Any) -> str:
    """JSON for people: indented, non-ASCII kept; autoescaping makes it safe text."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def _when(value: datetime | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


_templates.filters["pretty"] = _pretty
_templates.filters["when"] = _when


class SignInRequired(Exception):
    """No valid session: a page sends the browser to sign in, a POST gets 401."""


@dataclass(frozen=True)
class Dashboard:
    """What the dashboard keeps for the process: how to sign and read sessions."""

    sessions: Sessions


@dataclass(frozen=True)
class SignedIn:
    key: ApiKey
    session: Session
    csrf: str

    def may(self, scope: str) -> bool:
        """Whether to show the buttons needing ``scope`` (posting is checked again)."""
        return allows(self.key, scope)


def _dashboard(request: Request) -> Dashboard:
    found: Dashboard = request.app.state.dashboard
    return found


async def signed_in(request: Request) -> SignedIn:
    """The session's key, checked again through the key cache; SignInRequired if none."""
    sessions = _dashboard(request).sessions
    session = sessions.read(request.cookies.get(COOKIE))
    if session is None:
        raise SignInRequired
    key = await api_state(request).keys.verify_id(session.key_id)
    if key is None:  # revoked or expired since
        raise SignInRequired
    return SignedIn(key, session, sessions.csrf_token(session))


User = Annotated[SignedIn, Depends(signed_in)]
router = APIRouter(prefix=PREFIX, include_in_schema=False)


def _check_origin(request: Request) -> None:
    """The post's ``Origin``, else its ``Referer``, must be this site. Browsers send
    ``Origin`` with every form POST, and ``Referer`` too under the pages'
    ``Referrer-Policy: same-origin``; a POST with neither did not come from one of
    these pages (programs use ``/v1`` with a key), so it is refused whatever it holds."""
    own = f"{request.url.scheme}://{request.headers.get('host', '')}"
    origin = request.headers.get("origin")
    if origin is None:
        referer = request.headers.get("referer")
        if referer is None:
            raise HTTPException(403, "a form post must say where it comes from (Origin)")
        parts = urlsplit(referer)
        origin = f"{parts.scheme}://{parts.netloc}"
    if origin != own:
        raise HTTPException(403, "this form was posted from another site")


async def _form(request: Request, user: SignedIn | None) -> dict[str, str]:
    """The posted form's fields, once its origin and (signed in) its CSRF token pass."""
    _check_origin(request)
    try:
        text = (await request.body()).decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, "the form is not UTF-8") from None
    form = {name: values[-1] for name, values in parse_qs(text, keep_blank_values=True).items()}
    if user is not None and not _dashboard(request).sessions.csrf_valid(
        user.session, form.get("csrf")
    ):
        raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the page")
    return form


def _page(request: Request, template: str, user: SignedIn | None, **context: Any) -> HTMLResponse:
    html = _templates.get_template(template).render(user=user, static=STATIC_URL, **context)
    # "no-referrer", the API's policy, would make browsers post forms with "Origin: null";
    # "same-origin" leaves other sites the same nothing and lets the Origin check work.
    return HTMLResponse(html, headers={"Referrer-Policy": "same-origin"})


def _json(response: Response) -> Any:
    """What a ``/v1`` list route answered, as data for a template."""
    return json.loads(bytes(response.body))


def _blank(value: str | None) -> str | None:
    return value.strip() or None if value is not None else None


def _see_other(location: str) -> RedirectResponse:
    return RedirectResponse(location, status_code=303)


def _query(**params: str | list[str] | None) -> str:
    """A query string of the non-empty ``params``, for links that keep the filters."""
    pairs = [
        (name, item)
        for name, value in params.items()
        for item in (value if isinstance(value, list) else [value])
        if item
    ]
    return urlencode(pairs)


# -- signing in and out --


@router.get("/login")
async def login_page(request: Request) -> HTMLResponse:
    return _page(request, "login.html", None, error=None)


@router.post("/login")
async def login(request: Request) -> Response:
    """Exchange an API key for a session; the key goes in a form body, never a URL."""
    form = await _form(request, None)
    key = await api_state(request).keys.verify(form.get("key", "").strip())
    if key is None:
        refused = _page(request, "login.html", None, error="That key is invalid or revoked.")
        refused.status_code = 401
        return refused
    sessions = _dashboard(request).sessions
    _, value = sessions.open(key.id)
    response = _see_other(PREFIX)
    response.set_cookie(
        COOKIE,
        value,
        max_age=int(sessions.lifetime),
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )
    return response


@router.post("/logout")
async def logout(request: Request, user: User) -> Response:
    await _form(request, user)
    response = _see_other(f"{PREFIX}/login")
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
    return response


# -- pages --


@router.get("")
def overview(request: Request, user: User) -> HTMLResponse:
    """Queues, workers, dead letters of the last hour and open breakers."""
    require_scope(user.key, "jobs:read")
    head = api_state(request).store.last_event_id()
    depth = queues.list_queues(request)
    found = _json(worker_routes.list_workers(request, state=None, cursor=None, limit=200))
    alive = sum(1 for w in found["items"] if w["state"] == "alive")
    lost = sum(1 for w in found["items"] if w["state"] == "lost")
    # Counted, not listed: the dead letters of the hour the key may see (its own
    # only without jobs:read-all, as GET /v1/dead-letters lists them).
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    mine = DeadLetterFilter(since=hour_ago, owner_key_id=owner_filter(user.key))
    counted = api_state(request).store.count_dead_letters(mine, cap=DEAD_COUNT_CAP)
    dead_count = f"{counted:,}{'+' if counted >= DEAD_COUNT_CAP else ''}"
    open_breakers = [b for b in breakers.list_breakers(request).items if b.state != "closed"]
    chart = throughput_chart(throughput.throughput(request, minutes=CHART_MINUTES))
    return _page(
        request,
        "overview.html",
        user,
        head=head,
        chart=chart,
        chart_minutes=CHART_MINUTES,
        queues=depth,
        alive=alive,
        lost=lost,
        dead_count=dead_count,
        breakers=open_breakers,
    )


@router.get("/jobs")
def job_list(
    request: Request,
    user: User,
    status: Annotated[list[str], Query()] = [],  # noqa: B006 - FastAPI copies defaults
    task: str | None = None,
    queue: str | None = None,
    created_after: str | None = None,
    created_before: str | None = None,
    cursor: str | None = None,
) -> HTMLResponse:
    """Jobs newest first; the filters and the page are in the URL."""
    require_scope(user.key, "jobs:read")
    try:
        wanted = [JobStatus(s) for s in status if s]
    except ValueError:
        choices = ", ".join(s.value for s in JobStatus)
        raise HTTPException(422, f"status is one of {choices}") from None
    task, queue = _name("task", _blank(task)), _name("queue", _blank(queue))
    after_text, before_text = _blank(created_after), _blank(created_before)
    since = _timestamp("created_after", after_text)
    until = _timestamp("created_before", before_text)
    head = api_state(request).store.last_event_id()
    page = _json(
        jobs.list_jobs(
            request,
            user.key,
            status=wanted,
            task=task,
            queue=queue,
            created_after=since,
            created_before=until,
            cursor=_blank(cursor),
            limit=PAGE_SIZE,
        )
    )
    filters = {
        "status": [s.value for s in wanted],
        "task": task,
        "queue": queue,
        "created_after": after_text,
        "created_before": before_text,
    }
    after = page["next_cursor"]
    return _page(
        request,
        "jobs.html",
        user,
        head=head,
        jobs=page["items"],
        statuses=[s.value for s in JobStatus],
        chosen=filters["status"],
        task=task or "",
        queue=queue or "",
        created_after=after_text or "",
        created_before=before_text or "",
        next_url=f"{PREFIX}/jobs?{_query(**filters, cursor=after)}" if after else None,
    )


_TIMESTAMP: TypeAdapter[datetime] = TypeAdapter(Timestamp)
_NAME: TypeAdapter[str] = TypeAdapter(NameText)
_T = TypeVar("_T")


def _timestamp(name: str, text: str | None) -> datetime | None:
    """A time filter as the API reads it (RFC 3339, UTC without a zone); a browser's
    ``datetime-local`` field leaves out zero seconds, so those are put back first."""
    if text is None:
        return None
    if len(text) == 16 and text[10:11] in ("T", "t"):  # 2026-11-29T13:05
        text += ":00"
    return _checked(_TIMESTAMP, name, text)


def _name(name: str, text: str | None) -> str | None:
    """A filter by name (task, queue, error type) as the API reads it: no NUL."""
    return None if text is None else _checked(_NAME, name, text)


def _checked(adapter: TypeAdapter[_T], name: str, text: str) -> _T:
    """``text`` read by ``adapter``: a 422 naming query parameter ``name`` if it cannot.

    These pages call the API's route functions directly, past FastAPI's checks of
    their query parameters, so the pages check them the same way first."""
    try:
        return adapter.validate_python(text)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError([{**e, "loc": ("query", name)} for e in errors]) from None


@router.get("/jobs/{job_id}")
def job_page(job_id: str, request: Request, user: User) -> HTMLResponse:
    """A job: payload, result or error, attempts; its timeline fills from its stream."""
    require_scope(user.key, "jobs:read")
    job = jobs.get_job(job_id, request, user.key)
    return _page(request, "job.html", user, job=job, terminal=job.status.terminal)


@router.post("/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request, user: User) -> Response:
    await _form(request, user)
    require_scope(user.key, "jobs:write")
    await run_in_threadpool(jobs.cancel_job, job_id, request, user.key)
    return _see_other(f"{PREFIX}/jobs/{job_id}")


@router.get("/dead-letters")
def dead_letter_list(
    request: Request,
    user: User,
    task: str | None = None,
    error_type: str | None = None,
    cursor: str | None = None,
) -> HTMLResponse:
    require_scope(user.key, "jobs:read")
    task, error_type = _name("task", _blank(task)), _name("error_type", _blank(error_type))
    page = _json(
        dead_letters.list_dead_letters(
            request,
            user.key,
            task=task,
            error_type=error_type,
            cursor=_blank(cursor),
            limit=PAGE_SIZE,
        )
    )
    after = page["next_cursor"]
    filters = {"task": task, "error_type": error_type}
    return _page(
        request,
        "dead_letters.html",
        user,
        items=page["items"],
        task=task or "",
        error_type=error_type or "",
        next_url=f"{PREFIX}/dead-letters?{_query(**filters, cursor=after)}" if after else None,
        purged=request.query_params.get("purged"),
        replayed=request.query_params.get("replayed"),
    )


@router.get("/dead-letters/{job_id}")
def dead_letter_page(job_id: str, request: Request, user: User) -> HTMLResponse:
    require_scope(user.key, "jobs:read")
    dead = dead_letters.get_dead_letter(job_id, request, user.key)
    return _page(request, "dead_letter.html", user, dead=dead)


@router.post("/dead-letters/purge")
async def purge_dead_letters(request: Request, user: User) -> Response:
    """Purge by filter, only with the confirmation box ticked; an empty filter purges
    nothing (purging everything is for the API's ``"all": true``)."""
    form = await _form(request, user)
    require_scope(user.key, "dead-letters:write")
    if form.get("confirm") != "yes":
        raise HTTPException(422, "tick the confirmation box to purge")
    body: PurgeRequest = _selection(PurgeRequest, form)
    done = await run_in_threadpool(dead_letters.purge_dead_letters, body, request, user.key)
    return _see_other(f"{PREFIX}/dead-letters?{_query(purged=str(done.purged))}")


def _selection(model: type[BaseModel], form: dict[str, str]) -> Any:
    """The form's filter as the API's request body; what it refuses is a 422, as there."""
    try:
        return model(task=_blank(form.get("task")), error_type=_blank(form.get("error_type")))
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        found: list[dict[str, Any]] = [{**e, "loc": ("body", *e["loc"])} for e in errors]
        raise RequestValidationError(found) from None


@router.post("/dead-letters/replay")
async def replay_dead_letters(request: Request, user: User) -> Response:
    """Replay the dead letters matching the list's filter (those not replayed yet)."""
    form = await _form(request, user)
    require_scope(user.key, "dead-letters:write")
    body: ReplayRequest = _selection(ReplayRequest, form)
    done = await run_in_threadpool(dead_letters.replay_dead_letters, body, request, user.key)
    return _see_other(f"{PREFIX}/dead-letters?{_query(replayed=str(len(done.replayed)))}")


@router.post("/dead-letters/{job_id}/replay")
async def replay_dead_letter(job_id: str, request: Request, user: User) -> Response:
    await _form(request, user)
    require_scope(user.key, "dead-letters:write")
    job = await run_in_threadpool(
        dead_letters.replay_dead_letter, job_id, request, Response(), user.key
    )
    return _see_other(f"{PREFIX}/jobs/{job.id}")


@router.get("/schedules")
def schedule_list(request: Request, user: User, cursor: str | None = None) -> HTMLResponse:
    require_scope(user.key, "jobs:read")
    page = _json(schedules.list_schedules(request, cursor=_blank(cursor), limit=PAGE_SIZE))
    after = page["next_cursor"]
    return _page(
        request,
        "schedules.html",
        user,
        items=page["items"],
        next_url=f"{PREFIX}/schedules?{_query(cursor=after)}" if after else None,
    )


@router.post("/schedules/{name}/{action}")
async def schedule_action(name: str, action: str, request: Request, user: User) -> Response:
    """``pause``, ``resume`` or ``trigger`` a schedule."""
    await _form(request, user)
    require_scope(user.key, "schedules:write")
    if action == "trigger":
        await run_in_threadpool(schedules.trigger_schedule, name, request, Response(), user.key)
    elif action in ("pause", "resume"):
        patch = SchedulePatch(enabled=action == "resume")
        await run_in_threadpool(schedules.update_schedule, name, patch, request, user.key)
    else:
        raise HTTPException(404, "a schedule's actions are pause, resume and trigger")
    return _see_other(f"{PREFIX}/schedules")


@router.get("/pipelines")
def pipeline_list(request: Request, user: User, cursor: str | None = None) -> HTMLResponse:
    require_scope(user.key, "jobs:read")
    page = _json(
        pipelines.list_pipelines(request, user.key, cursor=_blank(cursor), limit=PAGE_SIZE)
    )
    after = page["next_cursor"]
    return _page(
        request,
        "pipelines.html",
        user,
        items=page["items"],
        next_url=f"{PREFIX}/pipelines?{_query(cursor=after)}" if after else None,
    )


@router.get("/pipelines/{pipeline_id}")
def pipeline_page(pipeline_id: str, request: Request, user: User) -> HTMLResponse:
    require_scope(user.key, "jobs:read")
    head = api_state(request).store.last_event_id()
    pipeline = pipelines.get_pipeline(pipeline_id, request, user.key)
    graph = pipeline_graph(pipeline.steps)
    return _page(request, "pipeline.html", user, pipeline=pipeline, graph=graph, head=head)


@router.get("/workers")
def worker_list(request: Request, user: User, cursor: str | None = None) -> HTMLResponse:
    require_scope(user.key, "jobs:read")
    page = _json(
        worker_routes.list_workers(request, state=None, cursor=_blank(cursor), limit=PAGE_SIZE)
    )
    after = page["next_cursor"]
    return _page(
        request,
        "workers.html",
        user,
        items=page["items"],
        now=datetime.now(UTC),
        next_url=f"{PREFIX}/workers?{_query(cursor=after)}" if after else None,
    )


# -- event streams, with the session's key --


@router.get("/events")
async def all_events(
    request: Request,
    user: User,
    after: events.After = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    """Every event the session's key may see after ``after`` (the last one when its page
    was read, so that nothing between falls through): one stream per page, however many
    progress bars it shows."""
    require_scope(user.key, "jobs:read")
    return await events.all_events(
        request, user.key, status=[], task=None, after=after, last_event_id=last_event_id
    )


@router.get("/jobs/{job_id}/events")
async def job_events(
    job_id: str,
    request: Request,
    user: User,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    """One job's events from its first, for its page's timeline."""
    require_scope(user.key, "jobs:read")
    return await events.job_events(
        job_id, request, user.key, after=None, last_event_id=last_event_id
    )


@router.get("/pipelines/{pipeline_id}/events")
async def pipeline_events(
    pipeline_id: str,
    request: Request,
    user: User,
    after: events.After = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> EventSourceResponse:
    """The pipeline's own stream (its steps' and jobs' events) after the page was read,
    for its graph: one stream, however many steps and items."""
    require_scope(user.key, "jobs:read")
    return await pipelines.pipeline_events(
        pipeline_id, request, user.key, after=after, last_event_id=last_event_id
    )


# -- installing --


def _sign_in_first(request: Request, exc: Exception) -> Response:
    if request.method in ("GET", "HEAD"):
        return _see_other(f"{PREFIX}/login")
    return JSONResponse(
        {"type": "about:blank", "title": "Unauthorized", "status": 401, "detail": "sign in first"},
        status_code=401,
        media_type="application/problem+json",
    )


def install(app: FastAPI, settings: Settings) -> None:
    """Add ``/ui``, its assets, and ``/`` sending browsers there."""
    secret = settings.ui_session_secret
    key = secret.get_secret_value().encode() if secret else secrets.token_bytes(32)
    sessions = Sessions(key, lifetime=settings.ui_session_hours * 3600)
    app.state.dashboard = Dashboard(sessions)
    app.add_exception_handler(SignInRequired, _sign_in_first)
    app.mount(STATIC_URL, StaticFiles(directory=_HERE / "static"), name="dashboard-assets")
    app.include_router(router)

    @app.get("/", include_in_schema=False)
    async def root(request: Request) -> Response:
        """Browsers go to the dashboard; for API clients ``/`` stays a 404, as it was."""
        if "text/html" in request.headers.get("accept", ""):
            return _see_other(PREFIX)
        raise HTTPException(404)
