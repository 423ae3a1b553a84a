"""Bearer API keys on each request: the dependency every ``/v1`` route has."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from conveyor.api.state import api_state
from conveyor.store import ApiKey

bearer = HTTPBearer(
    scheme_name="ApiKey",
    bearerFormat="cvk_...",
    description="An API key, sent as `Authorization: Bearer <key>`.",
    auto_error=False,
)


def _unauthorized(detail: str, challenge: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": challenge})


async def require_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> ApiKey:
    """The dependency every ``/v1`` route has: a valid bearer key, or 401."""
    if credentials is None:
        raise _unauthorized("an API key is required: Authorization: Bearer <key>", "Bearer")
    record = await api_state(request).keys.verify(credentials.credentials)
    if record is None:
        raise _unauthorized("the API key is invalid or revoked", 'Bearer error="invalid_token"')
    return record


Authenticated = Annotated[ApiKey, Depends(require_key)]
