"""``/v1/audit``: the trail of changes made through the API, for admins; and
:func:`entry` / :func:`record`, which the routes that change things call.

Rows are only ever appended: no route changes or deletes one (PUT, PATCH and
DELETE answer 405). Submits are not audited: the job record holds them already.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError

from conveyor.api.auth import Scope, require_key
from conveyor.api.pages import bounded_page, check_cursor
from conveyor.api.problems import problem_responses
from conveyor.api.schemas import AuditPage, AuditResource, Cursor, Timestamp
from conveyor.api.state import api_state
from conveyor.store import ApiKey, AuditEntry, AuditFilter, AuditRecord
from conveyor.store.pages import encode_cursor

MAX_PAGE = 200

router = APIRouter(
    prefix="/v1/audit",
    tags=["audit"],
    dependencies=[Depends(require_key)],
    responses=problem_responses(401, 403, 503),
)


def entry(
    request: Request,
    key: ApiKey,
    action: str,
    object_type: str,
    object_id: str | None,
    **detail: Any,
) -> AuditEntry:
    """The audit row for a change ``key`` makes in this request."""
    return AuditEntry(
        action=action,
        object_type=object_type,
        object_id=object_id,
        key_id=key.id,
        key_name=key.name,
        address=request.client.host if request.client else None,
        correlation_id=getattr(request.state, "correlation_id", None),
        detail=detail,
    )


def record(
    request: Request,
    key: ApiKey,
    action: str,
    object_type: str,
    object_id: str | None,
    **detail: Any,
) -> None:
    """Write the audit row for a change just made (blocking: call from a ``def`` route)."""
    api_state(request).store.audit(entry(request, key, action, object_type, object_id, **detail))


Filter = Annotated[str | None, Query(min_length=1, max_length=200, pattern=r"^[^\x00]*$")]


@router.get(
    "",
    response_model=AuditPage,
    dependencies=[Scope("admin")],
    responses=problem_responses(400, 422),
)
def list_audit(
    request: Request,
    action: Filter = None,
    key_id: Filter = None,
    object_id: Filter = None,
    since: Annotated[Timestamp | None, Query(description="At or after this.")] = None,
    until: Annotated[Timestamp | None, Query(description="Before this.")] = None,
    cursor: Cursor = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> Response:
    """Audit rows newest first, filtered by action, key, object and time; follow
    ``next_cursor``. Actions: ``job.cancel``, ``job.delete``, ``pipeline.cancel``,
    ``dead_letter.replay``, ``dead_letter.purge``, ``dead_letters.replay``,
    ``dead_letters.purge``, ``schedule.create``, ``schedule.update``,
    ``schedule.delete``, ``schedule.trigger``, ``key.create``, ``key.revoke``."""
    check_cursor(cursor, numeric=True)
    if since is not None and until is not None and since >= until:
        wrong = {"loc": ("query", "until"), "msg": "until must be after since", "type": "value"}
        raise RequestValidationError([wrong])
    match = AuditFilter(action=action, key_id=key_id, object_id=object_id, since=since, until=until)
    store = api_state(request).store

    def fetch(after: str | None, count: int) -> tuple[list[AuditRecord], str | None]:
        return store.audit_trail(match, cursor=after, limit=count)

    return bounded_page(
        fetch,
        lambda found: [AuditResource.of(r) for r in found],
        lambda r: encode_cursor(r.at, str(r.id)),
        cursor=cursor,
        limit=limit,
    )
