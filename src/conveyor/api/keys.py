"""``/v1/keys``: create, list, read and revoke API keys (scope ``keys:admin``).

A key's secret is in the answer to its creation only; the store keeps its hash.
Creating and revoking write their audit row in the same transaction. A revoked
key stops working in every API process within ``CONVEYOR_KEY_CACHE_SECONDS``
(at most 5 s). Revoking the bootstrap admin key (it would come back at the next
start: rotate ``CONVEYOR_ADMIN_KEY`` or the key file instead) or the key making
the request (an admin could lock themselves out) is refused with 409.
"""

from __future__ import annotations

import structlog
from fastapi import APIRouter, Depends, Request, Response

from conveyor.api import audit
from conveyor.api.auth import Authenticated, Scope, require_key
from conveyor.api.problems import problem_responses
from conveyor.api.schemas import KeyCreated, KeyList, KeyRequest, KeyResource
from conveyor.api.state import api_state
from conveyor.errors import KeyRefused
from conveyor.keys import check_new_key

log = structlog.get_logger("conveyor.api")

router = APIRouter(
    prefix="/v1/keys",
    tags=["keys"],
    dependencies=[Depends(require_key), Scope("keys:admin")],
    responses=problem_responses(401, 403, 503),
)


@router.post("", status_code=201, response_model=KeyCreated, responses=problem_responses(409, 422))
def create_key(
    body: KeyRequest, request: Request, response: Response, key: Authenticated
) -> KeyCreated:
    """Make a key; its ``secret`` is in this answer only. 422 for an unknown scope, an
    expiry in the past or a rate that does not parse; 409 if an active key has the name."""
    check_new_key(body.name, body.scopes, body.expires_at, body.rate_limit)
    scopes = list(dict.fromkeys(body.scopes))
    made, secret = api_state(request).store.create_api_key(
        body.name,
        scopes,
        expires_at=body.expires_at,
        rate_limit=body.rate_limit,
        audit=audit.entry(request, key, "key.create", "key", None, name=body.name, scopes=scopes),
    )
    log.info("key.created", key_id=made.id, name=made.name, by=key.name)
    response.headers["Location"] = f"/v1/keys/{made.id}"
    return KeyCreated(**KeyResource.of(made).model_dump(), secret=secret)


@router.get("", response_model=KeyList)
def list_keys(request: Request, revoked: bool = False) -> KeyList:
    """Keys oldest first, never their secrets; ``revoked=true`` includes revoked ones."""
    found = api_state(request).store.api_keys(revoked=revoked)
    return KeyList(items=[KeyResource.of(k) for k in found])


@router.get("/{key_id}", response_model=KeyResource, responses=problem_responses(404))
def get_key(key_id: str, request: Request) -> KeyResource:
    return KeyResource.of(api_state(request).store.api_key(key_id))


@router.delete("/{key_id}", response_model=KeyResource, responses=problem_responses(404, 409))
def revoke_key(key_id: str, request: Request, key: Authenticated) -> KeyResource:
    """Revoke a key: every API process refuses it within 5 seconds. Revoking a revoked
    key answers it as it is. 409 for the bootstrap admin key or the caller's own."""
    state = api_state(request)
    target = state.store.api_key(key_id)
    if target.id == key.id:
        raise KeyRefused(key_id, "it is the key making this request")
    if target.revoked_at is None and _is_bootstrap(request, target.id):
        raise KeyRefused(
            key_id, "it is the bootstrap admin key; rotate CONVEYOR_ADMIN_KEY or its key file"
        )
    revoked, changed = state.store.revoke_api_key(
        key_id, audit=audit.entry(request, key, "key.revoke", "key", key_id, name=target.name)
    )
    if changed:
        log.info("key.revoked", key_id=key_id, name=revoked.name, by=key.name)
    return KeyResource.of(revoked)


def _is_bootstrap(request: Request, key_id: str) -> bool:
    """Whether the key is the one this deployment bootstraps (from its setting or file)."""
    settings = api_state(request).settings
    if settings.admin_key is not None:
        secret = settings.admin_key.get_secret_value()
    elif settings.admin_key_path.exists():
        secret = settings.admin_key_path.read_text().strip()
    else:
        return False
    found = api_state(request).store.verify_api_key(secret) if secret else None
    return found is not None and found.id == key_id
