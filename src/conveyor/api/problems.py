"""The one place errors become HTTP: RFC 9457 ``application/problem+json`` responses.

    TaskNotFound, JobNotFound              404   (DeadLetterNotFound: not dead)
    TopicEventNotFound                     404
    PipelineNotFound                       404
    PipelineEnded                          409   (cancelling a pipeline that has ended)
    PipelineInvalid                        422   (``errors`` point at the step and its field)
    IllegalTransition, JobNotDead          409
    JobNotEnded                            409   (delete: cancel it first)
    ReplayRefused                          409   (``errors`` point into the stored payload)
    IdempotencyConflict                    409   (``Retry-After``: the first request is under way)
    IdempotencyMismatch                    422
    PayloadInvalid, ConfigurationError     422   (``errors`` point into the request)
    ScheduleInvalid                        422   (``errors`` name the field: cron, timezone...)
    ScheduleNotFound                       404
    DocumentNotFound                       404
    DocumentRefused                        422
    ScheduleExists                         409
    ScopeMissing                           403   (``scope`` names the scope the key lacks)
    KeyInvalid                             422   (``errors`` name the field)
    KeyNotFound                            404
    KeyExists                              409
    KeyRefused                             409   (the bootstrap admin key, the caller's own)
    BatchInvalid                           422   (``errors`` point at each bad item)
    EventRefused                           422   (``errors`` name the refusing tasks)
    NotStorable                            422
    RequestValidationError                 422   (``errors``)
    a body JSON cannot parse               422   (nested too deep for the parser, huge numbers)
    RateLimited                            429   (``Retry-After``; see ``api.ratelimit``)
    NotificationInvalid                    422   (``errors`` name the request field)
    AiTaskInvalid                          422   (``errors`` name the request field)
    AiTaskNotFound                         404
    AiTaskExists                           409
    EmailTemplateInvalid                   422   (``errors`` name the request field)
    EmailTemplateNotFound                  404
    EmailTemplateExists                    409
    StoreUnavailable, BrokerUnavailable    503   (``Retry-After``)
    HTTPException                          its own status and headers (401, 413, 404, 405...)
    anything else                          500, logged with its traceback, never shown

Handlers cover what the routes raise; :class:`ErrorBoundary` catches what
escapes them (and middleware), so no stack trace ever reaches a client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.errors import (
    AiTaskExists,
    AiTaskInvalid,
    AiTaskNotFound,
    BatchInvalid,
    BrokerUnavailable,
    ConfigurationError,
    ConveyorError,
    DeadLetterNotFound,
    DocumentNotFound,
    DocumentRefused,
    EmailTemplateExists,
    EmailTemplateInvalid,
    EmailTemplateNotFound,
    EventRefused,
    IdempotencyConflict,
    IdempotencyMismatch,
    IllegalTransition,
    JobNotDead,
    JobNotEnded,
    JobNotFound,
    KeyExists,
    KeyInvalid,
    KeyNotFound,
    KeyRefused,
    NotificationInvalid,
    NotStorable,
    PayloadInvalid,
    PipelineEnded,
    PipelineInvalid,
    PipelineNotFound,
    RateLimited,
    ReplayRefused,
    ScheduleExists,
    ScheduleInvalid,
    ScheduleNotFound,
    ScopeMissing,
    StoreUnavailable,
    TaskNotFound,
    TopicEventNotFound,
)

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:conveyor:problem:"
RETRY_AFTER_SECONDS = 5

log = structlog.get_logger("conveyor.api")


class FieldError(BaseModel):
    """One invalid field: where it is in the request, and what is wrong with it."""

    loc: list[str | int]
    msg: str
    type: str


class Problem(BaseModel):
    """An RFC 9457 problem, as every error response of the API is shaped."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[FieldError] | None = None
    #: On a 403: the scope the API key lacks.
    scope: str | None = None


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error responses a route declares in the OpenAPI document."""
    return {s: {"model": Problem, "description": HTTPStatus(s).phrase} for s in statuses}


@dataclass(frozen=True)
class Kind:
    status: int
    slug: str
    title: str


KINDS: dict[type[ConveyorError], Kind] = {
    TaskNotFound: Kind(404, "task-not-found", "Unknown task"),
    JobNotFound: Kind(404, "job-not-found", "Job not found"),
    DeadLetterNotFound: Kind(404, "dead-letter-not-found", "Dead letter not found"),
    PipelineNotFound: Kind(404, "pipeline-not-found", "Pipeline not found"),
    DocumentNotFound: Kind(404, "document-not-found", "Document not found"),
    DocumentRefused: Kind(422, "document-refused", "Upload refused; nothing was recorded"),
    PipelineEnded: Kind(409, "pipeline-ended", "Pipeline has ended"),
    PipelineInvalid: Kind(422, "invalid-pipeline", "Invalid pipeline; nothing was recorded"),
    IllegalTransition: Kind(409, "illegal-transition", "Job cannot make that change"),
    JobNotDead: Kind(409, "job-not-dead", "Job is not dead"),
    JobNotEnded: Kind(409, "job-not-ended", "Job has not ended"),
    ReplayRefused: Kind(409, "replay-refused", "Dead letter cannot be replayed"),
    IdempotencyConflict: Kind(409, "idempotency-conflict", "A request with this key is under way"),
    IdempotencyMismatch: Kind(
        422, "idempotency-mismatch", "Idempotency key already used for another request"
    ),
    PayloadInvalid: Kind(422, "invalid-payload", "Payload does not match the task's schema"),
    BatchInvalid: Kind(422, "invalid-batch", "Items of the batch are invalid; none was recorded"),
    EventRefused: Kind(422, "event-refused", "Subscribers refused the event; nothing was recorded"),
    TopicEventNotFound: Kind(404, "event-not-found", "Published event not found"),
    NotStorable: Kind(422, "not-storable", "Value cannot be stored"),
    ConfigurationError: Kind(422, "invalid-options", "Invalid job options"),
    ScheduleInvalid: Kind(422, "invalid-schedule", "Invalid schedule"),
    ScheduleNotFound: Kind(404, "schedule-not-found", "Schedule not found"),
    ScheduleExists: Kind(409, "schedule-exists", "Schedule exists already"),
    RateLimited: Kind(429, "rate-limited", "Too many requests"),
    NotificationInvalid: Kind(422, "invalid-notification", "Invalid notification"),
    AiTaskInvalid: Kind(422, "invalid-ai-task", "Invalid AI task; nothing was recorded"),
    AiTaskNotFound: Kind(404, "ai-task-not-found", "AI task not found"),
    AiTaskExists: Kind(409, "ai-task-exists", "AI task exists already"),
    EmailTemplateInvalid: Kind(422, "invalid-email-template", "Invalid e-mail template"),
    EmailTemplateNotFound: Kind(404, "email-template-not-found", "E-mail template not found"),
    EmailTemplateExists: Kind(409, "email-template-exists", "E-mail template exists already"),
    ScopeMissing: Kind(403, "scope-missing", "The API key lacks a scope"),
    KeyInvalid: Kind(422, "invalid-key", "Invalid API key request; nothing was recorded"),
    KeyNotFound: Kind(404, "key-not-found", "API key not found"),
    KeyExists: Kind(409, "key-exists", "API key name taken"),
    KeyRefused: Kind(409, "key-refused", "API key cannot be revoked"),
    StoreUnavailable: Kind(503, "store-unavailable", "Store unavailable"),
    BrokerUnavailable: Kind(503, "broker-unavailable", "Broker unavailable"),
}
INTERNAL = Kind(500, "internal-error", "Internal server error")


def problem(
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    title: str | None = None,
    errors: Sequence[Mapping[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    """A problem response; without a ``slug`` its type is ``about:blank``."""
    body: dict[str, Any] = {
        "type": f"{TYPE_PREFIX}{slug}" if slug else "about:blank",
        "title": title or HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        **extensions,
    }
    if errors is not None:
        body["errors"] = [FieldError.model_validate(e).model_dump() for e in errors]
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def conveyor_problem(exc: ConveyorError) -> JSONResponse:
    kind = next((KINDS[c] for c in type(exc).__mro__ if c in KINDS), None)
    if kind is None:
        return internal_error(exc)
    detail, headers, errors = str(exc), None, None
    if kind.status == 503:
        # Driver messages name hosts and databases: log them, tell the client when to retry.
        log.warning("request.unavailable", error=str(exc))
        detail = f"{kind.title.lower()}; try again in {RETRY_AFTER_SECONDS} seconds"
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
    if isinstance(exc, IdempotencyConflict):
        headers = {"Retry-After": "1"}
    if isinstance(exc, RateLimited):
        headers = {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, PayloadInvalid):
        # The task validated the payload alone; point into the request body instead.
        errors = [_field_error(("body", "payload", *e.get("loc", ())), e) for e in exc.errors]
    if isinstance(exc, BatchInvalid):
        errors = [e for index, item in exc.errors for e in _item_errors(index, item)]
    if isinstance(exc, ScheduleInvalid):
        where = ("body", exc.field)
        errors = [_field_error((*where, *e.get("loc", ())), e) for e in exc.errors] or [
            _field_error(where, {"msg": str(exc), "type": f"invalid_{exc.field}"})
        ]
    if isinstance(exc, EventRefused):
        # The whole body is the event's data; each error names the task that refused it.
        errors = [
            _field_error(("body", *e.get("loc", ())), {**e, "msg": f"{bad.task}: {e.get('msg')}"})
            for bad in exc.errors
            for e in bad.errors
        ]
    if isinstance(exc, PipelineInvalid):
        errors = _pipeline_errors(exc)
    if isinstance(exc, NotificationInvalid):
        # A dotted field points into a list: ``recipients.3.to`` is body.recipients[3].to.
        at = [int(p) if p.isascii() and p.isdigit() else p for p in exc.field.split(".")]
        errors = [_field_error(("body", *at), {"msg": detail, "type": "invalid_notification"})]
    if isinstance(exc, EmailTemplateInvalid):
        errors = [
            _field_error(("body", exc.field), {"msg": detail, "type": "invalid_email_template"})
        ]
    if isinstance(exc, AiTaskInvalid):
        errors = [_field_error(("body", exc.field), {"msg": detail, "type": "invalid_ai_task"})]
    if isinstance(exc, KeyInvalid):
        errors = [_field_error(("body", exc.field), {"msg": str(exc), "type": "invalid_key"})]
    extensions = {"scope": exc.scope} if isinstance(exc, ScopeMissing) else {}
    if isinstance(exc, ReplayRefused) and exc.errors:
        # The stored payload is at fault, not the request.
        errors = [_field_error(("payload", *e.get("loc", ())), e) for e in exc.errors]
    return problem(
        kind.status,
        detail,
        slug=kind.slug,
        title=kind.title,
        errors=errors,
        headers=headers,
        **extensions,
    )


def http_problem(exc: HTTPException) -> JSONResponse:
    if exc.status_code == 400 and isinstance(exc.__cause__, RecursionError | ValueError):
        # FastAPI answers 422 for a body that is not JSON, but 400 when its parser
        # gives up on one that is: nested past its recursion limit, or holding an
        # integer too long to convert. Both are invalid bodies: 422 as well.
        error = {"loc": ("body",), "msg": _unparsable(exc.__cause__), "type": "json_invalid"}
        return validation_problem(RequestValidationError([error]))
    return problem(exc.status_code, str(exc.detail), headers=exc.headers)


def _unparsable(cause: BaseException) -> str:
    if isinstance(cause, RecursionError):
        return "JSON nested too deep to parse"
    if isinstance(cause, UnicodeDecodeError):
        return "the body is not UTF-8"
    return "JSON with a number too long to parse"


def validation_problem(exc: RequestValidationError) -> JSONResponse:
    errors = [_field_error(e.get("loc", ()), e) for e in exc.errors()]
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors[:5])
    return problem(
        422, detail, slug="invalid-request", title="Invalid request", errors=errors or None
    )


def internal_error(exc: BaseException) -> JSONResponse:
    log.error("request.failed", exc_info=exc)
    return problem(
        500,
        "an unexpected error occurred; it has been logged",
        slug=INTERNAL.slug,
        title=INTERNAL.title,
    )


def _pipeline_errors(exc: PipelineInvalid) -> list[dict[str, Any]]:
    """Where in a pipeline request it is wrong: ``body.steps.<index>.<field>...``."""
    at: tuple[Any, ...] = ("body",)
    if exc.index is not None:
        at += ("steps", exc.index)
    if exc.field is not None:
        at += (exc.field,)
    if exc.errors:
        return [_field_error((*at, *e.get("loc", ())), e) for e in exc.errors]
    return [_field_error(at, {"msg": exc.reason, "type": "invalid_pipeline"})]


def _item_errors(index: int, exc: ConveyorError) -> list[dict[str, Any]]:
    """Where in a batch request an item is wrong: ``body.jobs.<index>...``."""
    at = ("body", "jobs", index)
    if isinstance(exc, PayloadInvalid):
        return [_field_error((*at, "payload", *e.get("loc", ())), e) for e in exc.errors]
    if isinstance(exc, TaskNotFound):
        return [_field_error((*at, "task"), {"msg": str(exc), "type": "task_not_found"})]
    return [_field_error(at, {"msg": str(exc), "type": "invalid_options"})]


def _field_error(loc: Sequence[Any], error: Mapping[str, Any]) -> dict[str, Any]:
    # Only these keys: pydantic's "input" and "ctx" may echo secrets or be unserialisable.
    return {
        "loc": [p if isinstance(p, int) else str(p) for p in loc],
        "msg": str(error.get("msg", "invalid")),
        "type": str(error.get("type", "value_error")),
    }


async def _on_conveyor_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ConveyorError)
    return conveyor_problem(exc)


async def _on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return http_problem(exc)


async def _on_validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return validation_problem(exc)


def install(app: FastAPI) -> None:
    """Register the handlers and the boundary that catches everything else."""
    app.add_exception_handler(ConveyorError, _on_conveyor_error)
    app.add_exception_handler(HTTPException, _on_http_exception)
    app.add_exception_handler(RequestValidationError, _on_validation_error)


class ErrorBoundary:
    """Turns any exception that escaped the handlers into a problem response.

    Starlette's own last resort re-raises after answering, and sits outside
    user middleware, so responses it makes carry no request id and go
    unmeasured; this one sits inside them.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = finished = False

        async def tracked(message: Message) -> None:
            nonlocal started, finished
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                finished = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if isinstance(exc, HTTPException):
                response = http_problem(exc)
            elif isinstance(exc, ConveyorError):
                response = conveyor_problem(exc)
            else:
                response = internal_error(exc)
            if not started:
                await response(scope, receive, send)
            elif not finished:
                # Too late for a status: end the body (a stream just stops; clients resume).
                log.warning("response.aborted", status=response.status_code)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
