"""Bearer API keys: checked for every ``/v1`` request before its body is read, then
held to the scope of the route and to the objects the key owns.

:class:`Authentication` checks the key as soon as the request arrives, so an
anonymous caller learns nothing from how its body would have been parsed (a
malformed body without a key is 401, not 422) and costs no parsing. The
``require_key`` dependency every ``/v1`` router has hands the checked key to
the routes and documents the scheme in the OpenAPI document. Every ``/v1``
route also declares ``Scope(...)``: a key without it gets 403 naming the scope.
:func:`own_job` and :func:`own_pipeline` answer 404 for another key's objects,
so ids cannot be probed.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as ASGIScope

from conveyor.api.state import api_state
from conveyor.errors import JobNotFound, PipelineNotFound, ScopeMissing
from conveyor.jobs import Job
from conveyor.keys import SCOPES, KeyVerifier, allows, may_see
from conveyor.pipelines import Pipeline
from conveyor.store import ApiKey, Store

#: Every path under this prefix needs a key, whether or not a route matches it.
PROTECTED_PREFIX = "/v1"

bearer = HTTPBearer(
    scheme_name="ApiKey",
    bearerFormat="cvk_...",
    description="An API key, sent as `Authorization: Bearer <key>`.",
    auto_error=False,
)


def _unauthorized(detail: str, challenge: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": challenge})


async def authenticate(keys: KeyVerifier, authorization: str | None) -> ApiKey:
    """The key an ``Authorization`` header carries, or a 401 to raise."""
    scheme, _, key = (authorization or "").partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise _unauthorized("an API key is required: Authorization: Bearer <key>", "Bearer")
    record = await keys.verify(key)
    if record is None:
        raise _unauthorized("the API key is invalid or revoked", 'Bearer error="invalid_token"')
    return record


class Authentication:
    """Refuses a ``/v1`` request without a valid key before routing reads its body.

    The key found is kept in ``request.state.api_key`` for :func:`require_key`.
    """

    def __init__(self, app: ASGIApp, keys: KeyVerifier) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] == "http" and (
            path == PROTECTED_PREFIX or path.startswith(f"{PROTECTED_PREFIX}/")
        ):
            authorization = Headers(scope=scope).get("authorization")
            scope.setdefault("state", {})["api_key"] = await authenticate(self.keys, authorization)
        await self.app(scope, receive, send)


async def require_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> ApiKey:
    """The dependency every ``/v1`` route has: the key :class:`Authentication` checked."""
    record: ApiKey | None = getattr(request.state, "api_key", None)
    if record is None:  # a route outside the protected prefix: check it here
        authorization = request.headers.get("authorization")
        record = await authenticate(api_state(request).keys, authorization)
    return record


Authenticated = Annotated[ApiKey, Depends(require_key)]


def Scope(scope: str) -> Any:
    """A dependency refusing keys without ``scope`` (403, ScopeMissing); gives the key."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")

    async def check(key: Authenticated) -> ApiKey:
        return require_scope(key, scope)

    check.scope = scope  # type: ignore[attr-defined] # for the check that every route has one
    return Depends(check)


def require_scope(key: ApiKey, scope: str) -> ApiKey:
    """``key`` if it holds ``scope``; ScopeMissing (403) if not. The dashboard checks its
    session's key with this too."""
    if not allows(key, scope):
        raise ScopeMissing(scope)
    return key


def own_job(store: Store, key: ApiKey, job_id: str) -> Job:
    """The job, if ``key`` may see it; JobNotFound (404) for another key's, as for none."""
    job = store.get_job(job_id)
    if not may_see(key, job.owner_key_id):
        raise JobNotFound(job_id)
    return job


def own_pipeline(store: Store, key: ApiKey, pipeline_id: str) -> Pipeline:
    """The pipeline, if ``key`` may see it; PipelineNotFound (404) otherwise."""
    pipeline = store.get_pipeline(pipeline_id)
    if not may_see(key, pipeline.owner_key_id):
        raise PipelineNotFound(pipeline_id)
    return pipeline
